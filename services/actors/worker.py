"""The device actors: a thin shell around `libs.actor_batch.decide` on the consumer runtime.

    decode (runtime) → decide (pure) → publish facts → write (store) → ack (runtime)

The runtime (`libs.consumer`) binds the durable consumer, reads back what a dead worker or
a lost connection left un-acked, dead-letters what cannot be decoded, and acks a batch once
its handler returns. The handler loads the batch's devices, lets `decide` say what follows,
stores the facts, commits the state, and returns the dead letters for what can never be
applied. So:

- no event is lost: nothing is acked before its state is committed and its facts are
  stored; a dependency down is `Retry` (the runtime keeps the batch in progress and calls
  the handler again), and what is not acked is redelivered or read back by sequence;
- none is applied twice: each device's state carries the stream sequence of the last event
  applied to it (`last_seq`), committed with it; `decide` only re-sends the latest fact for
  an event at or below it;
- each fact is published once per version: its message id is `state:<device>:<version>`,
  and a decision taken again on the same committed state gives the same versions, so a
  retry or a re-sent fact is dropped by the stream's de-duplication;
- a device's events are applied in order: one worker holds the lease (`Lease(js,
  "actors")`), the consumer runs only while it is held, and batches are handled one after
  another.

Each device's state is read from the database once under a lease and then kept in memory
(`StateStore`); the cache is written after each commit, never read.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig
from prometheus_client import Counter, Histogram

from libs import bus, commands, subjects, tracing
from libs import messages as m
from libs.actor_batch import Effects, Fact, Incoming, decide, standing
from libs.consumer import Consumer, Dead, Delivery, Item, Retry, Undecodable, Verdict
from libs.lease import Lease
from services.actors.store import StateStore

log = logging.getLogger(__name__)

DURABLE = bus.ACTORS_DURABLE
BATCH = bus.ACTORS_BATCH

APPLIED = Counter("smarthome_actor_events_total", "Events handled by the actors", ["outcome"])
EVENTS_APPLIED = Counter(
    "smarthome_events_applied_total", "Events applied to a device's state, by type", ["type"]
)
# Every event of a batch is applied when the batch commits: timed once per batch.
BATCH_SECONDS = Histogram(
    "smarthome_event_apply_seconds",
    "Time to apply a batch of events: decide, store its facts, commit its state",
)
# The label's values: the platform's event types; a device's own types are `custom` (a label
# value per type a device makes up would grow without bound).
KNOWN_TYPES = frozenset(
    (*m.ATTRIBUTE_EVENTS, *m.PRESENCE_EVENTS, "mark", "presence_timeout", "command_status")
)
WRITE_SECONDS = Histogram("smarthome_actor_write_seconds", "Time to commit one batch's state")


def consumer_config() -> ConsumerConfig:
    """The actors' consumer, as the gateway provisions it."""
    for stream, config in bus.CONSUMERS:
        if stream == subjects.EVENTS_STREAM and config.durable_name == DURABLE:
            return config
    raise LookupError(DURABLE)


def decode(delivery: Delivery) -> m.CloudEvent:
    """The envelope, checked against its subject; `Undecodable` (dead-lettered) if bad."""
    try:
        device_id, event_type = subjects.parse_device_event(delivery.subject)
        event = m.cloud_event_decoder.decode(delivery.data)
    except (msgspec.DecodeError, ValueError) as exc:
        APPLIED.labels("dead_letter").inc()
        raise Undecodable(f"invalid event: {exc}") from exc
    if (event.subject, event.type) != (device_id, event_type):
        APPLIED.labels("dead_letter").inc()
        raise Undecodable(
            f"invalid event: envelope says subject={event.subject!r} type={event.type!r} "
            f"but was published on {delivery.subject!r}"
        )
    return event


class _Cause(msgspec.Struct):
    """What a fact says of the event that caused it (a state fact, a rejection)."""

    cause_event_id: str | None = None
    event_id: str | None = None


_cause = msgspec.json.Decoder(_Cause)


def fact_traceparents(
    facts: list[Fact], items: list[Item[m.CloudEvent]]
) -> list[str | None] | None:
    """Each fact's `traceparent`: its cause event's item's. None when no event carries one
    (tracing off and no client trace: nothing read, the actors' usual case)."""
    by_event = {i.value.id: i.traceparent for i in items if i.traceparent}
    if not by_event:
        return None
    out: list[str | None] = []
    for _, body, _ in facts:
        cause = _cause.decode(body)
        out.append(by_event.get(cause.cause_event_id or cause.event_id or ""))
    return out


class ActorWorker:
    def __init__(self, nc: NATS, store: StateStore, lease: Lease) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._store = store
        self._lease = lease
        self.consumer: Consumer[m.CloudEvent] = Consumer(
            nc, subjects.EVENTS_STREAM, consumer_config(), decode, self.handle, batch=BATCH
        )
        # Readiness: set while the consumer is bound, and while this worker stands by behind
        # another one's lease, ready to take over (a standby never ready would hold up a
        # rolling update); clear while it binds.
        self.bound = asyncio.Event()
        # A batch's read-decide-write and a deleted device's drop, one at a time.
        self._writing = asyncio.Lock()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume while this worker holds the lease; stand by while another one does."""
        try:
            while not stop.is_set():
                if not await self._lease.try_acquire():
                    self.bound.set()
                    held = await self._lease.acquire(stop)
                    self.bound.clear()
                    if not held:
                        return
                await self._while_held(stop)
        finally:
            self.bound.clear()
            await self._lease.release()

    async def _while_held(self, stop: asyncio.Event) -> None:
        """Run the consumer until `stop` is set or the lease is lost."""
        ended = asyncio.Event()

        async def keep() -> None:
            try:
                await self._lease.keep(stop)
            finally:
                ended.set()

        async def consume() -> None:
            try:
                await self.consumer.run(ended)
            finally:
                ended.set()

        async def ready_once_bound() -> None:
            bound = asyncio.ensure_future(self.consumer.bound.wait())
            over = asyncio.ensure_future(ended.wait())
            try:
                await asyncio.wait((bound, over), return_when=asyncio.FIRST_COMPLETED)
                if self.consumer.bound.is_set() and not ended.is_set():
                    self.bound.set()
            finally:
                bound.cancel()
                over.cancel()

        # What was kept under an earlier lease may have been changed by another worker since.
        self._store.activate()
        registry = await self._nc.subscribe(subjects.DEVICE_REGISTRY_ALL, cb=self._on_registry)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(keep())
                tasks.create_task(consume())
                tasks.create_task(ready_once_bound())
        finally:
            self.bound.clear()
            await registry.unsubscribe()

    async def handle(self, items: list[Item[m.CloudEvent]]) -> dict[int, Verdict]:
        """Decide the batch, store its facts, commit its state; `Retry` while a dependency
        is down (the batch is decided again then, on the same committed state)."""
        with BATCH_SECONDS.time(), tracing.batch("actors apply", (i.traceparent for i in items)):
            async with self._writing:
                with tracing.span("actors decide"):
                    effects = await self._decide(items)
                with tracing.span("actors publish facts"):
                    await self._publish(effects, items)
                with tracing.span("actors write"):
                    await self._write(effects)
        for outcome, count in effects.outcomes.items():
            APPLIED.labels(outcome).inc(count)
        for event_type, count in effects.applied.items():
            EVENTS_APPLIED.labels(event_type if event_type in KNOWN_TYPES else "custom").inc(count)
        for _, status in effects.statuses:  # committed: each device report counted once
            commands.STATUSES.labels(status.status).inc()
        return {seq: Dead(reason, "unapplicable") for seq, reason in effects.dead.items()}

    async def _decide(self, items: list[Item[m.CloudEvent]]) -> Effects:
        device_ids = sorted({item.value.subject for item in items})
        try:
            state = await self._store.load(device_ids)
            standings = await self._store.registry(device_ids)
        except Exception as exc:
            raise Retry(f"state read failed, retrying: {exc!r}") from exc
        batch = [
            Incoming(i.delivery.seq, i.delivery.time, i.value, standings.get(i.value.subject))
            for i in items
        ]
        _, effects = decide(state, batch, m.now())
        return effects

    async def _publish(self, effects: Effects, items: list[Item[m.CloudEvent]]) -> None:
        """Store the facts before the state they describe is committed: a crash in between
        leaves a redelivery that decides (and publishes, de-duplicated) the same again.
        Each fact continues the trace of the event that caused it."""
        if not effects.facts:
            return
        traceparents = fact_traceparents(effects.facts, items)
        try:
            await bus.publish_many(self._js, effects.facts, timeout=10.0, traceparents=traceparents)
        except Exception as exc:
            raise Retry(f"fact publish failed, retrying: {exc!r}") from exc

    async def _write(self, effects: Effects) -> None:
        if not effects.written and not effects.statuses:
            return
        try:
            with WRITE_SECONDS.time():
                await self._store.save(list(effects.written.values()), effects.statuses)
        except Exception as exc:
            raise Retry(f"state write failed, retrying: {exc!r}") from exc

    async def _on_registry(self, msg: Msg) -> None:
        """A registry change (connect, disconnect, delete): what the fact says it is now."""
        try:
            fact = m.registry_fact_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        deleted = fact.change == m.RegistryChange.DELETED
        if deleted:
            self._store.learn(fact.device_id, None)
        elif fact.device is not None:
            self._store.learn(fact.device_id, standing(fact.device.lifecycle, fact.device.enabled))
        else:  # a fact without the entry: read it afresh next time
            self._store.forget(fact.device_id)
        if deleted:
            async with self._writing:  # after the batch being written, if any
                await self._drop(fact.device_id)

    async def _drop(self, device_id: str) -> None:
        try:
            await self._store.drop(device_id)
        except Exception as exc:  # the state stays until the next delete; not worth a crash
            log.warning("could not drop the state of %s: %r", device_id, exc)
