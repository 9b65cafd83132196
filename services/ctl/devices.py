"""`smarthome devices ...`: the registry, approvals and commands."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from services.ctl.client import Api, decode_json, session
from services.ctl.errors import CtlError, Group
from services.ctl.output import Column, JsonFlag, console, done, emit_json, listing, record

app = Group(help="Register, approve, inspect and command devices.", no_args_is_help=True)

COLUMNS: list[Column] = [
    ("id", "id"),
    ("name", "name"),
    ("kind", "kind"),
    ("location", "location"),
    ("lifecycle", "lifecycle"),
    ("connection", "connection"),
    ("state", "state"),
    ("last seen", "last_seen"),
]
DETAIL: list[Column] = [
    *COLUMNS[:5],
    ("enabled", "enabled"),
    *COLUMNS[5:],
    ("attributes", "attributes"),
    ("version", "version"),
    ("actions", lambda d: [a["name"] for a in d.get("actions") or []] or None),
    ("created", "created_at"),
    ("updated", "updated_at"),
]
COMMAND_COLUMNS: list[Column] = [
    ("command", "id"),
    ("device", "device_id"),
    ("action", "action"),
    ("status", "status"),
    ("detail", "detail"),
    ("correlation id", "correlation_id"),
]
SETTLED = ("done", "failed", "expired")
Limit = Annotated[int | None, typer.Option(help="At most this many (default: all).", min=1)]


@app.command("ls")
def list_devices(
    kind: Annotated[str | None, typer.Option(help="light, energy_meter, sensor, ...")] = None,
    location: Annotated[str | None, typer.Option(help="a path prefix: home/ground")] = None,
    state: Annotated[str | None, typer.Option(help="off, active or triggered")] = None,
    connection: Annotated[str | None, typer.Option(help="online or offline")] = None,
    lifecycle: Annotated[str | None, typer.Option(help="pending: waiting for approval")] = None,
    limit: Limit = None,
    as_json: JsonFlag = False,
) -> None:
    """List devices."""
    with session() as api:
        items = list(
            api.items(
                "/devices", limit, kind=kind, location=location, state=state,
                connection=connection, lifecycle=lifecycle,
            )
        )  # fmt: skip
    listing(items, COLUMNS, as_json, "no devices")


@app.command("show")
def show(device_id: str, as_json: JsonFlag = False) -> None:
    """A device: its registry entry and its state."""
    with session() as api:
        device = api.get(f"/devices/{device_id}")
    if as_json:
        emit_json(device)
    else:
        record(device, DETAIL)


@app.command("add")
def add(
    name: Annotated[str, typer.Option(help="A name for people.")],
    kind: Annotated[str, typer.Option(help="light, energy_meter, sensor, ...")],
    device_id: Annotated[
        str | None, typer.Option("--id", help="Its id (default: one is generated).")
    ] = None,
    location: Annotated[str | None, typer.Option(help="home/floor/room")] = None,
    metadata: Annotated[str | None, typer.Option(help="A JSON object.")] = None,
    bridge: Annotated[str | None, typer.Option(help="The bridge that speaks for it.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Register a device; its bus credentials are printed this once."""
    body: dict[str, Any] = {"name": name, "kind": kind, "id": device_id, "location": location}
    if metadata is not None:
        body["metadata"] = decode_json(metadata, "--metadata")
    if bridge is not None:
        body["bridge"] = bridge
    with session() as api:
        device = api.post("/devices", body)
    if as_json:
        emit_json(device)
        return
    console.print(f"registered {device['id']} ({device['kind']})", markup=False)
    if credentials := device.get("credentials"):
        console.print("bus credentials (shown this once):", markup=False)
        record(credentials)


def _lifecycle(device_id: str, lifecycle: str, as_json: bool, verb: str) -> None:
    with session() as api:
        device = api.patch(f"/devices/{device_id}", {"lifecycle": lifecycle})
    done(device, as_json, f"{verb} {device['id']} (lifecycle {device['lifecycle']})")


@app.command("approve")
def approve(device_id: str, as_json: JsonFlag = False) -> None:
    """Approve a pending device (lifecycle active)."""
    _lifecycle(device_id, "active", as_json, "approved")


@app.command("reject")
def reject(device_id: str, as_json: JsonFlag = False) -> None:
    """Reject a pending device."""
    _lifecycle(device_id, "rejected", as_json, "rejected")


@app.command("rm")
def remove(device_id: str, as_json: JsonFlag = False) -> None:
    """Remove a device from the registry."""
    with session() as api:
        api.delete(f"/devices/{device_id}")
    done({"id": device_id, "deleted": True}, as_json, f"removed {device_id}")


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """`level=40 name=x`: each value as JSON when it reads as JSON, else as a string."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CtlError(f"--param {pair!r}: write it as name=value")
        try:
            params[key] = decode_json(value, "value")
        except CtlError:
            params[key] = value
    return params


@app.command("command")
def command(
    device_id: str,
    action: Annotated[str, typer.Argument(help="turn_on, turn_off, set_brightness, ...")],
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="name=value (repeatable).")
    ] = None,
    expires: Annotated[float, typer.Option(help="Seconds until it expires.")] = 60.0,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow it until done, failed or expired.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Send a command to a device."""
    body = {"action": action, "params": parse_params(param or []), "expires_s": expires}
    with session() as api:
        sent = api.post(f"/devices/{device_id}/commands", body)
        if wait:
            sent = _follow(api, sent, expires)
    if as_json:
        emit_json(sent)
    else:
        record(sent, COMMAND_COLUMNS)
    if wait and sent["status"] != "done":
        raise typer.Exit(1)


def _follow(api: Api, command: dict[str, Any], expires_s: float) -> dict[str, Any]:
    path = f"/devices/{command['device_id']}/commands/{command['id']}"
    deadline = time.monotonic() + expires_s + 5
    delay = 0.1
    while command["status"] not in SETTLED and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
        command = api.get(path)
    return command
