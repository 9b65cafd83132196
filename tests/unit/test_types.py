"""`mypy --strict` on the allow-list of strictly typed modules in pyproject.toml (the first
`[[tool.mypy.overrides]]`, Home Assistant's `.strict-typing`): it only grows."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def strict_modules() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    [strict] = [o for o in config["overrides"] if o.get("disallow_untyped_defs")]
    modules: list[str] = strict["module"]
    return modules


def test_the_allow_list_names_modules_that_exist_in_order() -> None:
    modules = strict_modules()
    assert modules == sorted(set(modules)), "keep the list sorted, each module once"
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    assert not missing, f"not modules: {missing}"


def test_the_strictly_typed_modules_type_check() -> None:
    # mypy's cache (.mypy_cache) keeps a run with nothing changed to about a second.
    targets = [arg for module in strict_modules() for arg in ("-m", module)]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", *targets],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
