"""Traces across the bus: one trace from `POST /events` through the actors' state fact and
the rules' evaluation to the command a rule sends, with the gateway, the actors and the
rules running in this process and an in-memory span exporter installed; and, tracing off,
a client's `traceparent` passed on by the actors unchanged."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
from nats.js.errors import NotFoundError
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from libs import bus, subjects, tracing
from libs import messages as m
from libs.cache import make_cache
from libs.settings import Settings
from services.actors.partitions import ActorPartitions, partition_of
from services.rules.partitions import Partitions
from tests.api import api_client
from tests.helpers import eventually, unique_id
from tests.integration.test_rules import add_devices, add_rule

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.install(None)
        provider.shutdown()


@contextlib.asynccontextmanager
async def actors(nc, sessions, redis_url: str | None) -> AsyncIterator[ActorPartitions]:  # type: ignore[no-untyped-def]
    """The actors in this process, every partition held and bound."""
    cache = make_cache(redis_url)
    partitions = ActorPartitions(nc, sessions, cache, bus.DEFAULT_PARTITIONS)
    stop = asyncio.Event()
    task = asyncio.create_task(partitions.run(stop))
    try:
        await eventually(
            lambda: (
                (len(partitions.workers) == partitions.count and partitions.bound.is_set())
                or task.done()
            ),
            timeout=30,
        )
        assert not task.done(), task
        yield partitions
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await cache.close()


@contextlib.asynccontextmanager
async def rules(nc, js, sessions, settings: Settings) -> AsyncIterator[Partitions]:  # type: ignore[no-untyped-def]
    """The rules' partitions in this process, every one held and bound."""
    partitions = Partitions(nc, js, sessions, settings.rules_partitions)
    stop = asyncio.Event()
    task = asyncio.create_task(partitions.run(stop))
    try:
        await eventually(
            lambda: (
                (len(partitions.held) == len(partitions.engines) and partitions.bound.is_set())
                or task.done()
            ),
            timeout=30,
        )
        assert not task.done(), task
        yield partitions
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def last_headers(js, subject: str) -> dict[str, str] | None:  # type: ignore[no-untyped-def]
    with contextlib.suppress(NotFoundError):
        return dict((await js.get_last_msg(subjects.stream_of(subject), subject)).headers or {})
    return None


def trace_of(traceparent: str) -> str:
    return traceparent.split("-")[1]


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


def batch_spans(spans: InMemorySpanExporter, name: str, trace: str) -> list[ReadableSpan]:
    """The finished `name` spans in `trace` or linked to it."""
    return [
        s
        for s in spans.get_finished_spans()
        if s.name == name
        and (
            hex_trace(s) == trace
            or any(format(link.context.trace_id, "032x") == trace for link in s.links)
        )
    ]


async def test_post_events_to_the_rules_command_is_one_trace(
    spans: InMemorySpanExporter, settings, admin_token, nc, js, sessions, redis_url
) -> None:  # type: ignore[no-untyped-def]
    meter, light = unique_id("meter"), unique_id("light")
    await add_devices(sessions, meter, light)
    spec = m.RuleSpec(
        name="meter draws power: light off",
        trigger=m.ThresholdTrigger(device_id=meter, attribute="power_w", above=1.0),
        actions=[m.CommandAction(device_id=light, action="turn_off")],
    )
    rule_id = await add_rule(sessions, nc, spec)
    command_subject = subjects.commands(light)

    # The app is made after the provider is installed: its HTTP instrumentation is on.
    async with (
        api_client(settings, admin_token) as client,
        actors(nc, sessions, redis_url),
        rules(nc, js, sessions, settings),
    ):
        event = m.make_event(meter, "telemetry", {"power_w": 60.0})
        response = await client.post(
            "/api/v1/events",
            content=m.encode(event),
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 202, response.text
        headers = await eventually(lambda: last_headers(js, command_subject), timeout=30)
        traceparent = headers.get(tracing.TRACEPARENT)
        assert traceparent, headers
        trace = trace_of(traceparent)
        # The fact (and so the command) goes out before the actors' batch commits: their
        # batch span ends after it.
        await eventually(lambda: batch_spans(spans, "actors apply", trace), timeout=15)

    finished = spans.get_finished_spans()
    http = [s for s in finished if s.kind == SpanKind.SERVER and hex_trace(s) == trace]
    assert http, [(s.name, s.kind, hex_trace(s)) for s in finished]
    consumed = {
        (s.attributes or {}).get("messaging.consumer.group.name")
        for s in finished
        if s.kind == SpanKind.CONSUMER and hex_trace(s) == trace
    }
    assert any(str(c).startswith("actors-") for c in consumed), consumed
    facts_durables = {bus.rules_facts_durable(i) for i in range(settings.rules_partitions)}
    assert consumed & facts_durables, consumed
    # A batch span is in the trace of its messages, or linked to each when the batch held
    # another trace's too (the session's stream is shared): its children are in its trace.
    batches = {hex_trace(s) for s in batch_spans(spans, "actors apply", trace)}
    names = {s.name for s in finished if hex_trace(s) == trace or hex_trace(s) in batches}
    assert {"actors apply", "actors decide", "actors write", "rules decide"} <= names, names
    assert "rules action" in names, names
    # The rule's fired fact is in the same trace as its command.
    fired = await last_headers(js, subjects.rule_fired(rule_id))
    assert fired is not None and trace_of(fired[tracing.TRACEPARENT]) == trace


async def test_tracing_off_the_actors_pass_the_clients_traceparent_on(
    nc, js, sessions, redis_url
) -> None:  # type: ignore[no-untyped-def]
    tracing.install(None)
    device = unique_id("meter")
    await add_devices(sessions, device)
    async with actors(nc, sessions, redis_url) as partitions:
        worker = partitions.workers[partition_of(device, partitions.count)]
        seen: list[str | None] = []
        handle = worker.consumer._handle

        async def spying(items):  # type: ignore[no-untyped-def]
            seen.extend(i.traceparent for i in items if i.value.subject == device)
            return await handle(items)

        worker.consumer._handle = spying
        event = m.make_event(device, "telemetry", {"power_w": 5.0})
        await bus.publish(js, event.nats_subject, event, msg_id=event.id, traceparent=CLIENT_PARENT)
        headers = await eventually(lambda: last_headers(js, subjects.device_state(device)))

    assert seen == [CLIENT_PARENT]
    assert headers.get(tracing.TRACEPARENT) == CLIENT_PARENT
