"""The work that can wait runs at a lower CPU priority under `smarthome up`
(SMARTHOME_BACKGROUND_NICE): a child started with `nice` runs that much nicer than the
launcher, and the setting is checked before anything starts."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

from libs import settings
from libs.settings import Settings
from services.launcher.cli import SERVICES, nice_of
from services.launcher.supervisor import Child


async def _niceness_of_child(tmp_path: Path, nice: int) -> int:
    log = tmp_path / "child.log"
    argv = [sys.executable, "-c", "import os; print(os.nice(0))"]
    child = Child("probe", argv, {}, log, nice=nice)
    await child.start()
    assert child.proc is not None
    assert await child.proc.wait() == 0, log.read_text()
    return int(log.read_text().strip())


async def test_a_child_runs_nicer_than_the_launcher_by_its_nice(tmp_path: Path) -> None:
    mine = os.nice(0)
    assert await _niceness_of_child(tmp_path, 7) == min(19, mine + 7)


async def test_a_child_without_nice_runs_as_the_launcher(tmp_path: Path) -> None:
    assert await _niceness_of_child(tmp_path, 0) == os.nice(0)


POSTGRES = "postgresql://smarthome@127.0.0.1:5432/smarthome"  # read, never connected to


def test_only_the_recorder_is_background_and_zero_turns_it_off() -> None:
    s = Settings(data_dir=Path("/tmp/unused"), database_url=POSTGRES)
    assert {name: nice_of(name, s) for name in SERVICES} == {
        name: 19 if name == "recorder" else 0 for name in SERVICES
    }
    alike = dataclasses.replace(s, background_nice=0)
    assert {nice_of(name, alike) for name in SERVICES} == {0}


def test_on_sqlite_the_recorder_runs_as_the_others() -> None:
    # One write lock for the database: a starved recorder holding it would stall the actors.
    s = Settings(data_dir=Path("/tmp/unused"), background_nice=19)
    assert s.effective_database_url.startswith("sqlite")
    assert {nice_of(name, s) for name in SERVICES} == {0}


def test_the_setting_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTHOME_BACKGROUND_NICE", "5")
    assert settings.load().background_nice == 5


@pytest.mark.parametrize("raw", ["20", "-1", "2.5", "low"])
def test_a_niceness_out_of_range_names_the_variable(
    raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMARTHOME_BACKGROUND_NICE", raw)
    with pytest.raises(settings.SettingsError, match="SMARTHOME_BACKGROUND_NICE"):
        settings.load()
