"""`smarthome users ...` and `smarthome api-keys ...` (administrators)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from services.ctl.client import Api, session
from services.ctl.errors import CtlError, Group
from services.ctl.output import Column, JsonFlag, console, done, emit_json, listing, record

users = Group(help="People who sign in (administrators only).", no_args_is_help=True)
api_keys = Group(help="Keys for integrations (administrators only).", no_args_is_help=True)

USER_COLUMNS: list[Column] = [
    ("id", "id"),
    ("username", "username"),
    ("role", "role"),
    ("homes", "homes"),
    ("created", "created_at"),
]
KEY_COLUMNS: list[Column] = [
    ("id", "id"),
    ("name", "name"),
    ("role", "role"),
    ("homes", "homes"),
    ("created by", "created_by"),
    ("expires", "expires_at"),
    ("revoked", "revoked_at"),
]
Role = Annotated[str, typer.Option(help="admin, installer or resident")]
Homes = Annotated[
    list[str] | None, typer.Option("--home", help="A home it may act in (repeatable).")
]


@users.command("ls")
def list_users(as_json: JsonFlag = False) -> None:
    """List users."""
    with session() as api:
        items = list(api.items("/users"))
    listing(items, USER_COLUMNS, as_json, "no users")


@users.command("add")
def add_user(
    username: str,
    role: Role,
    home: Homes = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Add a user (the password is asked for, or read from stdin)."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    body = {"username": username, "password": password, "role": role, "homes": home or []}
    with session() as api:
        user = api.post("/users", body)
    done(user, as_json, f"added {user['role']} {user['username']} ({user['id']})")


def _user_id(api: Api, user: str) -> str:
    """A user's id, given its id or its username."""
    for item in api.items("/users"):
        if user in (item["id"], item["username"]):
            return str(item["id"])
    raise CtlError(f"no user {user!r}")


@users.command("rm")
def remove_user(
    user: Annotated[str, typer.Argument(help="Its id or username.")], as_json: JsonFlag = False
) -> None:
    """Remove a user and end its sessions."""
    with session() as api:
        user_id = _user_id(api, user)
        api.delete(f"/users/{user_id}")
    done({"id": user_id, "deleted": True}, as_json, f"removed {user}")


@api_keys.command("ls")
def list_keys(as_json: JsonFlag = False) -> None:
    """List API keys (never their secrets)."""
    with session() as api:
        items = list(api.items("/api-keys"))
    listing(items, KEY_COLUMNS, as_json, "no API keys")


@api_keys.command("add")
def add_key(
    name: str,
    role: Role,
    home: Homes = None,
    expires_at: Annotated[
        str | None, typer.Option(help="ISO 8601 time with a zone (default: never).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Make an API key; the key is printed this once."""
    body: dict[str, Any] = {"name": name, "role": role, "homes": home or []}
    if expires_at:
        body["expires_at"] = expires_at
    with session() as api:
        key = api.post("/api-keys", body)
    if as_json:
        emit_json(key)
        return
    record(key, [("id", "id"), ("name", "name"), ("role", "role"), ("homes", "homes")])
    console.print(f"key (shown this once): {key['key']}", markup=False)


@api_keys.command("rm")
def revoke_key(key_id: str, as_json: JsonFlag = False) -> None:
    """Revoke an API key."""
    with session() as api:
        api.delete(f"/api-keys/{key_id}")
    done({"id": key_id, "revoked": True}, as_json, f"revoked {key_id}")
