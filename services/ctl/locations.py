"""`smarthome locations ...`: homes, floors and rooms."""

from __future__ import annotations

from typing import Annotated

import typer

from services.ctl.client import session
from services.ctl.errors import Group
from services.ctl.output import Column, JsonFlag, done, listing

app = Group(help="Homes, floors and rooms.", no_args_is_help=True)

COLUMNS: list[Column] = [
    ("path", "path"),
    ("id", "id"),
    ("name", "name"),
    ("kind", "kind"),
    ("parent", "parent_id"),
]


@app.command("ls")
def list_locations(
    kind: Annotated[str | None, typer.Option(help="home, floor or room")] = None,
    parent: Annotated[str | None, typer.Option(help="Only what is in this location.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """List locations, a home before what is in it."""
    with session() as api:
        items = list(api.items("/locations", kind=kind, parent_id=parent))
    listing(items, COLUMNS, as_json, "no locations")


@app.command("add")
def add(
    name: str,
    kind: Annotated[str, typer.Option(help="home, floor or room")],
    parent: Annotated[
        str | None, typer.Option(help="The home (or floor) it is in; none for a home.")
    ] = None,
    location_id: Annotated[
        str | None, typer.Option("--id", help="Its id (default: one is generated).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Define a home, a floor or a room."""
    body = {"name": name, "kind": kind, "id": location_id, "parent_id": parent}
    with session() as api:
        location = api.post("/locations", body)
    done(location, as_json, f"added {location['kind']} {location['id']} ({location['path']})")


@app.command("rm")
def remove(location_id: str, as_json: JsonFlag = False) -> None:
    """Delete an empty location."""
    with session() as api:
        api.delete(f"/locations/{location_id}")
    done({"id": location_id, "deleted": True}, as_json, f"removed {location_id}")
