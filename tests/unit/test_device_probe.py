"""devices/probe.py: what Kubernetes' exec probes conclude from a device's heartbeat file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from devices import probe
from devices.probe import Check, Heartbeat

NOW = 1_000_000.0


@pytest.mark.parametrize(
    ("check", "beat", "max_age", "why"),
    [
        (Check.LIVE, None, 20, "no heartbeat yet"),
        (Check.READY, None, 15, "no heartbeat yet"),
        (Check.LIVE, Heartbeat(NOW - 3), 20, None),
        (Check.LIVE, Heartbeat(NOW - 21), 20, "heartbeat written 21s ago (at most 20s)"),
        # Live whether or not the bus answers: a restart would not bring the bus back.
        (Check.LIVE, Heartbeat(NOW - 1, bus_acked_at=NOW - 3600), 20, None),
        (Check.READY, Heartbeat(NOW - 1), 15, "the bus has acknowledged nothing yet"),
        (Check.READY, Heartbeat(NOW - 1, bus_acked_at=NOW - 4), 15, None),
        (
            Check.READY,
            Heartbeat(NOW - 1, bus_acked_at=NOW - 40),
            15,
            "the bus last acknowledged us 40s ago (at most 15s)",
        ),
    ],
)
def test_a_probe_passes_only_on_a_fresh_enough_heartbeat(
    check: Check, beat: Heartbeat | None, max_age: float, why: str | None
) -> None:
    assert probe.verdict(check, beat, max_age, NOW) == why


def test_the_file_is_replaced_whole_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "heartbeat.json"
    assert probe.read(path) is None
    probe.write(path, Heartbeat(NOW, bus_acked_at=NOW - 1))
    probe.write(path, Heartbeat(NOW + 2, bus_acked_at=NOW + 1))
    assert probe.read(path) == Heartbeat(NOW + 2, bus_acked_at=NOW + 1)
    assert [p.name for p in tmp_path.iterdir()] == ["heartbeat.json"], "a temporary file is left"


def test_the_command_exits_0_when_fresh_and_1_with_the_reason_when_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "heartbeat.json"
    assert probe.main(["live", str(path), "20"]) == 1
    assert capsys.readouterr().out == "live: no heartbeat yet\n"

    probe.write(path, Heartbeat(time.time()))
    assert probe.main(["live", str(path), "20"]) == 0
    assert probe.main(["ready", str(path), "15"]) == 1
    assert "the bus has acknowledged nothing yet" in capsys.readouterr().out

    probe.write(path, Heartbeat(time.time(), bus_acked_at=time.time()))
    assert probe.main(["ready", str(path), "15"]) == 0


def test_an_unreadable_file_fails_the_probe_with_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "heartbeat.json"
    path.write_text('{"written_at": "yesterday"}')
    assert probe.main(["live", str(path), "20"]) == 1
    assert capsys.readouterr().out.startswith(f"live: unreadable heartbeat file {path}:")


@pytest.mark.parametrize("argv", [[], ["alive", "f", "3"], ["live", "f"], ["live", "f", "soon"]])
def test_a_wrong_command_line_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert probe.main(argv) == 2
    usage = "usage: python -m devices.probe live|ready FILE MAX_AGE_SECONDS"
    assert usage in capsys.readouterr().err


def test_no_heartbeat_file_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMARTHOME_DEVICE_HEARTBEAT_FILE", raising=False)
    assert probe.heartbeat_file() is None
    monkeypatch.setenv("SMARTHOME_DEVICE_HEARTBEAT_FILE", "/tmp/heartbeat.json")
    assert probe.heartbeat_file() == Path("/tmp/heartbeat.json")
