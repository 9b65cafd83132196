"""charts/smarthome/README.md's values table, generated from the `# --` comments in values.yaml.

    python tests/deploy/values_table.py          # print the table
    python tests/deploy/values_table.py --write  # rewrite it in the README

A `# -- text` comment right above a key documents it; a documented mapping is one row (its
children are its default). Every leaf must be documented: the tests fail otherwise.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "smarthome"
START = "<!-- values-table:start -->"
END = "<!-- values-table:end -->"
_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z0-9_.$-]+):(?P<rest>.*)$")


class UndocumentedValue(ValueError):
    """A value in values.yaml has no `# --` description."""


def _type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return "null"


def _lookup(values: dict[str, Any], path: list[str]) -> Any:
    node: Any = values
    for part in path:
        node = node[part]
    return node


def rows(values_file: Path = CHART / "values.yaml") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every documented value, in file order."""
    values = yaml.safe_load(values_file.read_text())
    out: list[tuple[str, str, str, str]] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    documented_prefix: list[str] | None = None
    description: str | None = None
    undocumented: list[str] = []
    for line in values_file.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            description = stripped[len("# --") :].strip()
            continue
        if stripped.startswith("#") or not stripped or stripped.startswith("- "):
            continue
        m = _KEY.match(line)
        if not m:
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [m["key"]]
        stack.append((indent, m["key"]))
        if documented_prefix is not None and path[: len(documented_prefix)] == documented_prefix:
            description = None
            continue
        documented_prefix = None
        value = _lookup(values, path)
        if description is not None:
            out.append((".".join(path), _type(value), json.dumps(value), description))
            if isinstance(value, dict) and value:
                documented_prefix = path
        elif not (isinstance(value, dict) and value):
            undocumented.append(".".join(path))
        description = None
    if undocumented:
        raise UndocumentedValue(
            "values.yaml keys without a `# --` description: " + ", ".join(undocumented)
        )
    return out


def table() -> str:
    lines = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for key, kind, default, text in rows():
        cell, text = default.replace("|", "\\|"), text.replace("|", "\\|")
        lines.append(f"| `{key}` | {kind} | `{cell}` | {text} |")
    return "\n".join(lines)


def readme_with_table(readme: str) -> str:
    head, _, rest = readme.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    if "--write" in sys.argv:
        path = CHART / "README.md"
        path.write_text(readme_with_table(path.read_text()))
    else:
        print(table())
