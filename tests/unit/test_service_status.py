"""What a reader makes of a process's status entry: ready as written, gone once it missed
three writes; and who a process says it is."""

from __future__ import annotations

import os

import msgspec
import pytest

from libs import service_status as st
from libs.service_status import ServiceState, ServiceStatus


def status(at: float = 1000.0, every_s: float = 5.0, **fields: object) -> ServiceStatus:
    base = ServiceStatus(
        name="actors",
        instance="host-1",
        state=ServiceState.READY,
        ready=True,
        why_not_ready=None,
        restarts=0,
        started_at=900.0,
        at=at,
        every_s=every_s,
        version="0.1.0",
        metrics_url="http://127.0.0.1:9100/metrics",
    )
    return msgspec.structs.replace(base, **fields)


def test_an_entry_rewritten_in_time_is_shown_as_written() -> None:
    assert st.seen(status(at=1000.0), now=1014.9) == status(at=1000.0)


def test_an_entry_that_missed_three_writes_is_gone_and_not_ready() -> None:
    gone = st.seen(status(at=1000.0), now=1015.1)

    assert (gone.state, gone.ready) == (ServiceState.GONE, False)
    assert gone.why_not_ready == "no word from it for 15 s"


def test_a_shorter_interval_is_gone_sooner() -> None:
    assert st.seen_state(status(at=1000.0, every_s=0.2), now=1000.7) is ServiceState.GONE


@pytest.mark.parametrize(
    ("reason", "was_ready", "state"),
    [
        (None, False, ServiceState.READY),
        ("the database is unreachable", False, ServiceState.STARTING),
        ("the database is unreachable", True, ServiceState.NOT_READY),
    ],
)
def test_a_process_is_starting_until_first_ready(
    reason: str | None, was_ready: bool, state: ServiceState
) -> None:
    assert st.state_of(reason, was_ready) is state


def test_a_key_keeps_only_what_kv_keys_allow() -> None:
    assert st.key("rules", "pod.rules-7f9/x") == "rules.pod_rules-7f9_x"


def test_an_entry_written_by_a_newer_version_is_still_read() -> None:
    newer = msgspec.json.encode(status()).replace(b"{", b'{"added_later":1,', 1)

    assert st.decode(newer) == status()


def test_identity_from_the_launchers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(st.RESTARTS_ENV, "2")
    monkeypatch.setenv(st.INSTANCE_ENV, "laptop")

    me = st.identity("recorder", "127.0.0.1", 9100)

    assert (me.key, me.restarts) == ("recorder.laptop", 2)
    assert me.metrics_url == "http://127.0.0.1:9100/metrics"


def test_identity_without_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(st.RESTARTS_ENV, raising=False)
    monkeypatch.delenv(st.INSTANCE_ENV, raising=False)

    me = st.identity("webhooks", "0.0.0.0", 0)

    assert me.restarts == 0 and me.instance.endswith(f"-{os.getpid()}")
    assert me.metrics_url is None  # no health port: no metrics served


def test_a_wildcard_listener_is_advertised_by_the_hosts_address() -> None:
    assert st.advertised("0.0.0.0") not in ("", "0.0.0.0")
    assert st.advertised("10.0.0.7") == "10.0.0.7"
    assert st.advertised("::1") == "[::1]"
