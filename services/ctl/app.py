"""The operator commands as one Typer app (`smarthome <group> <command>`)."""

from __future__ import annotations

import typer

from services.ctl import audit, deadletters, devices, events, locations, login, rules, status, users
from services.ctl.errors import Group

HELP = (
    "Operate a smarthome platform through its HTTP API. Start with `smarthome login URL`; "
    "every command takes --json for scripts."
)
OPERATE = "Operate a platform (HTTP API)"


def build() -> typer.Typer:
    """A new app with every operator command (the composition root adds the launcher's)."""
    app = Group(
        name="smarthome",
        help=HELP,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.command(rich_help_panel=OPERATE)(login.login)
    app.command(rich_help_panel=OPERATE)(login.logout)
    app.command(rich_help_panel=OPERATE)(status.status)
    groups: list[tuple[str, typer.Typer]] = [
        ("devices", devices.app),
        ("locations", locations.app),
        ("events", events.app),
        ("rules", rules.app),
        ("audit", audit.app),
        ("deadletters", deadletters.app),
        ("users", users.users),
        ("api-keys", users.api_keys),
    ]
    for name, group in groups:
        app.add_typer(group, name=name, rich_help_panel=OPERATE)
    return app


def main() -> None:
    build()(prog_name="smarthome")
