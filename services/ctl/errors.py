"""What goes wrong, as one line on stderr and an exit code: 2 when the CLI was not told
where or as whom (no login), 1 for everything else (a refusal, an unreachable gateway)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec, TypeVar

import typer

P = ParamSpec("P")
R = TypeVar("R")


class CtlError(Exception):
    """A one-line error (`smarthome: ...` on stderr) and exit code 1."""

    exit_code = 1

    @property
    def message(self) -> str:
        return str(self)


class NotLoggedIn(CtlError):
    exit_code = 2


class Unreachable(CtlError):
    pass


class ApiError(CtlError):
    """The API refused: its problem's detail (RFC 9457), and the fields it named."""

    def __init__(self, status: int, problem: Mapping[str, Any], fallback: str) -> None:
        self.status = status
        self.type = str(problem.get("type") or "")
        self.problem = problem
        detail = str(problem.get("detail") or problem.get("title") or fallback)
        fields = [f for f in problem.get("errors") or [] if isinstance(f, dict)]
        unnamed = [
            f"{f.get('field')}: {f.get('message')}"
            for f in fields
            if str(f.get("field")) not in detail
        ]
        super().__init__(f"{status}: {'; '.join([detail, *unnamed])}")

    @property
    def route_missing(self) -> bool:
        """A 404 of the router (this gateway has no such route), not of a missing object."""
        return self.status == 404 and self.type in ("", "about:blank")


def one_line(command: Callable[P, R]) -> Callable[P, R]:
    """The command, its `CtlError`s printed as one line with their exit code."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except CtlError as exc:
            print(f"smarthome: {exc.message}", file=sys.stderr, flush=True)
            raise typer.Exit(exc.exit_code) from None

    return run


class Group(typer.Typer):
    """A Typer app whose commands report a `CtlError` as one line, not a traceback."""

    def command(  # type: ignore[override]  # the same parameters, passed on as they come
        self, *args: Any, **kwargs: Any
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        register = super().command(*args, **kwargs)

        def decorator(function: Callable[P, R]) -> Callable[P, R]:
            register(one_line(function))
            return function

        return decorator
