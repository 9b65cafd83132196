"""The lag a process reports to `/system/services` is what its `/metrics` shows: the same
gauges, read from its registry."""

from __future__ import annotations

import msgspec
from prometheus_client import CollectorRegistry, Gauge

from libs import service_status as st
from libs.service_status import ConsumerLag


def gauges(registry: CollectorRegistry) -> tuple[Gauge, Gauge]:
    labels = ["stream", "consumer"]
    pending = Gauge(st.PENDING_METRIC, "pending", labels, registry=registry)
    ack = Gauge(st.ACK_PENDING_METRIC, "ack pending", labels, registry=registry)
    return pending, ack


def test_each_consumer_of_the_gauges_is_reported_with_its_numbers() -> None:
    registry = CollectorRegistry()
    pending, ack = gauges(registry)
    pending.labels("EVENTS", "actors-0").set(12)
    ack.labels("EVENTS", "actors-0").set(3)
    pending.labels("SYSTEM", "recorder-system").set(0)
    ack.labels("SYSTEM", "recorder-system").set(0)

    assert st.consumer_lag(registry) == [
        ConsumerLag(stream="EVENTS", consumer="actors-0", pending=12, ack_pending=3),
        ConsumerLag(stream="SYSTEM", consumer="recorder-system", pending=0, ack_pending=0),
    ]


def test_a_consumer_without_the_ack_pending_gauge_reports_it_unknown() -> None:
    registry = CollectorRegistry()
    pending = Gauge(st.PENDING_METRIC, "pending", ["stream", "consumer"], registry=registry)
    pending.labels("EVENTS", "actors-1").set(5)

    assert st.consumer_lag(registry) == [
        ConsumerLag(stream="EVENTS", consumer="actors-1", pending=5, ack_pending=None)
    ]


def test_a_process_without_consumers_reports_none() -> None:
    assert st.consumer_lag(CollectorRegistry()) == []


def test_an_entry_written_before_the_lag_was_reported_still_reads() -> None:
    older = (
        b'{"name":"actors","instance":"h","state":"ready","ready":true,"why_not_ready":null,'
        b'"restarts":0,"started_at":1.0,"at":2.0,"every_s":5.0,"version":"0","metrics_url":null}'
    )
    assert st.decode(older).consumers == []
    assert msgspec.json.decode(older)["name"] == "actors"
