"""`smarthome`: the one command. `up`, `migrate` and `admin` run this machine's platform
(`services.launcher`); every other command operates a platform through its HTTP API
(`services.ctl`). This module only composes the two, which know nothing of each other.
"""

import sys
from collections.abc import Callable

# The launcher's commands and their one-line help (its own `--help` says the rest).
LAUNCHER_COMMANDS = {
    "up": "Run the whole system on this machine: bus, database, services and the demo.",
    "migrate": "Apply database migrations (and the first admin, API keys) and exit.",
    "admin": "Administer accounts from this machine (admin reset-password).",
}
THIS_MACHINE = "Run it on this machine"


def _launch(argv: list[str]) -> None:
    from services.launcher import cli

    cli.main(argv)


def _forward(name: str) -> Callable[..., None]:
    """A Typer command that hands its arguments to the launcher (for `smarthome --help`:
    `main` routes the launcher's commands before Typer sees them)."""
    # Imported here, and no `from __future__ import annotations` in this module: Typer reads
    # the callback's annotation, which must be the class itself.
    import typer

    def forward(ctx: typer.Context) -> None:
        _launch([name, *ctx.args])

    return forward


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    # The launcher parses its own arguments (and `--help`), without the CLI's imports: the
    # container image's migration Job runs `smarthome migrate`.
    if args and args[0] in LAUNCHER_COMMANDS:
        _launch(args)
        return
    from services.ctl.app import build

    app = build()
    for name, summary in LAUNCHER_COMMANDS.items():
        app.command(
            name,
            help=summary,
            rich_help_panel=THIS_MACHINE,
            add_help_option=False,
            context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        )(_forward(name))
    app(args=args, prog_name="smarthome")


if __name__ == "__main__":
    main()
