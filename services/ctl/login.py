"""`smarthome login` and `smarthome logout`."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import httpx
import typer

from services.ctl import config
from services.ctl.client import Api, problem_of, session, store_tokens, unreachable
from services.ctl.config import API_PREFIX, Target
from services.ctl.errors import CtlError
from services.ctl.output import JsonFlag, done, note


def login(
    url: Annotated[
        str | None,
        typer.Argument(
            help="The gateway, e.g. http://127.0.0.1:8000 (default: SMARTHOME_URL, or the "
            "last login's)."
        ),
    ] = None,
    username: Annotated[
        str | None, typer.Option("--user", "-u", help="Who signs in (asked for without).")
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Sign in and keep the tokens in the user's config dir (mode 0600)."""
    stored = config.load()
    url = url or os.environ.get(config.URL_ENV) or (stored.url if stored else None)
    if not url:
        url = typer.prompt("gateway URL", default="http://127.0.0.1:8000")
    url = config.normalize_url(url)
    if not username:
        username = typer.prompt("username", default=stored.username if stored else "admin")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("password", hide_input=True)
    form = {"username": username, "password": password, "grant_type": "password"}
    try:
        response = httpx.post(url + API_PREFIX + "/auth/token", data=form, timeout=15)
    except httpx.HTTPError as exc:
        raise unreachable(url, exc) from None
    if response.status_code != 200:
        raise problem_of(response)
    store_tokens(url, username, response.json())
    with session() as api:
        me: dict[str, Any] = api.get("/me")
    done(
        {"url": url, **me},
        as_json,
        f"logged in to {url} as {username} ({me['role']}); "
        f"credentials in {config.credentials_path()}",
    )


def logout(as_json: JsonFlag = False) -> None:
    """Sign out: revoke the login's refresh token and forget the stored credentials."""
    stored = config.load()
    if stored is None:
        raise CtlError("not logged in: nothing to forget")
    api = Api(Target(stored.url, stored.access_token, stored))
    try:
        login = api.fresh()
        assert login is not None
        api.post("/auth/logout", {"refresh_token": login.refresh_token})
        revoked = True
    except CtlError as exc:  # forgotten all the same: the refresh token expires by itself
        note(f"the gateway did not revoke the login ({exc.message})")
        revoked = False
    finally:
        api.close()
    config.forget()
    done(
        {"url": stored.url, "logged_out": True, "revoked": revoked},
        as_json,
        f"logged out of {stored.url}",
    )
