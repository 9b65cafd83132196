"""NATS connection, stream provisioning and the publish/dead-letter conventions."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import ssl
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import cast

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
    SubjectTransform,
)
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from libs import bus_grants, service_status, subjects, tracing
from libs.errors import StorageFull
from libs.loops import OnOneLoop
from libs.settings import SettingsError

log = logging.getLogger(__name__)

MSG_ID = "Nats-Msg-Id"
TRACEPARENT = "traceparent"
# Dead-letter headers: why, who gave up on it, and where the original sits.
DL_REASON = "Smarthome-Reason"
DL_CONSUMER = "Smarthome-Consumer"
DL_STREAM = "Smarthome-Stream"
DL_STREAM_SEQ = "Smarthome-Stream-Seq"

# JetStream's refusals of a message for want of storage: the server's `max_file_store` is
# reached (10023 "insufficient resources"), an account's limit (10002), or a reservation
# does not fit (10047). Refused at once, before the disk is full: nothing is stored.
RESOURCES_EXCEEDED = 10047  # also on a stream's creation or update: the budgets exceed it
STORAGE_FULL_CODES = frozenset({10002, 10023, RESOURCES_EXCEEDED})
STORAGE_FULL = (
    "the event bus storage is full: nothing more is stored until space is freed "
    "(retention, a purge or a larger volume); try again later"
)

DAY = 86400.0
STREAMS: tuple[StreamConfig, ...] = (
    StreamConfig(
        name=subjects.EVENTS_STREAM,
        subjects=[subjects.EVENTS_ALL],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        max_age=30 * DAY,
        duplicate_window=120.0,
        discard=DiscardPolicy.OLD,
    ),
    StreamConfig(
        name=subjects.COMMANDS_STREAM,
        subjects=[subjects.COMMANDS_ALL],
        storage=StorageType.FILE,
        max_age=7 * DAY,
        duplicate_window=120.0,
    ),
    StreamConfig(
        name=subjects.SYSTEM_STREAM,
        subjects=[subjects.SYSTEM_ALL],
        storage=StorageType.FILE,
        max_age=30 * DAY,
        duplicate_window=120.0,
    ),
    StreamConfig(
        name=subjects.DEADLETTER_STREAM,
        subjects=[subjects.DEADLETTER_ALL],
        storage=StorageType.FILE,
        max_age=90 * DAY,
    ),
)

# Each stream's byte budget (`max_bytes`, discard old), as a share of JetStream's store on
# each server (an R3 stream keeps a whole replica on each node: the same arithmetic): past
# it a stream drops its oldest messages, like Kafka's `retention.bytes`, instead of the
# full store refusing every message until the age limits free space. Whichever limit comes
# first applies. EVENTS and SYSTEM grow alike (each reading becomes a state fact) and hold
# nearly everything; commands and dead letters are few. The other 10 % is headroom for
# what has no budget: the KV buckets (leases, status, fences, rule episodes), MQTT
# sessions, and the store's own overhead. nats-server reserves each budget out of its
# limit and refuses to create or change any stream while they reserve more than it.
STREAM_STORE_SHARES: dict[str, float] = {
    subjects.EVENTS_STREAM: 0.40,
    subjects.SYSTEM_STREAM: 0.40,
    subjects.COMMANDS_STREAM: 0.05,
    subjects.DEADLETTER_STREAM: 0.05,
}
BUDGETED_SHARE = sum(STREAM_STORE_SHARES.values())


def stream_budgets(max_store: int) -> dict[str, int]:
    """Each stream's `max_bytes` in a store of `max_store` bytes (`STREAM_STORE_SHARES`)."""
    return {name: int(max_store * share) for name, share in STREAM_STORE_SHARES.items()}


async def connect(
    url: str,
    name: str,
    user: str | None = None,
    password: str | None = None,
    ca: Path | None = None,
) -> NATS:
    """Connect with endless reconnects: a bus restart is an outage, not a crash. `user`
    is the service's identity (`libs.bus_grants`); its replies come to its own inbox
    prefix, the only one its grant lets it read. `ca`: the CA file the server's certificate
    is verified against (`SMARTHOME_NATS_TLS_CA`) when the bus speaks TLS (a `tls://` URL,
    or a server that requires it); None: the system trust store."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    async def on_disconnect() -> None:
        log.warning("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    return await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        drain_timeout=5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **_identity(user, password),
        **_tls(ca),
    )


def _tls(ca: Path | None) -> dict[str, ssl.SSLContext]:
    return {"tls": ssl.create_default_context(cafile=str(ca))} if ca else {}


def _identity(user: str | None, password: str | None) -> dict[str, str]:
    if not user:
        return {}
    return {
        "user": user,
        "password": password or "",
        "inbox_prefix": bus_grants.inbox_prefix("svc", user),
    }


# The platform's durable consumers, created with the streams so that none misses what
# is published before its service first starts. Each worker handles a fetched batch as a
# whole and acks it with one ack of its last message (AckPolicy.ALL): one ack per batch
# instead of one per message, which the bus would otherwise store one by one.
ACTORS_BATCH = 256
# Partitions of a new install when SMARTHOME_ACTOR_PARTITIONS is not given.
DEFAULT_PARTITIONS = 16
# The one actors consumer before partitions (`events.>`): on an upgrade it is narrowed to the
# events stored before the transform (`events.*.*`), which the actors drain, then delete.
LEGACY_ACTORS_DURABLE = "actors"


def actors_durable(partition: int) -> str:
    return f"actors-{partition}"


def actors_consumer(partition: int, first: bool = True) -> ConsumerConfig:
    """The actors' consumer of one partition (of a stream storing the partition `first`, or
    last: `partition_first`). Two batches' worth may be un-acked: the next batch is decided
    while those before it commit (a drain's full batches too). What a dead worker left is
    read back by sequence before any newer event, which keeps each device's events in order."""
    return _actors_consumer(actors_durable(partition), subjects.events_partition(partition, first))


def legacy_actors_consumer() -> ConsumerConfig:
    """The one actors consumer from before partitions, as `ensure_streams` narrows it on an
    upgrade: the events stored unpartitioned (the runtime brings a bound consumer's filter
    to its config's, and `events.>` would take partitioned events too)."""
    return _actors_consumer(LEGACY_ACTORS_DURABLE, subjects.EVENTS_PUBLISHED)


def _actors_consumer(durable: str, filter_subject: str) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=durable,
        filter_subject=filter_subject,
        ack_policy=AckPolicy.ALL,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=10.0,
        max_ack_pending=2 * ACTORS_BATCH,
        max_deliver=-1,
    )


# What the recorder records of SYSTEM (`services.recorder.rows.from_system`): every platform
# fact but the state facts, one per applied event, of which it audits only those that
# changed state, connection or mark: those it reads as their transitions. A kind missing
# here is never delivered to it (tests/unit/test_recorder_filters.py checks the two agree).
RECORDER_SYSTEM_KINDS = frozenset(
    {
        subjects.SubjectKind.DEVICE_TRANSITION,
        subjects.SubjectKind.DEVICE_REGISTRY,
        subjects.SubjectKind.DEVICE_REJECTED,
        subjects.SubjectKind.RULE_FIRED,
        subjects.SubjectKind.ALERT,
        subjects.SubjectKind.NOTIFICATION,
        *subjects.CHANGE_KINDS,
    }
)
RECORDER_SYSTEM_FILTERS = tuple(sorted(subjects.kind_filter(k) for k in RECORDER_SYSTEM_KINDS))
# Each stream's filters of what the recorder reads.
RECORDER_SOURCES: dict[str, tuple[str, ...]] = {
    subjects.EVENTS_STREAM: (subjects.EVENTS_ALL,),
    subjects.COMMANDS_STREAM: (subjects.COMMANDS_ALL,),
    subjects.SYSTEM_STREAM: RECORDER_SYSTEM_FILTERS,
}
RECORDER_BATCH = 500


def recorder_durable(stream: str) -> str:
    return f"recorder-{stream.lower()}"


# The webhooks service reads every rule notification (`system.notify.<subscription_id>`) to
# dead-letter those addressed to no subscription (each subscription's own consumer delivers
# the others). Rare messages, each acked on its own: a crash can never ack one unchecked.
WEBHOOKS_NOTIFY_DURABLE = "webhooks-notify"


# The busauth service reads what revokes a device's or a bridge's connection: registry
# changes (rejected, decommissioned, deleted, its bridge's devices) and credentials rotated.
BUSAUTH_DURABLE = "busauth"
BUSAUTH_FILTERS = [
    subjects.DEVICE_REGISTRY_ALL,
    subjects.CREDENTIALS_CHANGED_ALL,
    subjects.BRIDGES_CHANGED_ALL,
]


def recorder_consumer(stream: str) -> ConsumerConfig:
    """The recorder's consumer of `stream`. An installed one of other filters (SYSTEM's
    `system.>` before the transitions) is updated to these by `ensure_streams`, in place:
    it keeps its position (what it acked stays acked, what it has not read yet it reads,
    on its new filters)."""
    filters = RECORDER_SOURCES[stream]
    one = len(filters) == 1
    return ConsumerConfig(
        durable_name=recorder_durable(stream),
        filter_subject=filters[0] if one else None,
        filter_subjects=None if one else list(filters),
        ack_policy=AckPolicy.ALL,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=30.0,
        max_ack_pending=RECORDER_BATCH * 2,
    )


CONSUMERS: tuple[tuple[str, ConsumerConfig], ...] = (
    *((stream, recorder_consumer(stream)) for stream in RECORDER_SOURCES),
    (
        subjects.SYSTEM_STREAM,
        ConsumerConfig(
            durable_name=WEBHOOKS_NOTIFY_DURABLE,
            filter_subject=subjects.NOTIFICATIONS_ALL,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW,
            ack_wait=30.0,
            max_ack_pending=1000,
        ),
    ),
    (
        subjects.SYSTEM_STREAM,
        ConsumerConfig(
            durable_name=BUSAUTH_DURABLE,
            filter_subjects=BUSAUTH_FILTERS,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW,
            ack_wait=30.0,
            max_ack_pending=1000,
        ),
    ),
)


# The rules service's consumers, one set per partition of the rules (by rule id). Each
# partition reads every state fact and evaluates only its own rules. The events consumer is
# managed by the rules service itself: it exists only while event-triggered rules do, and
# filters on their subjects, so that the bus does not deliver every event twice for nothing.
def rules_facts_durable(partition: int) -> str:
    return f"rules-{partition}"


def rules_events_durable(partition: int) -> str:
    return f"rules-events-{partition}"


def rules_facts_consumer(partition: int) -> ConsumerConfig:
    """A rules partition's facts consumer reading every state fact (a benchmark's, or an
    old install's): the partition re-filters it to what its rules read when it starts
    (`services.rules.readers`)."""
    return ConsumerConfig(
        durable_name=rules_facts_durable(partition),
        filter_subject=subjects.DEVICE_STATES_ALL,
        ack_policy=AckPolicy.ALL,
        deliver_policy=DeliverPolicy.NEW,
        ack_wait=30.0,
        max_ack_pending=1000,
    )


async def ensure_streams(
    js: JetStreamContext,
    replicas: int = 1,
    partitions: int | None = None,
    max_store: int | None = None,
) -> None:
    """Create or update the streams and durable consumers: the gateway, which provisions
    the bus, runs it at start (no other service may create streams). `partitions`: how many
    the device events are spread over (`SMARTHOME_ACTOR_PARTITIONS`); None: as the bus was
    installed, or 16 on a new one. `max_store`: JetStream's store on each server
    (`SMARTHOME_NATS_MAX_STORE`), which the streams' byte budgets share; None: unknown, no
    budgets (the age limits only)."""
    partitions = await _partitions(js, partitions) or DEFAULT_PARTITIONS
    first = await partition_first(js)
    budgets = _budgets(max_store)
    for base in STREAMS:
        config = dataclasses.replace(base, num_replicas=replicas)
        if config.name in budgets:
            config = dataclasses.replace(
                config, max_bytes=budgets[config.name], discard=DiscardPolicy.OLD
            )
        if config.name == subjects.EVENTS_STREAM:
            await _narrow_legacy_actors(js)
            config = partitioned_events(config, partitions, first)
        await _provision_stream(js, config, max_store)
    for partition in range(partitions):
        await js.add_consumer(subjects.EVENTS_STREAM, actors_consumer(partition, first))
    # Each made, or updated in place where its config changed (keeping its position): a
    # `recorder-system` installed on `system.>` takes its filters (`RECORDER_SYSTEM_FILTERS`).
    for stream, consumer in CONSUMERS:
        await js.add_consumer(stream, consumer)
    # Where each process writes its status (`GET /system/services`).
    await service_status.provision(js, replicas)


def _budgets(max_store: int | None) -> dict[str, int]:
    if max_store is None:
        log.info(
            "bus store size unknown (SMARTHOME_NATS_MAX_STORE unset): the streams have no "
            "byte budgets; a full store refuses every message until the age limits free space"
        )
        return {}
    budgets = stream_budgets(max_store)
    log.info(
        "stream byte budgets of a %d-byte store: %s",
        max_store,
        ", ".join(f"{name} {size}" for name, size in budgets.items()),
    )
    return budgets


async def _provision_stream(
    js: JetStreamContext, config: StreamConfig, max_store: int | None
) -> None:
    try:
        await _create_or_update(js, config)
    except APIError as exc:
        if exc.err_code != RESOURCES_EXCEEDED:
            raise
        raise SettingsError(
            f"the bus refuses to create or change stream {config.name}: the streams' byte "
            "budgets reserve more than its storage limit, made for a larger store than "
            f"SMARTHOME_NATS_MAX_STORE={max_store}. Give the bus its previous limit until the "
            "gateway has started once (that lowers them), or lower it by under 10 % at a time"
        ) from exc


async def _create_or_update(js: JetStreamContext, config: StreamConfig) -> None:
    """Create a stream or update its config (a lowered budget trims it to the new limit).
    An existing stream is updated, never added again: the server would count the budget of
    the stream it has against its limit a second time (10047)."""
    name = config.name
    assert name is not None  # each of STREAMS is named
    if not await _stream_exists(js, name):
        try:
            await js.add_stream(config)
            return
        except APIError:
            if not await _stream_exists(js, name):
                raise  # a refusal of the stream itself
    await js.update_stream(config)  # (it may just have been made by another gateway)


async def _stream_exists(js: JetStreamContext, name: str) -> bool:
    try:
        await js.stream_info(name)
    except NotFoundError:
        return False
    return True


def partitioned_events(config: StreamConfig, partitions: int, first: bool = True) -> StreamConfig:
    """The EVENTS stream taking `events.<device>.<type>` only, stored with its partition
    (`first`, or last: `subjects.partitioned`)."""
    source, destination = subjects.partitioned(partitions, first)
    return dataclasses.replace(
        config,
        subjects=[subjects.EVENTS_PUBLISHED],
        subject_transform=SubjectTransform(src=source, dest=destination),
    )


def stream_partitions(info: StreamInfo) -> int | None:
    """How many partitions a stream's events are stored in (None: not partitioned)."""
    transform = info.config.subject_transform
    return subjects.transform_partitions(transform.dest or "") if transform else None


async def partition_first(js: JetStreamContext) -> bool:
    """Whether the EVENTS stream stores the partition first (`libs.subjects`): so on a new
    install (no stream, or one not partitioned yet: the gateway partitions it so); an
    install from before stop 21 stores it last and keeps that layout (its consumers' filters
    and its stored subjects follow it: no migration)."""
    try:
        transform = (await js.stream_info(subjects.EVENTS_STREAM)).config.subject_transform
    except NotFoundError:
        return True
    destination = transform.dest if transform else None
    if not destination or subjects.transform_partitions(destination) is None:
        return True
    return subjects.transform_partition_first(destination)


async def stored_filter(js: JetStreamContext, filter_subject: str) -> str:
    """`subjects.stored_filter` in the layout of this bus's EVENTS stream (read from it)."""
    if not filter_subject.startswith("events."):
        return filter_subject
    return subjects.stored_filter(filter_subject, await partition_first(js))


async def _partitions(js: JetStreamContext, wanted: int | None) -> int | None:
    """The partition count to provision: fixed at install, since moving a device to another
    partition could apply its events out of order; a different setting is refused."""
    try:
        installed = stream_partitions(await js.stream_info(subjects.EVENTS_STREAM))
    except NotFoundError:
        return wanted
    if installed is not None and wanted is not None and installed != wanted:
        raise SettingsError(
            f"SMARTHOME_ACTOR_PARTITIONS={wanted}, but the bus was installed with {installed} "
            "partitions of device events; the count is fixed at install (set it back to "
            f"{installed})"
        )
    return installed or wanted


async def _narrow_legacy_actors(js: JetStreamContext) -> None:
    """An upgrade from one actors consumer: before the stream stores partitioned subjects,
    that consumer is narrowed to the unpartitioned ones stored until now, so that it never
    delivers a partitioned event (the partitions' own consumers do)."""
    try:
        info = await js.consumer_info(subjects.EVENTS_STREAM, LEGACY_ACTORS_DURABLE)
    except NotFoundError:
        return
    if info.config.filter_subject != subjects.EVENTS_PUBLISHED:
        config = dataclasses.replace(info.config, filter_subject=subjects.EVENTS_PUBLISHED)
        await js.add_consumer(subjects.EVENTS_STREAM, config)
        log.info("narrowed %s to the events stored before partitions", LEGACY_ACTORS_DURABLE)


@contextlib.contextmanager
def storage_refusals() -> Iterator[None]:
    """Raise a publish refused for want of storage as `StorageFull` (HTTP 507): it is not
    an unreachable bus, and it heals by itself once space is freed."""
    try:
        yield
    except APIError as exc:
        if exc.err_code in STORAGE_FULL_CODES:
            raise StorageFull(STORAGE_FULL) from exc
        raise


async def wait_provisioned(
    js: JetStreamContext,
    needs: Sequence[tuple[str, str | None]],
    stop: asyncio.Event | None = None,
) -> bool:
    """Wait until the gateway has provisioned what a worker reads: each (stream, durable
    consumer) of `needs`, or the stream alone where the durable is None. False if `stop`
    was set first."""
    delay = 0.2
    while stop is None or not stop.is_set():
        missing = []
        for stream, durable in needs:
            try:
                if durable:
                    await js.consumer_info(stream, durable)
                else:
                    await js.stream_info(stream)
            except NotFoundError:
                missing.append(f"{stream}/{durable}" if durable else stream)
        if not missing:
            return True
        log.info("waiting for the gateway to provision %s", ", ".join(missing))
        if stop is None:
            await asyncio.sleep(delay)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, 2.0)
    return False


def headers(
    msg_id: str | None = None, traceparent: str | None = None, extra: Mapping[str, str] = {}
) -> dict[str, str]:
    h = dict(extra)
    if msg_id:
        h[MSG_ID] = msg_id
    traceparent = traceparent or tracing.current_traceparent()
    if traceparent:
        h[TRACEPARENT] = traceparent
    return h


async def publish(
    js: JetStreamContext,
    subject: str,
    message: msgspec.Struct | bytes,
    *,
    msg_id: str | None = None,
    traceparent: str | None = None,
) -> PubAck:
    """Publish to JetStream and wait for the stream's ack (the event is then durable)."""
    payload = message if isinstance(message, bytes) else msgspec.json.encode(message)
    with storage_refusals():
        return await js.publish(subject, payload, headers=headers(msg_id, traceparent) or None)


async def publish_many(
    js: JetStreamContext,
    messages: Sequence[tuple[str, msgspec.Struct | bytes, str | None]],
    *,
    timeout: float = 10.0,
    traceparents: Sequence[str | None] | None = None,
) -> list[PubAck]:
    """Publish (subject, message, msg_id)s in order without waiting for each ack, then wait
    for all acks at most `timeout` (TimeoutError); a message the bus refuses raises its
    error at once (`StorageFull` when its storage is full). `traceparents`, when given,
    holds each message's `traceparent` (None: the current one, as `headers` does).

    The acks come to an inbox of the connection's own (`_AckInbox`), not to nats-py's
    `publish_async`: that leaves the future of a refused message pending for ever
    (nats-io/nats.py#985), so a refusal would only show as a timeout."""
    if not messages:
        return []
    nc = js._nc  # the connection the context publishes on
    inbox = _ack_inboxes.get(nc)
    if inbox is None:
        inbox = _ack_inboxes[nc] = _AckInbox(nc)
    replies, acks = await inbox.expect(len(messages))
    try:
        for n, (subject, message, msg_id) in enumerate(messages):
            payload = message if isinstance(message, bytes) else msgspec.json.encode(message)
            traceparent = traceparents[n] if traceparents else None
            await nc.publish(
                subject,
                payload,
                reply=replies[n],
                headers=headers(msg_id, traceparent) or None,
            )
        acks.time_out_in(timeout)
        with storage_refusals():
            return await acks.done
    finally:
        inbox.forget(replies)
        acks.close()


class _Acks:
    """The acks of one `publish_many` call, in order: one future for them all and one timer
    (a future an ack gathered under `asyncio.timeout` took 3.6 % of the actors' CPU at the
    soak's trickle, this 1.2 %: py-spy)."""

    __slots__ = ("_acks", "_left", "_loop", "_timer", "done")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self._loop = loop
        self.done: asyncio.Future[list[PubAck]] = loop.create_future()
        self._acks: list[PubAck | None] = [None] * count
        self._left = count
        self._timer: asyncio.TimerHandle | None = None

    def arrived(self, n: int, msg: Msg) -> None:
        """The answer to the `n`-th message: the last ack ends `done`; a refusal, at once."""
        if self.done.done():
            return
        try:
            self._acks[n] = _pub_ack(msg)
        except Exception as exc:  # the stream's refusal, for the caller
            self.done.set_exception(exc)
            return
        self._left -= 1
        if not self._left:
            self.done.set_result(cast(list[PubAck], self._acks))

    def time_out_in(self, seconds: float) -> None:
        """`done` ends in a TimeoutError if the acks have not all come by then."""
        self._timer = self._loop.call_later(seconds, self._time_out, seconds)

    def _time_out(self, after: float) -> None:
        if not self.done.done():
            missing = f"{self._left} of {len(self._acks)} acks did not come in {after:g} s"
            self.done.set_exception(TimeoutError(missing))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.done.cancel()  # (ended already, unless the caller was cancelled)


class _AckInbox(OnOneLoop):
    """One connection's reply subscription for `publish_many`'s acks, made once: a
    subscription per call (a SUB, an UNSUB and a task each) cost the actors, which publish a
    few facts a batch, a tenth of their CPU."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._waiting: dict[str, tuple[_Acks, int]] = {}
        self._count = 0
        self._subscription: Subscription | None = None
        self._subscribing = asyncio.Lock()

    async def expect(self, count: int) -> tuple[list[str], _Acks]:
        """Reply subjects for `count` messages, and what their acks will end."""
        if self._subscription is None:
            await self._subscribe()
        first, self._count = self._count, self._count + count
        replies = [f"{self._prefix}{n}" for n in range(first, first + count)]
        acks = _Acks(self._loop, count)
        self._waiting.update((reply, (acks, n)) for n, reply in enumerate(replies))
        return replies, acks

    async def _subscribe(self) -> None:
        async with self._subscribing:
            if self._subscription is None:
                wildcard = self._prefix + "*"
                self._subscription = await self._nc.subscribe(wildcard, cb=self._ack)

    def forget(self, replies: list[str]) -> None:
        for reply in replies:
            self._waiting.pop(reply, None)

    async def _ack(self, msg: Msg) -> None:
        waiting = self._waiting.pop(msg.subject, None)
        if waiting is not None:
            acks, n = waiting
            acks.arrived(n, msg)


# Per connection; a closed connection's goes with it.
_ack_inboxes: weakref.WeakKeyDictionary[NATS, _AckInbox] = weakref.WeakKeyDictionary()


def _pub_ack(msg: Msg) -> PubAck:
    """The stream's answer to a published message: its ack, or its refusal raised."""
    if msg.headers and msg.headers.get("Status") == "503" and not msg.data:
        raise NoStreamResponseError  # no stream takes this subject
    answer = json.loads(msg.data)
    if "error" in answer:
        APIError.from_error(answer["error"])  # raises the error's own class
    return PubAck.from_response(answer)


async def dead_letter(js: JetStreamContext, msg: Msg, reason: str, consumer: str) -> None:
    """Move a message that can never be applied to `deadletter.<subject>`, with its reason."""
    meta = msg.metadata
    traceparent = (msg.headers or {}).get(TRACEPARENT)
    origin = (meta.stream, meta.sequence.stream)
    subject = subjects.published(msg.subject)
    await dead_letter_stored(js, subject, msg.data, origin, reason, consumer, traceparent)


async def dead_letter_stored(
    js: JetStreamContext,
    subject: str,
    data: bytes,
    origin: tuple[str, int],
    reason: str,
    consumer: str,
    traceparent: str | None = None,
) -> None:
    """`dead_letter` for a message known by its stream and sequence (`origin`), e.g. read
    from the stream rather than delivered."""
    stream, seq = origin
    extra = {
        DL_REASON: reason[:1000],
        DL_CONSUMER: consumer,
        DL_STREAM: stream,
        DL_STREAM_SEQ: str(seq),
    }
    # The original sequence makes the dead letter itself idempotent across redeliveries.
    msg_id = f"dl:{stream}:{seq}:{consumer}"
    with storage_refusals():
        await js.publish(
            subjects.deadletter(subject), data, headers=headers(msg_id, traceparent, extra)
        )
    log.warning("dead-lettered %s seq=%s: %s", subject, seq, reason)
