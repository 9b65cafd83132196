"""`smarthome audit ...`: read, export and verify the audit log."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from services.ctl.client import Api, session
from services.ctl.errors import ApiError, CtlError, Group
from services.ctl.output import Column, JsonFlag, done, emit_json, errors, listing, note
from services.ctl.times import instant

app = Group(help="Who did what, when: read, export, verify.", no_args_is_help=True)

COLUMNS: list[Column] = [
    ("id", "id"),
    ("time", "time"),
    ("actor", "actor"),
    ("action", "action"),
    ("device", "device_id"),
    ("result", "result"),
    ("correlation id", "correlation_id"),
]
CSV_FIELDS = ("id", "time", "actor", "action", "device_id", "result", "correlation_id", "detail")
CHUNK = 64 * 1024


class Format(StrEnum):
    ndjson = "ndjson"
    csv = "csv"


Device = Annotated[str | None, typer.Option("--device", help="Only rows about this device.")]
Correlation = Annotated[
    str | None, typer.Option("--correlation-id", help="Only rows of this cause.")
]
Actor = Annotated[str | None, typer.Option(help="Only rows of this principal (user:alice).")]
Action = Annotated[str | None, typer.Option(help="Only rows of this action (rule.fired).")]
Since = Annotated[
    str | None, typer.Option(help="From this time: ISO 8601 or a span before now (24h).")
]
Until = Annotated[str | None, typer.Option(help="Before this time: ISO 8601 or a span.")]


def _filters(
    device: str | None,
    correlation_id: str | None,
    actor: str | None,
    action: str | None,
    since: str | None,
    until: str | None,
) -> dict[str, Any]:
    return {
        "device_id": device,
        "correlation_id": correlation_id,
        "actor": actor,
        "action": action,
        "since": instant(since, "--since") if since else None,
        "until": instant(until, "--until") if until else None,
    }


@app.command("ls")
def list_audit(
    device: Device = None,
    correlation_id: Correlation = None,
    actor: Actor = None,
    action: Action = None,
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, typer.Option(help="At most this many rows.", min=1)] = 100,
    newest_first: Annotated[
        bool, typer.Option("--newest-first", help="The newest rows first (the latest `limit`).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Audit rows, oldest first (or newest first)."""
    filters = _filters(device, correlation_id, actor, action, since, until)
    # Not sent by default: a gateway that has no `order` refuses what it does not know.
    order = "desc" if newest_first else None
    with session() as api:
        items = list(api.items("/audit", limit, **filters, order=order))
    listing(items, COLUMNS, as_json, "no audit rows")


@contextmanager
def _progress(label: str) -> Iterator[Any]:
    """A progress line on stderr (rows written, time); stdout may be the export itself."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(bar_width=None),
        TextColumn("{task.completed:,.0f} rows"),
        TimeElapsedColumn(),
        console=errors,
        transient=False,
    ) as progress:
        task = progress.add_task(label, total=None)
        yield lambda rows: progress.advance(task, rows)


def _export_streamed(api: Api, params: dict[str, Any], out: IO[bytes], advance: Any) -> None:
    header = params["format"] == Format.csv  # its first line is no row
    with api.stream("/audit/export", params=params, read_timeout=None) as response:
        for chunk in response.iter_bytes(CHUNK):
            out.write(chunk)
            lines = chunk.count(b"\n")
            advance(lines - header if lines else 0)
            header = header and not lines


def _export_paged(
    api: Api, params: dict[str, Any], fmt: Format, out: IO[bytes], advance: Any
) -> None:
    """The same rows from the list route, for a gateway without `/audit/export`."""
    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
    writer = csv.DictWriter(text, CSV_FIELDS, extrasaction="ignore") if fmt is Format.csv else None
    if writer:
        writer.writeheader()
    filters = {k: v for k, v in params.items() if k != "format"}
    for row in api.items("/audit", **filters):
        if writer:
            writer.writerow({**row, "detail": json.dumps(row.get("detail") or {})})
        else:
            text.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
        advance(1)
    text.detach()


@app.command("export")
def export(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here (default: stdout).")
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", help="ndjson or csv")] = Format.ndjson,
    device: Device = None,
    correlation_id: Correlation = None,
    actor: Actor = None,
    action: Action = None,
    since: Since = None,
    until: Until = None,
) -> None:
    """Export the audit log (NDJSON or CSV), with a progress line on stderr."""
    params = {"format": fmt.value, **_filters(device, correlation_id, actor, action, since, until)}
    target = output.open("wb") if output else sys.stdout.buffer
    try:
        with session() as api, _progress(f"exporting to {output or 'stdout'}") as advance:
            try:
                _export_streamed(api, params, target, advance)
            except ApiError as exc:
                if not exc.route_missing:
                    raise
                note("this gateway has no /audit/export: reading the audit page by page")
                _export_paged(api, params, fmt, target, advance)
    finally:
        target.flush()
        if output:
            target.close()


@app.command("verify")
def verify(as_json: JsonFlag = False) -> None:
    """Walk the audit chain: are the rows as they were written?"""
    with session() as api:
        try:
            result = api.get("/audit/verify")
        except ApiError as exc:
            if exc.route_missing:
                raise CtlError(
                    "this gateway cannot verify the audit log (GET /api/v1/audit/verify "
                    "answered 404)"
                ) from None
            raise
    if as_json:
        emit_json(result)
    elif result.get("ok"):
        done(result, False, f"audit chain intact: {result.get('checked')} rows checked")
    else:
        bad = result.get("first_bad") or {}
        done(
            result,
            False,
            f"audit chain broken at row {bad.get('id')}: {bad.get('reason')} "
            f"({result.get('checked')} rows checked)",
        )
    if not result.get("ok"):
        raise typer.Exit(1)
