"""What commands print: Rich tables for people, JSON for scripts (`--json`)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")
]

# Rich finds sys.stdout when it prints (a test runner may have swapped it).
console = Console(highlight=False, soft_wrap=False)
errors = Console(stderr=True, highlight=False)

_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$")

# A column: its header and how to read it from an item (a key, `a.b` for nested ones).
Column = tuple[str, str | Callable[[Mapping[str, Any]], Any]]


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def json_line(data: Any) -> None:
    """One JSON document per line (NDJSON), flushed: for a stream read by another program."""
    sys.stdout.write(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def note(text: str) -> None:
    """A line for the person at the terminal, on stderr (stdout stays the data)."""
    errors.print(text, markup=False)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        if match := _TIME.match(value):  # a timestamp, to the second
            return match[1].replace("T", " ") + ("Z" if match[3] in ("Z", "+00:00") else "")
        return value
    if isinstance(value, list):
        return ", ".join(cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False) if value else "-"
    return str(value)


def read(item: Mapping[str, Any], how: str | Callable[[Mapping[str, Any]], Any]) -> Any:
    if callable(how):
        return how(item)
    value: Any = item
    for key in how.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def table(items: Iterable[Mapping[str, Any]], columns: Sequence[Column], title: str = "") -> None:
    t = Table(title=title or None, title_justify="left", header_style="bold")
    for i, (header, _) in enumerate(columns):
        # The first column is what people copy into the next command: never folded.
        t.add_column(header, overflow="fold", no_wrap=i == 0)
    for item in items:
        t.add_row(*(cell(read(item, how)) for _, how in columns))
    console.print(t)


def columns_of(items: Sequence[Mapping[str, Any]]) -> list[Column]:
    """Columns for items of a shape this CLI does not know in advance: their plain fields."""
    if not items:
        return []
    return [(k, k) for k, v in items[0].items() if not isinstance(v, dict | list) or not v]


def record(item: Mapping[str, Any], fields: Sequence[Column] | None = None) -> None:
    """One object as `field  value` lines."""
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for header, how in fields or [(k, k) for k in item]:
        t.add_row(header, cell(read(item, how)))
    console.print(t)


def listing(
    items: list[Mapping[str, Any]],
    columns: Sequence[Column],
    as_json: bool,
    empty: str,
    title: str = "",
) -> None:
    """A list: a JSON array, or a table (or a line saying that there is nothing)."""
    if as_json:
        emit_json(items)
    elif not items:
        note(empty)
    else:
        table(items, columns, title)


def done(data: Any, as_json: bool, line: str) -> None:
    """The result of a change: its JSON, or one line."""
    if as_json:
        emit_json(data)
    else:
        console.print(line, markup=False)
