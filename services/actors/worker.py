"""The device actors: a thin shell around `libs.actor_batch.decide` on the consumer runtime.

    decode (runtime) → decide (pure) → publish facts → hand the write over → next batch
                                                       ↳ commit (grouped) → cache → ack (runtime)

The runtime (`libs.consumer`) binds the durable consumer, reads back what a dead worker or
a lost connection left un-acked, dead-letters what cannot be decoded, and acks a batch once
its handler's answer ends. The handler loads the batch's devices, lets `decide` say what
follows, stores the facts, hands the state to the committer and answers `Later`: the next
batch is decided at once, on the state handed over (its facts go out without waiting for
the commit before), and the batch is acked once committed, in order, with the dead letters
for what can never be applied. So:

- no event is lost: nothing is acked before its state is committed and its facts are
  stored; a dependency down is `Retry` (the runtime keeps the batch in progress and calls
  the handler again), and what is not acked is redelivered or read back by sequence;
- none is applied twice: each device's state carries the stream sequence of the last event
  applied to it (`last_seq`), committed with it; `decide` only re-sends the latest fact for
  an event at or below it;
- each fact is published once per version: its message id is `state:<device>:<version>`,
  and a decision taken again on the same committed state gives the same versions, so a
  retry or a re-sent fact is dropped by the stream's de-duplication;
- a device's events are applied in order: they all go to one partition (the EVENTS
  stream's subject transform hashes the device id), one process works a partition at a
  time (its lease, `services.actors.partitions`), and its batches are handled one after
  another;
- a holder whose lease was taken over while it was paused writes nothing: each commit
  checks the partition's fence (`services.actors.fence`) in its transaction, and a refused
  batch is neither written nor acked; nor is any batch after it (the runtime stops the
  consumer, and this worker with its memory goes);
- a batch decided on a write not yet committed is acked after that write: the committer
  commits one worker's writes in order, tries a transaction the database was away for
  again, and fails a write it cannot store with those behind it (then the worker stops).

A batch's state is committed with those of the process's other partitions handed over at
the same time, in one transaction (`services.actors.committer`).

Each device's state is read from the database once after the partition is claimed and then
kept in memory (`StateStore`, one per partition held); the cache is written after each
commit, never read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig
from prometheus_client import Counter, Histogram

from libs import bus, commands, subjects, tracing
from libs import messages as m
from libs.actor_batch import Effects, Fact, Incoming, decide, standing
from libs.consumer import Consumer, Dead, Delivery, Item, Later, Retry, Undecodable, Verdict
from libs.loops import OnOneLoop
from services.actors.fence import Fence, Fenced
from services.actors.store import StateStore

log = logging.getLogger(__name__)

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
DECIDE_SECONDS = Histogram(
    "smarthome_actor_decide_seconds",
    "Time from a batch's hand-out to its facts stored and its write handed over (what a "
    "partition's next batch waits for)",
)
# The label's values: the platform's event types; a device's own types are `custom` (a label
# value per type a device makes up would grow without bound).
KNOWN_TYPES = frozenset(
    (*m.ATTRIBUTE_EVENTS, *m.PRESENCE_EVENTS, "mark", "presence_timeout", "command_status", m.MOVED)
)
WRITE_SECONDS = Histogram(
    "smarthome_actor_write_seconds", "Time from a batch's write handed over to its commit"
)


def decode(delivery: Delivery) -> m.CloudEvent:
    """The envelope, checked against its subject; `Undecodable` (dead-lettered) if bad."""
    try:
        event = m.cloud_event_decoder.decode(delivery.data)
    except (msgspec.DecodeError, ValueError) as exc:
        APPLIED.labels("dead_letter").inc()
        raise Undecodable(f"invalid event: {exc}") from exc
    # Its subject and type are tokens (decoded so): a subject that is not theirs, or not
    # `events.<token>.<token>` at all, differs from the one they make.
    if delivery.subject != event.nats_subject:
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


class PartitionWorker(OnOneLoop):
    """The actors of one partition of the device events (or of the legacy consumer being
    drained): its consumer, its state memory (`StateStore`) and its fence."""

    def __init__(
        self,
        nc: NATS,
        store: StateStore,
        config: ConsumerConfig,
        fence: Fence | None = None,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.store = store
        self._fence = fence
        self.consumer: Consumer[m.CloudEvent] = Consumer(
            nc, subjects.EVENTS_STREAM, config, decode, self.handle, batch=BATCH
        )
        self.fenced = asyncio.Event()  # set when a write was refused: stop, let it go
        self._stop: asyncio.Event | None = None
        # A batch's read-decide-hand-over and a deleted device's drop, one at a time.
        self._writing = asyncio.Lock()
        self._last: asyncio.Future[Any] | None = None  # the latest batch's `Later`

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; a write the fence refuses sets it."""
        self._stop = stop
        await self.consumer.run(stop)

    async def handle(self, items: list[Item[m.CloudEvent]]) -> Later:
        """Decide the batch, store its facts, hand its state over: `Later`, settled once
        committed; `Retry` while a dependency is down (the batch is decided again then, on
        the same state: nothing of it was kept)."""
        if self.fenced.is_set():
            raise Retry("the partition was taken over")
        started = time.perf_counter()
        with tracing.batch("actors apply", (i.traceparent for i in items)):
            async with self._writing:
                try:
                    with tracing.span("actors decide"):
                        effects = await self._decide(items)
                    with tracing.span("actors publish facts"):
                        await self._publish(effects, items)
                except Fenced as exc:
                    raise Retry(str(self._taken_over(exc))) from exc
                snapshots = list(effects.written.values())
                handed = self.store.hand(snapshots, effects.statuses)
            DECIDE_SECONDS.observe(time.perf_counter() - started)
            # Made here: its task's write span is a child of this batch's. On the loop looked
            # up once (`Later` would look it up again: `libs.loops`).
            committed = self._committed(handed, snapshots, effects, started)
            later = Later(self._loop.create_task(committed))
        self._last = later.outcome
        return later

    async def _committed(
        self,
        handed: asyncio.Future[None] | None,
        snapshots: list[m.DeviceSnapshot],
        effects: Effects,
        started: float,
    ) -> dict[int, Verdict]:
        """The batch's verdicts once its state is committed (then the cache is told)."""
        if handed is not None:
            with tracing.span("actors write"), WRITE_SECONDS.time():
                try:
                    await handed
                except Fenced as exc:
                    raise self._taken_over(exc) from None
            await self.store.committed(snapshots)
        BATCH_SECONDS.observe(time.perf_counter() - started)
        for outcome, count in effects.outcomes.items():
            APPLIED.labels(outcome).inc(count)
        for event_type, count in effects.applied.items():
            EVENTS_APPLIED.labels(event_type if event_type in KNOWN_TYPES else "custom").inc(count)
        for _, status in effects.statuses:  # committed: each device report counted once
            commands.STATUSES.labels(status.status).inc()
        return {seq: Dead(reason, "unapplicable") for seq, reason in effects.dead.items()}

    def _taken_over(self, exc: Fenced) -> Fenced:
        """Stop: the partition is another's. What is not acked, its new holder handles."""
        self.fenced.set()
        if self._stop is not None:
            self._stop.set()
        return exc

    async def _decide(self, items: list[Item[m.CloudEvent]]) -> Effects:
        device_ids = sorted({item.value.subject for item in items})
        try:
            state = await self.store.load(device_ids)
            standings = await self.store.registry(device_ids)
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
        if self._fence is not None:  # a holder taken over would publish stale facts
            await self._still_mine(self._fence)
        traceparents = fact_traceparents(effects.facts, items)
        try:
            await bus.publish_many(self._js, effects.facts, timeout=10.0, traceparents=traceparents)
        except Exception as exc:
            raise Retry(f"fact publish failed, retrying: {exc!r}") from exc

    @staticmethod
    async def _still_mine(fence: Fence) -> None:
        try:
            await fence.still_mine()
        except Fenced:
            raise
        except Exception as exc:  # part of the write: the database is down
            raise Retry(f"state write failed, retrying: fence unread: {exc!r}") from exc

    def learn(self, fact: m.RegistryFact) -> None:
        """A registry change (connect, disconnect, delete): what the fact says it is now."""
        if fact.change == m.RegistryChange.DELETED:
            self.store.learn(fact.device_id, None)
        elif fact.device is not None:
            self.store.learn(fact.device_id, standing(fact.device.lifecycle, fact.device.enabled))
        else:  # a fact without the entry: read it afresh next time
            self.store.forget(fact.device_id)

    async def drop(self, device_id: str) -> None:
        """A deleted device's state goes: after the batches handed over before, and before
        any decided after."""
        async with self._writing:
            dropped = self.store.drop(device_id)
            last = self._last
        try:
            await dropped
        except Fenced:
            self.fenced.set()
            return
        except Exception as exc:  # the state stays until the next delete: no crash
            log.warning("could not drop the state of %s: %r", device_id, exc)
            return
        if last is not None:  # its cache write first: the deletion is the last word
            await asyncio.wait([last])
        await self.store.uncache(device_id)
