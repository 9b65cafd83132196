"""The streams' byte budgets: their shares of the bus's store, the size setting they come
from (as nats-server and Kubernetes write sizes), and the launcher passing on the size it
actually gave the embedded bus."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from libs import bus, embedded_nats, settings, subjects
from services.launcher import cli

GIB = 1024**3


def test_each_stream_gets_its_share_and_the_rest_is_headroom() -> None:
    budgets = bus.stream_budgets(10 * GIB)
    assert set(budgets) == {config.name for config in bus.STREAMS}
    assert budgets[subjects.EVENTS_STREAM] == 4 * GIB
    assert budgets[subjects.SYSTEM_STREAM] == 4 * GIB
    assert budgets[subjects.COMMANDS_STREAM] == budgets[subjects.DEADLETTER_STREAM] == GIB // 2
    # nats-server reserves them out of its limit: they must leave room for the KV buckets.
    assert sum(budgets.values()) <= 0.9 * 10 * GIB
    assert pytest.approx(0.9) == bus.BUDGETED_SHARE


def test_budgets_never_round_up_past_the_store() -> None:
    for store in (1024 * 1024, 8 * 1024 * 1024 + 7, 9 * GIB - 1):
        assert sum(bus.stream_budgets(store).values()) <= bus.BUDGETED_SHARE * store


@pytest.mark.parametrize(
    ("raw", "size"),
    [
        ("9Gi", 9 * GIB),
        ("900Mi", 900 * 1024**2),
        ("10GB", 10 * GIB),
        ("512MiB", 512 * 1024**2),
        ("10G", 10 * 1000**3),
        ("500m", 500 * 1000**2),
        ("8388608", 8388608),
        ("1Ti", 1024**4),
    ],
)
def test_sizes_read_as_nats_server_and_kubernetes_read_them(
    raw: str, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMARTHOME_NATS_MAX_STORE", raw)
    assert settings.load().nats_max_store == size


@pytest.mark.parametrize("raw", ["", "auto", "AUTO"])
def test_auto_leaves_the_size_to_the_launcher(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTHOME_NATS_MAX_STORE", raw)
    assert settings.load().nats_max_store is None


@pytest.mark.parametrize(
    ("raw", "says"),
    [("9 gigs", "must be 'auto' or a size like"), ("512Ki", "must be at least 1MB")],
)
def test_a_bad_size_names_the_variable(
    raw: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMARTHOME_NATS_MAX_STORE", raw)
    with pytest.raises(settings.SettingsError, match=f"SMARTHOME_NATS_MAX_STORE.*{says}"):
        settings.load()


def _config_limit(data_dir: Path) -> int:
    found = re.search(r"max_file_store: (\d+)", (data_dir / "nats-server.conf").read_text())
    assert found
    return int(found[1])


async def test_the_launcher_tells_the_services_the_size_the_bus_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `auto` the size is measured at start: the services get that number of bytes
    (the gateway shares it out), which they read back as the same size."""

    async def written_only(child: cli.Child) -> None:  # the config, not a server
        assert child.before_start is not None
        child.before_start()

    monkeypatch.setattr(cli.Child, "start", written_only)
    monkeypatch.setattr(embedded_nats, "wait_for_server", lambda *_: None)
    monkeypatch.setenv("SMARTHOME_NATS_MAX_STORE", "auto")
    s = dataclasses.replace(settings.load(), data_dir=tmp_path)

    _, used = await cli._start_bus(s, embedded_nats.free_port(), 0)
    env = cli.child_env(s, "nats://127.0.0.1:4222", 8000, used)

    assert used == _config_limit(tmp_path) > 0
    assert env["SMARTHOME_NATS_MAX_STORE"] == str(used)
    monkeypatch.setenv("SMARTHOME_NATS_MAX_STORE", env["SMARTHOME_NATS_MAX_STORE"])
    assert settings.load().nats_max_store == used


def test_an_external_bus_keeps_the_size_as_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTHOME_NATS_MAX_STORE", "20Gi")
    env = cli.child_env(settings.load(), "nats://bus:4222", 8000)
    assert env["SMARTHOME_NATS_MAX_STORE"] == "20Gi"


def _stream_meta(data_dir: Path, name: str, max_bytes: int) -> None:
    """A stream as nats-server keeps it on disk (its `meta.inf`)."""
    meta = embedded_nats.store_dir(data_dir) / "jetstream" / "$G" / "streams" / name / "meta.inf"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"name": name, "storage": "file", "max_bytes": max_bytes}))


def test_the_bus_is_never_given_less_than_its_streams_reserve(tmp_path: Path) -> None:
    """nats-server refuses to change any stream while the budgets reserve more than its
    limit: a smaller store applies once the gateway has lowered the budgets to it."""
    old_store = 10 * 1024**2
    for name, budget in bus.stream_budgets(old_store).items():
        _stream_meta(tmp_path, name, budget)
    _stream_meta(tmp_path, "KV_leases", -1)  # no budget: reserves nothing

    assert cli.server_store(tmp_path, 4 * 1024**2) == pytest.approx(old_store, abs=1)
    assert cli.server_store(tmp_path, 19 * 1024**2 // 2) == 19 * 1024**2 // 2  # within headroom
    assert cli.server_store(tmp_path, 20 * 1024**2) == 20 * 1024**2
    assert cli.server_store(tmp_path / "empty", 4 * 1024**2) == 4 * 1024**2


def test_auto_store_is_half_the_volume_and_stays_so_as_the_streams_fill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auto` is half of what the store could have: streams filling their budgets (space
    moving from free to used) do not grow it start after start; never below what it holds."""
    volume = 10_000_000
    store = tmp_path / "jetstream"
    store.mkdir()

    def usage(_: Path) -> shutil._ntuple_diskusage:
        used = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        return shutil._ntuple_diskusage(volume, used, volume - used)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    first = embedded_nats.max_store(store)
    assert first == volume // 2
    (store / "block").write_bytes(b"x" * int(first * bus.BUDGETED_SHARE))  # budgets full
    assert embedded_nats.max_store(store) == first
    (store / "more").write_bytes(b"x" * first)  # stored beyond it: must still load it all
    assert embedded_nats.max_store(store) == sum(f.stat().st_size for f in store.iterdir())
