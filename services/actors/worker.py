"""The actors' consume loop: pull → decode → decide → publish facts → (write behind) → ack.

A fetched batch is decided in memory, on top of the state of batches decided before it that
are still being written; its facts are published and stored; then it joins the queue of the
writer task, which commits what is queued in one transaction (then the cache) and acks the
last message of it (AckPolicy.ALL: everything up to it). The database is thus out of the
path from an event to its fact, and a slow commit does not hold up the next batch. So:

- no event is lost: nothing is acked before its state is committed and its facts are
  stored; what is not acked is redelivered. And no event is skipped: the consumer takes
  every subject of the stream, so the events it hands out have consecutive stream
  sequences, and a batch that comes after a gap first gets the missing ones read from the
  stream by sequence. A gap is what a worker that died before its ack leaves to the next
  one, or a connection lost while events were on the way: the bus redelivers those only
  after `ack_wait`, hands out newer ones meanwhile, and the ack of a newer one (AckPolicy
  .ALL) would ack them unapplied;
- none is applied twice: each device's state carries the stream sequence of the last event
  applied to it (`last_seq`), committed with it; a redelivered event at or below it is only
  acked again (and its device's latest fact re-sent: a crash may have come before that
  fact reached the bus);
- each fact is published once per version: its message id is `state:<device>:<version>`,
  and a decision taken again on the same committed state gives the same versions, so a
  retry or a re-sent fact is dropped by the stream's de-duplication;
- a device's events are applied in order: one worker holds the lease, batches are decided
  one after another, and each batch's facts are stored before the next batch's are sent.

Each device's state is read from the database once under a lease and then kept in memory
(`StateStore`); the cache is written, never read.

The price: a fact may reach the bus a few milliseconds before the state it describes is
readable from the cache or the database (it carries that state and its version). How much
is written behind is bounded by the consumer's `max_ack_pending`: the bus hands out no
more un-acked events than that.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Histogram

from libs import bus, runtime, subjects
from libs import messages as m
from libs.device_state import Applied, Unapplicable, apply
from libs.lease import Lease
from libs.pull import Puller
from services.actors.store import Standing, StateStore, standing

log = logging.getLogger(__name__)

DURABLE = bus.ACTORS_DURABLE
BATCH = bus.ACTORS_BATCH
# The writer lets what is decided meanwhile gather into one commit: a commit per fetched
# batch (a few events each at 1,000 events/s) would cost more CPU than deciding them.
WRITE_EVERY_S = 0.01

APPLIED = Counter("smarthome_actor_events_total", "Events handled by the actors", ["outcome"])
BATCH_SECONDS = Histogram(
    "smarthome_actor_batch_seconds", "Time to decide one fetched batch and store its facts"
)
WRITE_SECONDS = Histogram(
    "smarthome_actor_write_seconds", "Time to commit the batches queued for the writer"
)


@dataclass
class Batch:
    """What one fetched batch produces, gathered before anything is written."""

    msgs: Sequence[Msg]
    # Each device of the batch as the batch leaves it; `written`: those an event changed.
    snapshots: dict[str, m.DeviceSnapshot] = field(default_factory=dict)
    written: set[str] = field(default_factory=set)
    statuses: list[tuple[str, m.CommandStatusData]] = field(default_factory=list)
    facts: list[tuple[str, bytes, str]] = field(default_factory=list)  # subject, body, msg id


@dataclass(frozen=True)
class Drop:
    """A deleted device: its state goes once the batches decided before are written."""

    device_id: str


class Stored(Msg):
    """An event read from the stream by its sequence, not delivered by the consumer: its
    ack is the ack of a later delivery (AckPolicy.ALL) or of its own redelivery."""

    @classmethod
    def of(cls, nc: NATS, raw: RawStreamMsg) -> Stored:
        assert raw.seq is not None and raw.time is not None
        metadata = Msg.Metadata(
            sequence=Msg.Metadata.SequencePair(consumer=0, stream=raw.seq),
            num_pending=0,
            num_delivered=0,
            timestamp=raw.time,
            stream=subjects.EVENTS_STREAM,
            consumer=DURABLE,
        )
        return cls(
            _client=nc,
            subject=raw.subject or "",
            data=raw.data or b"",
            headers=raw.headers,
            _metadata=metadata,
        )

    async def ack(self) -> None:
        return None

    async def in_progress(self) -> None:
        return None


class Writes:
    """The writer's queue: batches and drops in the order they were decided; and how many
    of the events handed out by the bus are not acked yet."""

    def __init__(self) -> None:
        self._items: collections.deque[Batch | Drop] = collections.deque()
        self._changed = asyncio.Event()
        self._acked = asyncio.Event()
        self.closed = False
        self.ended = False  # the writer is gone: nothing more will be acked
        self.unacked = 0

    def put(self, item: Batch | Drop) -> None:
        if isinstance(item, Batch):
            self.unacked += len(item.msgs)
        self._items.append(item)
        self._changed.set()

    def acked(self, group: list[Batch]) -> None:
        self.unacked -= sum(len(b.msgs) for b in group)
        self._acked.set()

    def end(self) -> None:
        self.ended = True
        self._acked.set()

    async def room(self) -> int:
        """How many more events the bus hands out (max_ack_pending is one batch), waiting
        for an ack while there is no room; 0 once the writer is gone."""
        while self.unacked >= BATCH and not self.ended:
            self._acked.clear()
            await self._acked.wait()
        return 0 if self.ended else BATCH - self.unacked

    def close(self) -> None:
        """The writer ends once it has written what is queued."""
        self.closed = True
        self._changed.set()

    async def wait(self) -> bool:
        """Until something is queued (True) or the queue is closed and empty (False)."""
        while not self._items:
            if self.closed:
                return False
            self._changed.clear()
            await self._changed.wait()
        return True

    def take_batches(self) -> list[Batch]:
        """The batches at the head of the queue, up to the first drop."""
        taken = []
        while self._items and isinstance(self._items[0], Batch):
            taken.append(self._items.popleft())  # type: ignore[arg-type]
        return taken

    def take_drop(self) -> Drop | None:
        if self._items and isinstance(self._items[0], Drop):
            return self._items.popleft()  # type: ignore[return-value]
        return None


class ActorWorker:
    def __init__(self, nc: NATS, store: StateStore, lease: Lease) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._store = store
        self._lease = lease
        # Decided and not yet committed: the next batches are decided on top of these.
        self._pending: dict[str, m.DeviceSnapshot] = {}
        self._writes: Writes | None = None
        self._seen = 0  # the highest stream sequence decided (or acked before this worker)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume while this worker holds the lease; stand by while another one does."""
        try:
            while await self._lease.acquire(stop):
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._lease.keep(stop))
                    tasks.create_task(self._consume(stop))
        finally:
            await self._lease.release()

    async def _consume(self, stop: asyncio.Event) -> None:
        self._pending = {}
        self._store.activate()
        writes = self._writes = Writes()
        puller = Puller(self._nc, subjects.EVENTS_STREAM, DURABLE)
        await puller.start()
        registry = await self._nc.subscribe(subjects.DEVICE_REGISTRY_ALL, cb=self._on_registry)
        try:
            async with asyncio.TaskGroup() as tasks:
                writer = tasks.create_task(self._write_behind(writes, stop))
                try:
                    if not await self._start_after_ack_floor(stop):
                        return
                    while not stop.is_set() and self._lease.held.is_set() and not writer.done():
                        room = await writes.room()
                        if not room:
                            continue  # the writer is gone: the loop ends
                        msgs = await puller.fetch(room, timeout=1.0)
                        if not msgs:
                            continue
                        with BATCH_SECONDS.time():
                            await self.handle(msgs, stop)
                finally:
                    writes.close()
        finally:
            self._writes = None
            # A pull subscription left to drain() waits for the drain timeout.
            await puller.stop()
            await registry.unsubscribe()

    async def _start_after_ack_floor(self, stop: asyncio.Event) -> bool:
        """What was acked before this worker is done; anything above it is to be seen."""

        async def read() -> None:
            info = await self._js.consumer_info(subjects.EVENTS_STREAM, DURABLE)
            self._seen = info.ack_floor.stream_seq if info.ack_floor else 0

        return await runtime.retry_until_stopped(read, stop, "reading the ack floor")

    async def _without_gaps(self, msgs: Sequence[Msg], stop: asyncio.Event) -> list[Msg] | None:
        """The batch with the events missing before it read from the stream (see the module
        docstring); None when stopping before they could be read."""
        out: list[Msg] = []
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            if seq > self._seen + 1:
                missing = await self._read_stored(self._seen + 1, seq - 1, stop)
                if missing is None:
                    return None
                if missing:
                    log.info("applying %d events handed out and never received", len(missing))
                out += missing
            out.append(msg)
            self._seen = max(self._seen, seq)
        return out

    async def _read_stored(self, first: int, last: int, stop: asyncio.Event) -> list[Msg] | None:
        stored: list[Msg] = []

        async def read() -> None:
            start = first
            if last - first >= BATCH:  # a stream whose oldest events are gone (limits, purge)
                info = await self._js.stream_info(subjects.EVENTS_STREAM)
                start = max(first, info.state.first_seq)
            stored.clear()
            for seq in range(start, last + 1):
                try:
                    raw = await self._js.get_msg(subjects.EVENTS_STREAM, seq)
                except NotFoundError:
                    continue  # gone with the stream's limits
                stored.append(Stored.of(self._nc, raw))

        if await runtime.retry_until_stopped(read, stop, "reading missing events"):
            return stored
        return None

    async def _on_registry(self, msg: Msg) -> None:
        """A registry change (connect, disconnect, delete): what the fact says it is now."""
        try:
            fact = m.registry_fact_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        device = fact.device
        if fact.change == "deleted":
            self._store.learn(fact.device_id, None)
        elif device is not None:
            lifecycle = str(device.get("lifecycle", "active"))
            self._store.learn(fact.device_id, standing(lifecycle, bool(device.get("enabled"))))
        else:  # a fact without the entry: read it afresh next time
            self._store.forget(fact.device_id)
        if fact.change != "deleted":
            return
        self._pending.pop(fact.device_id, None)
        if self._writes is not None:
            self._writes.put(Drop(fact.device_id))  # after what is queued before it
        else:
            await self._drop(fact.device_id)

    async def _drop(self, device_id: str) -> None:
        try:
            await self._store.drop(device_id)
        except Exception as exc:  # the state stays until the next delete; not worth a crash
            log.warning("could not drop the state of %s: %r", device_id, exc)

    async def handle(self, msgs: Sequence[Msg], stop: asyncio.Event) -> None:
        """Decide the batch, store its facts and queue it for the writer (which acks it)."""
        whole = await self._without_gaps(msgs, stop)
        if whole is None:
            return  # stopping while the bus is down: leave the batch un-acked
        msgs = whole
        decoded: list[tuple[Msg, m.CloudEvent]] = []
        for msg in msgs:
            event = await self._decode(msg)
            if event is not None:
                decoded.append((msg, event))
        batch = await self._decide_until_read(msgs, decoded, stop)
        if batch is None:
            return  # stopping while the database is down: leave the batch un-acked
        if not await self._publish_facts(batch, stop):
            return  # stopping: the redelivered batch is decided again (see the docstring)
        for device_id in batch.written:
            self._pending[device_id] = batch.snapshots[device_id]
        if self._writes is None:
            raise RuntimeError("handle() runs only while consuming")
        self._writes.put(batch)

    async def _write_behind(self, writes: Writes, stop: asyncio.Event) -> None:
        """Commit what is queued, in order; ack each commit's last message."""
        try:
            await self._write_queued(writes, stop)
        finally:
            writes.end()

    async def _write_queued(self, writes: Writes, stop: asyncio.Event) -> None:
        while await writes.wait():
            if not writes.closed and writes.unacked < BATCH // 2:
                await asyncio.sleep(WRITE_EVERY_S)
            group = writes.take_batches()
            if group:
                with WRITE_SECONDS.time():
                    if not await self._commit(group, writes, stop):
                        return  # stopping while the database is down: left un-acked
                await group[-1].msgs[-1].ack()  # AckPolicy.ALL: all the batches
                writes.acked(group)
            drop = writes.take_drop()
            if drop is not None:
                await self._drop(drop.device_id)

    async def _commit(self, group: list[Batch], writes: Writes, stop: asyncio.Event) -> bool:
        """One transaction for the batches; while the database is down, keep them (and those
        queued meanwhile) and retry."""

        async def attempt() -> None:
            snapshots: dict[str, m.DeviceSnapshot] = {}
            statuses: list[tuple[str, m.CommandStatusData]] = []
            for batch in group:
                snapshots.update({d: batch.snapshots[d] for d in batch.written})
                statuses += batch.statuses
            if snapshots or statuses:
                await self._store.save(list(snapshots.values()), statuses)

        async def still_working() -> None:
            group.extend(writes.take_batches())
            for batch in group:
                for msg in batch.msgs:
                    await msg.in_progress()

        if not await runtime.retry_until_stopped(attempt, stop, "state write", still_working):
            return False
        for batch in group:
            for device_id in batch.written:
                if self._pending.get(device_id) is batch.snapshots[device_id]:
                    del self._pending[device_id]  # readable from the store from now on
        return True

    async def _decode(self, msg: Msg) -> m.CloudEvent | None:
        """The envelope, checked against its subject; a bad one is dead-lettered and acked."""
        try:
            device_id, event_type = subjects.parse_device_event(msg.subject)
            event = m.cloud_event_decoder.decode(msg.data)
            if (event.subject, event.type) != (device_id, event_type):
                raise ValueError(
                    f"envelope says subject={event.subject!r} type={event.type!r} "
                    f"but was published on {msg.subject!r}"
                )
            return event
        except (msgspec.DecodeError, ValueError) as exc:
            await bus.dead_letter(self._js, msg, f"invalid event: {exc}", DURABLE)
            APPLIED.labels("dead_letter").inc()
            return None

    async def _decide(self, msgs: Sequence[Msg], decoded: list[tuple[Msg, m.CloudEvent]]) -> Batch:
        device_ids = sorted({e.subject for _, e in decoded})
        batch = Batch(msgs, snapshots=await self._load(device_ids))
        standings = await self._store.registry(device_ids) if device_ids else {}
        for msg, event in decoded:
            seq = msg.metadata.sequence.stream
            current = batch.snapshots[event.subject]
            if seq <= current.last_seq:
                APPLIED.labels("duplicate").inc()  # applied before a crash; ack again only
                if seq == current.last_seq and current.version:
                    # Its fact may not have reached the bus before the crash; the id makes
                    # a second copy harmless.
                    batch.facts.append(_state_fact(current, current.state, ["attributes"], event))
                continue
            reason = _refusal(event, standings.get(event.subject))
            if reason:
                batch.facts.append(_rejected(event, reason, seq))
                APPLIED.labels("rejected").inc()
                continue
            try:
                result = apply(current, event, seq, msg.metadata.timestamp)
            except Unapplicable as exc:
                await bus.dead_letter(self._js, msg, str(exc), DURABLE)
                APPLIED.labels("dead_letter").inc()
                continue
            self._record(batch, event, current, result)
            APPLIED.labels("applied").inc()
        return batch

    async def _load(self, device_ids: list[str]) -> dict[str, m.DeviceSnapshot]:
        """As the batches decided so far leave them: those not written yet from memory."""
        found = {d: self._pending[d] for d in device_ids if d in self._pending}
        rest = [d for d in device_ids if d not in found]
        if rest:
            found |= await self._store.load(rest)
        return found

    def _record(
        self, batch: Batch, event: m.CloudEvent, before: m.DeviceSnapshot, result: Applied
    ) -> None:
        new = result.snapshot
        batch.snapshots[new.device_id] = new
        batch.written.add(new.device_id)
        if result.command_status:
            batch.statuses.append((new.device_id, result.command_status))
        if result.changed:
            batch.facts.append(_state_fact(new, before.state, result.changed, event))

    async def _decide_until_read(
        self, msgs: Sequence[Msg], decoded: list[tuple[Msg, m.CloudEvent]], stop: asyncio.Event
    ) -> Batch | None:
        """Read the batch's devices and decide; while the database is down, keep trying."""
        done: list[Batch] = []

        async def attempt() -> None:
            done.append(await self._decide(msgs, decoded))

        async def still_working() -> None:
            for msg in msgs:
                await msg.in_progress()

        if await runtime.retry_until_stopped(attempt, stop, "state read", still_working):
            return done[-1]
        return None

    async def _publish_facts(self, batch: Batch, stop: asyncio.Event) -> bool:
        """Publish what changed; retried until stored (their ids make a retry harmless),
        because the state they describe is decided and will be committed."""
        if not batch.facts:
            return True
        return await runtime.retry_until_stopped(
            lambda: bus.publish_many(self._js, batch.facts, timeout=10.0), stop, "fact publish"
        )


def _state_fact(
    new: m.DeviceSnapshot, previous_state: str, changed: list[str], event: m.CloudEvent
) -> tuple[str, bytes, str]:
    fact = m.DeviceStateFact(
        device_id=new.device_id,
        version=new.version,
        state=new.state,
        connection=new.connection,
        attributes=new.attributes,
        last_seen=new.last_seen,
        changed=changed,
        previous_state=previous_state,  # type: ignore[arg-type]
        cause_event_id=event.id,
        cause_type=event.type,
        correlation_id=event.correlationid,
        time=m.now(),
    )
    return (
        subjects.device_state(new.device_id),
        m.encode(fact),
        f"state:{new.device_id}:{new.version}",
    )


def _refusal(event: m.CloudEvent, standing: Standing | None) -> str | None:
    if standing is None:
        return "device is not registered"
    if standing == "pending":
        return "device is waiting for an administrator to approve it"
    if standing == "rejected":
        return "device was rejected by an administrator"
    if standing == "disconnected" and event.type != "mark":
        return "device is disconnected by an administrator"
    return None


def _rejected(event: m.CloudEvent, reason: str, seq: int) -> tuple[str, bytes, str]:
    fact = m.RejectedFact(
        device_id=event.subject,
        event_id=event.id,
        event_type=event.type,
        reason=reason,
        correlation_id=event.correlationid,
        time=m.now(),
    )
    return subjects.device_rejected(event.subject), m.encode(fact), f"rejected:{seq}"
