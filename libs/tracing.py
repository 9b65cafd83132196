"""Traces across the bus: OpenTelemetry, configured only by the standard `OTEL_*` variables.

Off by default, and then free: no provider is installed, no span is made, and a message's
`traceparent` header is passed on as it came (so a trace begun by a client still reaches
the next hop). On when an exporter is named — `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (OTLP over HTTP), or `OTEL_TRACES_EXPORTER=console` —
unless `OTEL_SDK_DISABLED=true`. The service name, resource attributes and sampler come
from `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_TRACES_SAMPLER[_ARG]` as the
SDK reads them.

W3C `traceparent` travels in NATS headers (`libs.bus.headers` puts the current one on every
publish); the consumer runtime starts one span per message as the child of the message's
(`start_consumed`), and what the worker publishes because of it carries that span's
(`Item.traceparent`, given explicitly, or made current with `caused_by`). Work done for a
whole batch at once is one span (`batch`): the child of its messages' span when they share
one, else linked to each. Log lines name the current trace (`current_ids`, `libs.logs`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer

TRACEPARENT = "traceparent"
_provider: trace.TracerProvider | None = None
_tracer: Tracer | None = None
_configured = False  # `setup` installed the exporter's provider (once per process)
# Tracing off: the `traceparent` a message came with, passed on by what it causes.
_passed: ContextVar[str | None] = ContextVar("smarthome_traceparent", default=None)


def exporter_configured(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment names somewhere to send spans (and does not disable the SDK)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() in {"none"}:
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or env.get("OTEL_TRACES_EXPORTER", "").strip().lower() in {"otlp", "console"}
    )


def setup(service: str, env: Mapping[str, str] = os.environ) -> bool:
    """Install the SDK's provider when an exporter is configured; True if tracing is on.
    Once per process: a second call (an app factory called again) keeps the first one's."""
    global _configured
    if _configured:
        return True
    if not exporter_configured(env):
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    # OTEL_SERVICE_NAME, when set, wins over the default: Resource.create merges it last.
    resource = Resource.create({SERVICE_NAME: f"smarthome-{service}"})
    provider = TracerProvider(resource=resource)
    exporter: SpanExporter
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    install(provider)
    _configured = True
    return True


def install(provider: trace.TracerProvider | None) -> None:
    """Trace with `provider` (None: tracing off). Tests install one with an in-memory
    exporter; `setup` installs the configured one."""
    global _provider, _tracer
    _provider = provider
    _tracer = provider.get_tracer("smarthome") if provider is not None else None


def enabled() -> bool:
    return _tracer is not None


def provider() -> trace.TracerProvider | None:
    """The provider `install` was given, for the gateway's HTTP instrumentation."""
    return _provider


def tracer() -> Tracer:
    return _tracer or trace.get_tracer("smarthome")


def parent(headers: Mapping[str, str] | None) -> Context:
    """The trace context a message's headers carry (empty when they carry none)."""
    return propagate.extract(headers or {})


def traceparent_of(span: Span) -> str | None:
    """The `traceparent` header value that makes the next hop a child of `span`."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get(TRACEPARENT)


def current_traceparent() -> str | None:
    """The `traceparent` of the current span, for a message published now (None outside
    any span). Tracing off: the one `caused_by` passes on, if any."""
    if _tracer is None:
        return _passed.get()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get(TRACEPARENT)


def start_consumed(
    name: str,
    headers: Mapping[str, str] | None,
    attributes: Mapping[str, str | int] | None = None,
    **more: str,
) -> Span:
    """A span for handling one consumed message, the child of the message's trace (the
    caller ends it). Only when tracing is on."""
    return tracer().start_span(
        name,
        context=parent(headers),
        kind=SpanKind.CONSUMER,
        attributes={**(attributes or {}), **more},
    )


@contextmanager
def caused_by(traceparent: str | None, name: str, **attributes: str) -> Iterator[None]:
    """While the block runs, what is published (and every task created) continues the trace
    of `traceparent`: tracing on, inside a span `name` that is its child; off, by passing
    `traceparent` itself on (nothing at all without one)."""
    if _tracer is None:
        if traceparent is None:
            yield
            return
        token = _passed.set(traceparent)
        try:
            yield
        finally:
            _passed.reset(token)
        return
    carrier = {TRACEPARENT: traceparent} if traceparent else None
    with _tracer.start_as_current_span(name, context=parent(carrier), attributes=attributes):
        yield


def end(span: Span, error: str | None = None) -> None:
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


# What `batch` and `span` give when tracing is off: one shared context that does nothing. A
# generator's context (`contextmanager`) costs a generator and two calls into it a block,
# several blocks a batch: a per cent of the actors' CPU at a trickle, for nothing.
_NOTHING: AbstractContextManager[None] = nullcontext()


def batch(
    name: str, traceparents: Iterable[str | None], **attributes: str
) -> AbstractContextManager[None]:
    """A span over work done for a batch of messages at once (decide, write), current while
    the block runs: the child of the messages' trace when they all share one span, else a
    new trace linked to each of them. Nothing when tracing is off."""
    if _tracer is None:
        return _NOTHING
    return _batch(_tracer, name, traceparents, attributes)


@contextmanager
def _batch(
    tracer: Tracer, name: str, traceparents: Iterable[str | None], attributes: Mapping[str, str]
) -> Iterator[None]:
    parents = {tp for tp in traceparents if tp}
    if len(parents) == 1:
        context, links = parent({TRACEPARENT: parents.pop()}), None
    else:
        context, links = Context(), [_link(tp) for tp in parents]
    with tracer.start_as_current_span(name, context=context, links=links, attributes=attributes):
        yield


def _link(traceparent: str) -> Link:
    return Link(trace.get_current_span(parent({TRACEPARENT: traceparent})).get_span_context())


def span(name: str, **attributes: str) -> AbstractContextManager[Span | None]:
    """A child of the current span while the block runs (nothing when tracing is off)."""
    if _tracer is None:
        return _NOTHING
    return _tracer.start_as_current_span(name, attributes=attributes)


def trace_id() -> str | None:
    """The current trace id as 32 hex digits, for log lines (None outside a trace)."""
    ids = current_ids()
    return ids[0] if ids else None


def current_ids() -> tuple[str, str] | None:
    """The current trace id and span id in hex (32 and 16 digits): tracing on, of the
    current span; off, of the `traceparent` passed on (`caused_by`); None outside both."""
    if _tracer is None:
        passed = _passed.get()
        if passed is None:
            return None
        parts = passed.split("-")
        return (parts[1], parts[2]) if len(parts) >= 4 else None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
