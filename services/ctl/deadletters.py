"""`smarthome deadletters ...`: messages that could not be decoded or applied."""

from __future__ import annotations

from typing import Annotated

import typer

from services.ctl.client import session
from services.ctl.errors import ApiError, CtlError, Group
from services.ctl.output import Column, JsonFlag, done, listing

app = Group(help="Dead letters: list them, send one back.", no_args_is_help=True)

COLUMNS: list[Column] = [
    ("seq", "seq"),
    ("time", "time"),
    ("original subject", "original_subject"),
    ("consumer", "consumer"),
    ("reason", "reason"),
    ("preview", "preview"),
]
PAGE = 200  # the list's largest page
MISSING = "this gateway does not list dead letters yet (GET /api/v1/deadletters answered 404)"


@app.command("ls")
def list_deadletters(
    subject: Annotated[
        str | None, typer.Option(help="Original subject filter: * one token, > the rest.")
    ] = None,
    consumer: Annotated[str | None, typer.Option(help="Who gave up on them.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many.", min=1)] = None,
    as_json: JsonFlag = False,
) -> None:
    """List dead letters, oldest first (administrators)."""
    with session() as api:
        try:
            items = list(api.items("/deadletters", limit, PAGE, subject=subject, consumer=consumer))
        except ApiError as exc:
            if exc.route_missing:
                raise CtlError(MISSING) from None
            raise
    listing(items, COLUMNS, as_json, "no dead letters")


@app.command("redrive")
def redrive(seq: int, as_json: JsonFlag = False) -> None:
    """Send a dead letter back to its original subject."""
    with session() as api:
        result = api.post(f"/deadletters/{seq}/redrive")
    line = f"redriven {seq} to {result['subject']} ({result['stream']} seq {result['new_seq']})"
    done(result, as_json, line)
