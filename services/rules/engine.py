"""The rules engine of one partition: state facts and events in, episodes in KV, actions out.

Rules are split by id into partitions (`Partition`); one process at a time evaluates a
partition (it holds the partition's lease, see `services.rules.partitions`). Episodes live
in the KV bucket `rule_episodes`, so `for` timers and `delay`s survive restarts and
fail-over. Every id an action sends is derived from the episode: a re-fire after a crash
is de-duplicated by JetStream (Nats-Msg-Id) and by the command table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import partial
from typing import NamedTuple

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RawStreamMsg,
    StorageType,
)
from nats.js.errors import (
    BadRequestError,
    KeyNotFoundError,
    NotFoundError,
)
from nats.js.kv import KeyValue
from prometheus_client import Counter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus, subjects
from libs import messages as m
from libs.db.models import Device, DeviceState, RuleRecord
from libs.lease import Lease
from libs.pull import Puller
from libs.rule_logic import (
    DeviceInfo,
    DeviceView,
    Episode,
    Observation,
    conditions_hold,
    due,
    episode_decoder,
    event_matches,
    home_views,
    in_home,
    next_occurrence,
    selects,
    step,
)
from services.rules.actions import ActionRunner, plan_run
from services.rules.effects import Effects

log = logging.getLogger(__name__)

EPISODES_BUCKET = "rule_episodes"
TICK_S = 0.2
FETCH_BATCH = 256  # at most this many messages asked for at once
EFFECT_TIMEOUT_S = 30.0
UNKNOWN_FILTERS = ("?",)
# After a change signal, reload again after these waits until the change shows (see _on_change).
CHANGE_RETRIES_S = (0.05, 0.2, 1.0)
EVALUATIONS = Counter("smarthome_rule_evaluations_total", "Rule evaluations", ["outcome"])


class Partition(NamedTuple):
    """Partition `index` of `count`: the rules whose id hashes to it, and its bus names."""

    index: int
    count: int

    def owns(self, rule_id: str) -> bool:
        return zlib.crc32(rule_id.encode()) % self.count == self.index

    @property
    def lease(self) -> str:
        return f"rules-{self.index}"

    @property
    def facts_durable(self) -> str:
        return bus.rules_facts_durable(self.index)

    @property
    def events_durable(self) -> str:
        return bus.rules_events_durable(self.index)


def rule_from_record(record: RuleRecord) -> m.Rule:
    spec = msgspec.convert(record.spec, m.RuleSpec)
    return m.Rule(
        id=record.id,
        name=record.name,
        trigger=spec.trigger,
        actions=spec.actions,
        enabled=record.enabled and spec.enabled,
        version=record.version,
        conditions=spec.conditions,
        mode=spec.mode,
        home=record.home,
    )


class RuleBook:
    """The enabled rules, indexed by what wakes them."""

    def __init__(self, rules: dict[str, m.Rule]) -> None:
        self.rules = rules
        self.by_device: dict[str, list[m.Rule]] = {}
        self.by_selector: list[m.Rule] = []
        self.on_events: list[m.Rule] = []
        self.scheduled: list[m.Rule] = []
        for rule in rules.values():
            if not rule.enabled:
                continue
            t = rule.trigger
            if isinstance(t, m.EventTrigger):
                self.on_events.append(rule)
            elif isinstance(t, m.ScheduleTrigger):
                self.scheduled.append(rule)
            elif isinstance(t, m.ThresholdTrigger) and t.selector is not None:
                self.by_selector.append(rule)
            else:
                self.by_device.setdefault(t.device_id or "", []).append(rule)


class RulesEngine:
    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        sessions: async_sessionmaker[AsyncSession],
        partition: Partition,
    ) -> None:
        self._nc = nc
        self._js = js
        self._sessions = sessions
        self.partition = partition
        self.lease = Lease(js, partition.lease)
        self._quit = asyncio.Event()  # set when this process stops evaluating the partition
        self._actions = ActionRunner(js, sessions)
        self._book = RuleBook({})
        self._registry: dict[str, DeviceInfo] = {}
        self._views: dict[str, DeviceView] = {}
        # The last fact and event (stream sequences) evaluated: one delivered again after a
        # recovery is not evaluated again (an old fact after a newer one would put an old
        # state back; an event would trigger again).
        self._fact_seq = 0
        self._event_seq = 0
        self._episodes: dict[str, Episode] = {}
        self._kv: KeyValue | None = None
        self._effects = Effects()
        self._event_filters: tuple[str, ...] = ()
        self._lock = asyncio.Lock()  # facts, events and timers change episodes one at a time
        self._reloading = asyncio.Lock()

    # --- loading -------------------------------------------------------------------------

    async def reload_rules(self) -> None:
        # One at a time: a reload that read the database earlier must not finish later and
        # put back what it read (e.g. a registry without the device registered in between).
        async with self._reloading:
            await self._reload_rules()

    async def _reload_rules(self) -> None:
        async with self._sessions() as session:
            records = (await session.scalars(select(RuleRecord))).all()
            devices = (
                await session.execute(
                    select(
                        Device.id, Device.kind, Device.location, Device.metadata_, Device.enabled
                    ).where(Device.lifecycle == "active")  # pending, rejected: not commanded
                )
            ).all()
        rules = {}
        for record in records:
            if not self.partition.owns(record.id):
                continue
            try:
                rules[record.id] = rule_from_record(record)
            except (msgspec.ValidationError, ValueError) as exc:
                log.error("rule %s cannot be loaded: %s", record.id, exc)
        self._book = RuleBook(rules)
        if self.lease.held.is_set():
            await self._sync_event_consumer()
        self._registry = {
            d: _device_info(kind, location, meta, enabled)
            for d, kind, location, meta, enabled in devices
        }
        self._actions.registry = self._registry
        async with self._lock:
            self._schedule_all()
            effects = self._effects.take()
        await _settle(effects)
        log.info("partition %d/%d: loaded %d rules", *self.partition, len(rules))

    async def _load_views(self) -> None:
        async with self._sessions() as session:
            rows = (await session.scalars(select(DeviceState))).all()
        self._views = {
            r.device_id: DeviceView(r.state, r.connection, r.attributes or {}) for r in rows
        }

    async def _load_episodes(self) -> None:
        assert self._kv is not None
        self._episodes = {}
        try:
            keys = await self._kv.keys()
        except Exception:  # an empty bucket has no keys (nats-py raises NoKeysError)
            keys = []
        for key in keys:
            if not self.partition.owns(key.split(".", 1)[0]):  # keys are <rule id>.<what>
                continue
            with contextlib.suppress(KeyNotFoundError):
                entry = await self._kv.get(key)
                if entry.value:
                    self._episodes[key] = episode_decoder.decode(entry.value)
        log.info("resumed %d rule episodes", len(self._episodes))

    # --- run -----------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event, hand_over: Callable[[], bool]) -> None:
        """Evaluate the partition while its lease is held (the caller took it), until `stop`
        is set, the lease is lost, or `hand_over()` says another process should take it."""
        self._quit.clear()
        self._kv = await self._js.create_key_value(
            KeyValueConfig(bucket=EPISODES_BUCKET, storage=StorageType.FILE, history=1)
        )
        watch = [
            await self._nc.subscribe(subjects.RULES_CHANGED_ALL, cb=self._on_change),
            await self._nc.subscribe(subjects.DEVICE_REGISTRY_ALL, cb=self._on_change),
        ]
        try:
            # Read after taking over: the last owner may have changed them.
            await self._load_episodes()
            await self._load_views()
            self._event_filters = UNKNOWN_FILTERS  # whatever the last owner left: re-sync
            self._fact_seq = self._event_seq = 0
            await self.reload_rules()
            await self._recover_facts()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.lease.keep(self._quit))
                tasks.create_task(self._watch(stop, hand_over))
                tasks.create_task(self._timers())
                tasks.create_task(
                    self._consume(
                        self.partition.facts_durable,
                        subjects.SYSTEM_STREAM,
                        self._on_fact,
                        self._recover_facts,
                    )
                )
                tasks.create_task(self._consume_events())
        finally:
            self._quit.set()
            self._effects.cancel()
            await self.lease.release()
            for sub in watch:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _recover_facts(self) -> None:
        """Evaluate the facts a previous owner fetched and did not ack, before anything newer:
        the bus hands out newer messages before it redelivers those, and the ack of a newer
        one would ack them too (AckPolicy.ALL)."""
        count = await self._replay_unacked(
            subjects.SYSTEM_STREAM,
            self.partition.facts_durable,
            self._replayed_fact,
        )
        if count:
            log.info("partition %d/%d: evaluated %d facts left un-acked", *self.partition, count)

    async def _recover_events(self) -> None:
        """Likewise for events, each time their consumer is read anew (a re-filter leaves
        what was on its way to the last reader un-acked); those seen already are skipped."""
        await self._replay_unacked(
            subjects.EVENTS_STREAM,
            self.partition.events_durable,
            lambda raw: self._event(
                raw.seq or 0, raw.subject or "", raw.data or b"", raw.time or m.now()
            ),
        )

    async def _replay_unacked(
        self, stream: str, durable: str, handle: Callable[[RawStreamMsg], None]
    ) -> int:
        """Handle what the consumer left un-acked (read from the stream by sequence), and wait
        for the effects; how many there were."""
        left = await bus.unacked(self._js, stream, durable)
        async with self._lock:
            for raw in left:
                with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                    handle(raw)
            effects = self._effects.take()
        await _settle(effects)
        return len(left)

    async def _watch(self, stop: asyncio.Event, hand_over: Callable[[], bool]) -> None:
        """Quit (after the batch in hand is acked) on stop, a lost lease or a hand-over."""
        while not (stop.is_set() or not self.lease.held.is_set() or hand_over()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_S)
        self._quit.set()

    def _active(self) -> bool:
        return not self._quit.is_set()

    async def _on_change(self, msg: Msg) -> None:
        """Reload on a rule or registry change. The gateway publishes the change inside its
        transaction (refused by the bus, nothing is stored), so a reload may read the
        database just before it commits: read again until the change shows."""
        if not self._active():
            return
        try:
            await self.reload_rules()
            for wait in CHANGE_RETRIES_S:
                if self._shows(msg.subject, msg.data) or not self._active():
                    return
                await asyncio.sleep(wait)
                await self.reload_rules()
            log.warning(
                "%s: not in the database after %d reloads", msg.subject, len(CHANGE_RETRIES_S)
            )
        except Exception as exc:  # the periodic reload catches up
            log.warning("rule reload failed: %s", exc)

    def _shows(self, subject: str, data: bytes) -> bool:
        """Whether what was loaded includes the change (a fact we cannot read: yes)."""
        try:
            if subjects.matches(subjects.DEVICE_REGISTRY_ALL, subject):
                fact = m.registry_fact_decoder.decode(data)
                d, info = fact.device, self._registry.get(fact.device_id)
                if d is None:
                    return True  # nothing to compare with
                if fact.change == "deleted" or d.get("lifecycle") != "active":
                    return info is None  # not loaded (see _reload_rules)
                return info == _device_info(d["kind"], d["location"], d["metadata"], d["enabled"])
            change = m.change_fact_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return True
        if not self.partition.owns(change.id):
            return True
        rule = self._book.rules.get(change.id)
        if change.change == "deleted":
            return rule is None
        return rule is not None and rule.version >= change.detail.get("version", 0)

    async def _consume_events(self) -> None:
        """Events are read only while event-triggered rules exist (see _sync_event_consumer)."""
        while self._active():
            if self._event_filters:
                filters = self._event_filters
                await self._recover_events()
                await self._consume(
                    self.partition.events_durable,
                    subjects.EVENTS_STREAM,
                    self._on_event,
                    self._recover_events,
                    keep_going=lambda filters=filters: self._event_filters == filters,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quit.wait(), TICK_S)

    async def _sync_event_consumer(self) -> None:
        """Create, re-filter or delete the events consumer to fit the event rules."""
        wanted = _disjoint(sorted({r.trigger.subject for r in self._book.on_events}))  # type: ignore[union-attr]
        if wanted == self._event_filters:
            return
        durable = self.partition.events_durable
        if not wanted:
            with contextlib.suppress(NotFoundError):
                await self._js.delete_consumer(subjects.EVENTS_STREAM, durable)
        else:
            config = ConsumerConfig(
                durable_name=durable,
                filter_subjects=list(wanted),
                ack_policy=AckPolicy.ALL,
                deliver_policy=DeliverPolicy.NEW,  # an updated consumer keeps its position
                ack_wait=30.0,
                max_ack_pending=1000,
            )
            try:
                await self._js.add_consumer(subjects.EVENTS_STREAM, config)
            except BadRequestError:  # overlapping patterns the server refuses: read them all
                config.filter_subjects = [subjects.EVENTS_ALL]
                await self._js.add_consumer(subjects.EVENTS_STREAM, config)
        self._event_filters = wanted
        log.info(
            "partition %d/%d: reading events on %s",
            *self.partition,
            ", ".join(wanted) or "nothing (no event rules)",
        )

    async def _consume(
        self,
        durable: str,
        stream: str,
        handle,  # type: ignore[no-untyped-def]
        recover: Callable[[], Awaitable[None]],
        keep_going=lambda: True,  # type: ignore[no-untyped-def]
    ) -> None:
        """Decide on each batch at once; ack it when its effects are done, in batch order
        (AckPolicy.ALL: an ack also acks every batch before it), while the next is read.
        Deliveries that never arrived are read from the stream first (`recover`)."""
        puller = Puller(self._nc, stream, durable)
        await puller.start()
        acked: asyncio.Task[None] | None = None  # the ack of the last batch
        try:
            while self._active() and keep_going():
                if acked is not None and acked.done():
                    acked.result()  # an effect failed: stop; its facts will be replayed
                msgs = await puller.fetch(FETCH_BATCH, timeout=1.0)
                if not msgs:
                    continue
                if puller.gaps.take():  # see libs.pull: this batch's ack would ack them unseen
                    log.info(
                        "partition %d/%d: %s deliveries never received", *self.partition, durable
                    )
                    if acked is not None:
                        await acked
                    await recover()  # what this batch holds too; seen again, it is skipped
                async with self._lock:
                    for msg in msgs:
                        await handle(msg)
                    effects = self._effects.take()
                acked = asyncio.create_task(_ack_after(acked, effects, msgs[-1]))
            if acked is not None:
                await acked  # a hand-over leaves nothing half done
        finally:
            await puller.stop()

    async def _timers(self) -> None:
        """Fire episodes whose time has come (also those that came while we were down)."""
        while self._active():
            now = m.now()
            async with self._lock:
                for key, episode in list(self._episodes.items()):
                    rule = self._book.rules.get(episode.rule_id)
                    if rule is None or not rule.enabled:
                        if rule is None:
                            self._forget(key)
                        continue
                    if due(episode, now):
                        self._advance(key, rule, episode)
                effects = self._effects.take()
            await _settle(effects)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quit.wait(), TICK_S)

    # --- observations: decided at once, their effects submitted ------------------------------

    async def _on_fact(self, msg: Msg) -> None:
        if not self._unseen_fact(msg.metadata.sequence.stream):
            return
        try:
            fact = m.state_fact_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await bus.dead_letter(self._js, msg, f"invalid state fact: {exc}", "rules")
            return
        self.observe(fact)

    def _replayed_fact(self, raw: RawStreamMsg) -> None:
        if self._unseen_fact(raw.seq or 0):
            self.observe(m.state_fact_decoder.decode(raw.data or b""))

    def _unseen_fact(self, seq: int) -> bool:
        if seq <= self._fact_seq:
            return False
        self._fact_seq = seq
        return True

    def observe(self, fact: m.DeviceStateFact) -> None:
        """Evaluate every rule watching this device against its new state."""
        self._views[fact.device_id] = DeviceView(fact.state, fact.connection, fact.attributes)
        obs = Observation.of(fact)
        info = self._registry.get(fact.device_id)
        rules = [r for r in self._book.by_device.get(fact.device_id, []) if in_home(r.home, info)]
        rules += [
            r for r in self._book.by_selector if selects(r.trigger, fact.device_id, info, r.home)
        ]  # type: ignore[arg-type]
        for rule in rules:
            key = f"{rule.id}.{fact.device_id}"
            current = self._episodes.get(key)
            episode, what = step(current, rule, obs, fact.time)
            EVALUATIONS.labels(what).inc()
            if what == "start" and episode is not None:
                if due(episode, m.now()):
                    # Acted on at once: stored once, after the actions. A crash before that
                    # replays the fact, and the re-run's ids are de-duplicated.
                    self._advance(key, rule, episode)
                else:
                    self._save(key, episode)
            elif what == "end" and current is not None:
                self._end(key, rule, current)

    async def _on_event(self, msg: Msg) -> None:
        meta = msg.metadata
        self._event(meta.sequence.stream, msg.subject, msg.data, meta.timestamp)

    def _event(self, seq: int, subject: str, data: bytes, at: datetime) -> None:
        if seq <= self._event_seq:
            return  # seen already (a redelivery after a recovery)
        self._event_seq = seq
        if not self._book.on_events:
            return
        try:
            event = m.cloud_event_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return  # the actors dead-letter malformed events
        info = self._registry.get(event.subject)
        for rule in self._book.on_events:
            if not in_home(rule.home, info):
                continue  # a homed rule hears its home's devices only
            if event_matches(rule.trigger, subject, event.data):  # type: ignore[arg-type]
                EVALUATIONS.labels("event").inc()
                episode = Episode(
                    rule.id,
                    event.subject,
                    at,
                    at,
                    trigger_event_id=event.id,
                    values=dict(event.data or {}),
                )
                self._trigger(f"{rule.id}.event", rule, episode)

    def _schedule_all(self) -> None:
        """Every schedule rule has exactly one pending episode: its next cron time."""
        for rule in self._book.scheduled:
            key = f"{rule.id}.schedule"
            if key not in self._episodes:
                at = next_occurrence(rule.trigger, m.now())  # type: ignore[arg-type]
                self._save(key, Episode(rule.id, "", at, at, values={"cron": rule.trigger.cron}))  # type: ignore[union-attr]

    def _trigger(self, key: str, rule: m.Rule, episode: Episode) -> None:
        """A new instantaneous trigger (event): start it, or apply the rule's mode."""
        running = self._episodes.get(key)
        if running is not None and running.running:
            if rule.mode == "single":
                note = "already running (mode single)"
                self._effects.submit(
                    key, partial(self._actions.trace, rule, episode, "skipped", note, [])
                )
                return
            if rule.mode == "queued":
                queued = [*running.queued, f"{episode.device_id}|{episode.trigger_event_id}"]
                self._save(key, msgspec.structs.replace(running, queued=queued))
                return
        self._save(key, episode)  # restart: the running one is replaced
        self._advance(key, rule, episode)

    # --- episodes ----------------------------------------------------------------------------

    def _save(self, key: str, episode: Episode) -> None:
        self._episodes[key] = episode
        self._effects.submit(key, partial(self._put, key, episode))

    def _forget(self, key: str) -> None:
        self._episodes.pop(key, None)
        self._effects.submit(key, partial(self._delete, key))

    async def _put(self, key: str, episode: Episode) -> None:
        assert self._kv is not None
        await self._kv.put(key, m.encode(episode))

    async def _delete(self, key: str) -> None:
        assert self._kv is not None
        with contextlib.suppress(KeyNotFoundError):
            await self._kv.delete(key)

    def _advance(self, key: str, rule: m.Rule, episode: Episode) -> None:
        """Run the actions from where the episode stands, up to the end or the next delay."""
        first = not episode.fired
        if first:
            views = home_views(self._views, self._registry, rule.home)
            ok, why = conditions_hold(rule, views, m.now())
            if not ok:
                note = f"conditions: {why}"
                self._effects.submit(
                    key, partial(self._actions.trace, rule, episode, "skipped", note, [])
                )
                self._finish(key, rule, msgspec.structs.replace(episode, fired=True))
                return
        start = episode.next_action
        end, resume_at = plan_run(rule, start, m.now())
        kind = "fired" if first else "continued"
        reason = self._actions.reason(rule, episode) if first else "after delay"
        run = partial(self._actions.run, rule, episode, range(start, end), resume_at, kind, reason)
        self._effects.submit(key, run)
        EVALUATIONS.labels(kind).inc()
        progressed = msgspec.structs.replace(
            episode, fired=True, next_action=end, resume_at=resume_at
        )
        if resume_at is not None:
            self._save(key, progressed)
        else:
            self._finish(key, rule, progressed)

    def _finish(self, key: str, rule: m.Rule, episode: Episode) -> None:
        """Actions done: a lasting episode waits for its end; an instant one makes room."""
        t = rule.trigger
        if isinstance(t, m.ScheduleTrigger):
            at = next_occurrence(t, max(m.now(), episode.deadline))
            self._save(key, Episode(rule.id, "", at, at, values={"cron": t.cron}))
        elif isinstance(t, m.EventTrigger):
            if episode.queued:
                device_id, event_id = episode.queued[0].split("|", 1)
                now = m.now()
                nxt = Episode(
                    rule.id,
                    device_id,
                    now,
                    now,
                    trigger_event_id=event_id,
                    queued=episode.queued[1:],
                )
                self._save(key, nxt)
                self._advance(key, rule, nxt)
            else:
                self._forget(key)
        else:
            self._save(key, msgspec.structs.replace(episode, resume_at=None))

    def _end(self, key: str, rule: m.Rule, episode: Episode) -> None:
        """The trigger no longer holds: clear marks; delayed actions still pending are dropped."""
        if episode.fired:
            note = "trigger no longer holds"
            if episode.running:
                note += f"; {len(rule.actions) - episode.next_action} delayed action(s) cancelled"
            self._effects.submit(key, partial(self._actions.clear, rule, episode, note))
        self._forget(key)


async def _ack_after(
    previous: asyncio.Task[None] | None, effects: list[asyncio.Task[None]], last: Msg
) -> None:
    if previous is not None:
        await previous  # acks go in batch order; a failed batch is never acked by a later one
    await _settle(effects)
    await last.ack()  # AckPolicy.ALL: the whole batch


async def _settle(effects: list[asyncio.Task[None]]) -> None:
    """Wait for effects; no answer in time (the bus or the database went away) is a failure."""
    if effects:
        await asyncio.wait_for(asyncio.gather(*effects), EFFECT_TIMEOUT_S)


def _device_info(kind: str, location: str | None, meta: dict | None, enabled: bool) -> DeviceInfo:
    return DeviceInfo(kind, location, tuple((meta or {}).get("tags", []) or ()), enabled)


def _disjoint(patterns: list[str]) -> tuple[str, ...]:
    """Drop patterns another one already covers (the server refuses overlapping filters)."""
    return tuple(
        p for p in patterns if not any(o != p and subjects.matches(o, p) for o in patterns)
    )
