"""`smarthome rules ...`: apply rules from files, try them over history, read their runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import track

from services.ctl.client import Api, decode_json, session
from services.ctl.errors import CtlError, Group
from services.ctl.output import (
    Column,
    JsonFlag,
    console,
    done,
    emit_json,
    errors,
    listing,
    note,
    table,
)
from services.ctl.times import instant

app = Group(help="Rules: apply, try over history, enable, read their runs.", no_args_is_help=True)

# What a user writes (the API's RuleSpec); a stored rule answers these and more.
SPEC_FIELDS = ("name", "trigger", "actions", "conditions", "mode", "enabled", "home")
COLUMNS: list[Column] = [
    ("id", "id"),
    ("name", "name"),
    ("trigger", "trigger.type"),
    ("enabled", "enabled"),
    ("home", "home"),
    ("version", "version"),
    ("updated", "updated_at"),
]
RUN_COLUMNS: list[Column] = [
    ("time", "time"),
    ("kind", "kind"),
    ("device", "device_id"),
    ("reason", "reason"),
    ("correlation id", "correlation_id"),
]
FIRING_COLUMNS: list[Column] = [
    ("at", "at"),
    ("device", "device_id"),
    ("reason", "reason"),
    ("would send", lambda f: [_would(s) for s in f["would_send"]]),
]
Since = Annotated[str, typer.Option(help="Start of the history: ISO 8601 or 24h, 7d ago.")]
Until = Annotated[str, typer.Option(help="End of the history (exclusive): ISO 8601 or now.")]


@app.command("ls")
def list_rules(as_json: JsonFlag = False) -> None:
    """List rules."""
    with session() as api:
        items = list(api.items("/rules"))
    listing(items, COLUMNS, as_json, "no rules")


@app.command("show")
def show(rule_id: str, as_json: JsonFlag = False) -> None:
    """A rule as stored."""
    with session() as api:
        rule = api.get(f"/rules/{rule_id}")
    if as_json:
        emit_json(rule)
    else:
        console.print_json(data=rule)


def _read_rules(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The rules in a file, and whether it held an array of them."""
    try:
        text = path.read_text() if str(path) != "-" else typer.get_text_stream("stdin").read()
    except OSError as exc:
        raise CtlError(f"cannot read {path}: {exc.strerror}") from None
    data = decode_json(text, str(path))
    rules = data if isinstance(data, list) else [data]
    if not rules or not all(isinstance(r, dict) for r in rules):
        raise CtlError(f"{path}: a rule is a JSON object (or give an array of them)")
    return rules, isinstance(data, list)


def _apply(api: Api, spec: dict[str, Any]) -> dict[str, Any]:
    """Create the rule, or replace it when its `id` exists."""
    rule_id = spec.get("id")
    if rule_id and api.request("GET", f"/rules/{rule_id}", allow=(404,)).status_code == 200:
        body = {k: v for k, v in spec.items() if k != "id"}
        return {**api.put(f"/rules/{rule_id}", body), "applied": "replaced"}
    return {**api.post("/rules", spec), "applied": "created"}


@app.command("apply")
def apply(
    file: Annotated[
        Path, typer.Option("--file", "-f", help="A rule (JSON), or an array of them; - is stdin.")
    ],
    as_json: JsonFlag = False,
) -> None:
    """Create or replace rules from a file (by their `id`)."""
    specs, array = _read_rules(file)
    results = []
    with session() as api:
        many = len(specs) > 1 and not as_json
        for spec in track(specs, "applying", console=errors) if many else specs:
            results.append(_apply(api, spec))
    if as_json:
        emit_json(results if array else results[0])
        return
    for rule in results:
        console.print(f"{rule['applied']} {rule['id']} (version {rule['version']})", markup=False)


@app.command("test")
def test(
    rule_id: Annotated[str | None, typer.Argument(help="A stored rule.")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="A rule not saved (JSON) instead.")
    ] = None,
    since: Since = "24h",
    until: Until = "now",
    as_json: JsonFlag = False,
) -> None:
    """Dry-run a rule over recorded history: when it would have fired; nothing is sent."""
    window = {"since": instant(since, "--since"), "until": instant(until, "--until")}
    if (rule_id is None) == (file is None):
        raise CtlError("give a rule id or --file, one of them")
    with session() as api:
        if file is not None:
            specs, array = _read_rules(file)
            if array:
                raise CtlError(f"{file}: one rule at a time, not an array")
            spec = specs[0]
            result = api.post("/rules/test", {"rule": spec, **window})
        else:
            result = api.post(f"/rules/{rule_id}/test", window)
    if as_json:
        emit_json(result)
        return
    firings = result["firings"]
    if firings:
        table(firings, FIRING_COLUMNS)
    more = " (only the first listed)" if result.get("truncated") else ""
    note(
        f"{len(firings)} firing(s){more} over {result['evaluated_rows']} history rows, "
        f"{result['since']} to {result['until']}"
    )


def _would(send: dict[str, Any]) -> str:
    what = send.get("action") or send.get("state") or send.get("event_type") or ""
    target = send.get("device_id") or ""
    skipped = f" (skipped: {send['skipped']})" if send.get("skipped") else ""
    return f"{send.get('type')} {target} {what}".strip() + skipped


def _set_enabled(rule_id: str, enabled: bool, as_json: bool) -> None:
    with session() as api:
        rule = api.get(f"/rules/{rule_id}")
        spec = {k: rule[k] for k in SPEC_FIELDS if k in rule}
        rule = api.put(f"/rules/{rule_id}", {**spec, "enabled": enabled})
    state = "enabled" if enabled else "disabled"
    done(rule, as_json, f"{state} {rule['id']} (version {rule['version']})")


@app.command("enable")
def enable(rule_id: str, as_json: JsonFlag = False) -> None:
    """Enable a rule."""
    _set_enabled(rule_id, True, as_json)


@app.command("disable")
def disable(rule_id: str, as_json: JsonFlag = False) -> None:
    """Disable a rule (it is kept, and evaluates nothing)."""
    _set_enabled(rule_id, False, as_json)


@app.command("runs")
def runs(
    rule_id: str,
    limit: Annotated[int | None, typer.Option(help="At most this many.", min=1)] = None,
    as_json: JsonFlag = False,
) -> None:
    """A rule's trace: each firing, clearing or error, oldest first."""
    with session() as api:
        items = list(api.items(f"/rules/{rule_id}/runs", limit))
    listing(items, RUN_COLUMNS, as_json, f"{rule_id} has no runs yet")


@app.command("rm")
def remove(rule_id: str, as_json: JsonFlag = False) -> None:
    """Delete a rule."""
    with session() as api:
        api.delete(f"/rules/{rule_id}")
    done({"id": rule_id, "deleted": True}, as_json, f"removed {rule_id}")
