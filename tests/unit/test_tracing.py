"""Tracing's set-up by OTEL_* variables, and trace context carried from message to message."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from libs import logs, tracing

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.install(None)


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"},
            False,
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                "OTEL_TRACES_EXPORTER": "none",
            },
            False,
        ),
    ],
)
def test_tracing_is_on_only_when_an_exporter_is_named(env: dict[str, str], on: bool) -> None:
    assert tracing.exporter_configured(env) is on


def test_off_by_default_costs_no_span_and_names_no_trace() -> None:
    tracing.install(None)
    assert not tracing.enabled()
    assert tracing.current_traceparent() is None
    assert tracing.trace_id() is None
    with tracing.span("work") as current:
        assert current is None


def test_a_consumed_message_continues_the_publishers_trace(spans: InMemorySpanExporter) -> None:
    span = tracing.start_consumed("consume events.d1.state", {"traceparent": CLIENT_PARENT})
    onward = tracing.traceparent_of(span)
    tracing.end(span)

    (finished,) = spans.get_finished_spans()
    assert format(finished.context.trace_id, "032x") == CLIENT_TRACE
    assert (
        finished.parent is not None
        and format(finished.parent.span_id, "016x") == "00f067aa0ba902b7"
    )
    # The next hop is a child of this span, in the same trace.
    assert onward is not None and onward.split("-")[1] == CLIENT_TRACE
    assert onward.split("-")[2] == format(finished.context.span_id, "016x")


def test_a_message_without_context_starts_a_new_trace(spans: InMemorySpanExporter) -> None:
    span = tracing.start_consumed("consume", None)
    tracing.end(span, error="refused")
    (finished,) = spans.get_finished_spans()
    assert finished.parent is None
    assert not finished.status.is_ok


def test_the_current_span_is_what_a_publish_carries_and_what_logs_name(
    spans: InMemorySpanExporter,
) -> None:
    with tracing.span("POST /events") as current:
        assert current is not None
        header = tracing.current_traceparent()
        assert header is not None
        assert header.split("-")[1] == tracing.trace_id()
    assert tracing.trace_id() is None  # outside the span


def log_line(**event: Any) -> dict[str, Any]:
    return dict(logs.add_trace_ids(None, "info", dict(event)))


def test_a_log_line_inside_a_span_names_its_trace_and_span(spans: InMemorySpanExporter) -> None:
    with tracing.span("rules decide") as current:
        assert current is not None
        line = log_line(event="fired", correlation_id="c-1")
    context = current.get_span_context()
    assert line == {
        "event": "fired",
        "correlation_id": "c-1",
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
    }
    assert log_line(event="idle") == {"event": "idle"}  # outside any span


def test_tracing_off_a_log_line_names_the_trace_passed_on(spans: InMemorySpanExporter) -> None:
    tracing.install(None)
    assert log_line(event="idle") == {"event": "idle"}
    with tracing.caused_by(CLIENT_PARENT, "rules decide"):
        assert tracing.current_traceparent() == CLIENT_PARENT
        line = log_line(event="fired")
    assert line == {"event": "fired", "trace_id": CLIENT_TRACE, "span_id": "00f067aa0ba902b7"}
    assert tracing.current_traceparent() is None


def test_caused_by_makes_what_follows_a_child_of_the_message(spans: InMemorySpanExporter) -> None:
    with tracing.caused_by(CLIENT_PARENT, "rules decide"):
        onward = tracing.current_traceparent()
    (decided,) = spans.get_finished_spans()
    assert format(decided.context.trace_id, "032x") == CLIENT_TRACE  # type: ignore[union-attr]
    assert onward is not None
    assert onward.split("-")[2] == format(decided.context.span_id, "016x")  # type: ignore[union-attr]


def test_a_batch_span_is_the_child_of_one_message_or_linked_to_many(
    spans: InMemorySpanExporter,
) -> None:
    other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with tracing.batch("actors apply", [CLIENT_PARENT, None, CLIENT_PARENT]):
        pass
    with tracing.batch("actors apply", [CLIENT_PARENT, other]):
        pass
    one, many = spans.get_finished_spans()
    assert format(one.context.trace_id, "032x") == CLIENT_TRACE  # type: ignore[union-attr]
    assert not one.links
    assert many.parent is None
    assert {format(link.context.trace_id, "032x") for link in many.links} == {
        CLIENT_TRACE,
        "0af7651916cd43dd8448eb211c80319c",
    }


def test_setup_happens_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "_configured", True)
    assert tracing.setup("gateway", {})  # the first call's provider stays
