"""The rules engine of one partition: a thin shell around the episode book (`libs.episodes`).

State facts and events come in through the consumer runtime (`libs.consumer`); each batch is
decided at once by the pure functions of `libs.episodes`, and the effects they ask for
(actions, traces, episode writes) run in order per key and side by side across keys
(`services.rules.effects`); the batch is acked when they are done.

Rules are split by id into partitions (`services.rules.partitions`); one process at a time
evaluates a partition (it holds the partition's lease). Episodes live in the KV bucket
`rule_episodes`, so `for` timers and `delay`s survive restarts and fail-over. Every id an
action sends is derived from the episode: a re-fire after a crash is de-duplicated by
JetStream (Nats-Msg-Id) and by the command table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus, episodes, subjects, tracing
from libs import messages as m
from libs.consumer import Delivery, Item, Verdict
from libs.lease import Lease
from libs.rule_logic import DeviceView
from services.rules import loading
from services.rules.actions import ActionRunner
from services.rules.effects import Effects
from services.rules.loading import RuleBook
from services.rules.readers import Reader
from services.rules.registry import Registry
from services.rules.timers import every_tick

if TYPE_CHECKING:
    from services.rules.partitions import Partition

log = logging.getLogger(__name__)

EPISODES_BUCKET = "rule_episodes"
EFFECT_TIMEOUT_S = 30.0
# After a rule change signal, reload again after these waits until the change shows: its
# commit may lag the signal by seconds under load. They add up to about the periodic reload's
# interval (`services.rules.__main__`), which catches up on whatever comes later still.
CHANGE_RETRIES_S = (0.05, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
# The periodic catch-up reads the registry once for all the partitions of the process.
REGISTRY_MAX_AGE_S = 10.0
EVALUATIONS = Counter("smarthome_rule_evaluations_total", "Rule evaluations", ["outcome"])


class RulesEngine:
    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        sessions: async_sessionmaker[AsyncSession],
        partition: Partition,
        registry: Registry | None = None,
    ) -> None:
        self._nc = nc
        self._js = js
        self._sessions = sessions
        self.partition = partition
        self.lease = Lease(js, partition.lease)
        self.bound = asyncio.Event()  # set while its consumers are bound (readiness)
        self._quit = asyncio.Event()  # set when this process stops evaluating the partition
        self._partition_first = True  # EVENTS' layout (`bus.partition_first`), read in serve
        # The process's registry, shared with the other partitions' engines.
        self._shared = registry or Registry.shared(nc, sessions)
        self._registry = self._shared.devices
        self._views: dict[str, DeviceView] = {}
        self._world = episodes.World(self._views, self._registry)
        self._actions = ActionRunner(js, sessions)
        self._actions.registry = self._registry
        self._rules = RuleBook({})
        self._decided = episodes.Book()
        self._kv: KeyValue | None = None
        self._effects = Effects()
        self._events = Reader(
            nc,
            subjects.EVENTS_STREAM,
            partition.events_durable,
            "events",
            _decode_event,
            self._on_events,
            everything=subjects.EVENTS_ALL,
            stored=self._stored_event,
        )
        self._facts = Reader(
            nc,
            subjects.SYSTEM_STREAM,
            partition.facts_durable,
            "facts",
            self._decode_fact,
            self._on_facts,
            everything=subjects.DEVICE_STATES_ALL,
        )
        self._viewed: set[str] = set()  # condition devices whose views were read
        self._lock = asyncio.Lock()  # facts, events and timers decide one at a time
        self._reloading = asyncio.Lock()
        # Rule changes read again until they show (`_follow_change`), one task each.
        self._following: set[asyncio.Task[None]] = set()

    # --- run -------------------------------------------------------------------------------

    def _stored_event(self, subject: str) -> str:
        return subjects.stored_filter(subject, self._partition_first)

    async def serve(self, stop: asyncio.Event, hand_over: Callable[[], bool]) -> None:
        """Evaluate the partition while its lease is held (the caller took it), until `stop`
        is set, the lease is lost, or `hand_over()` says another process should take it."""
        self._quit.clear()
        owns = self.partition.owns
        self._partition_first = await bus.partition_first(self._js)
        self._kv = await self._js.create_key_value(
            KeyValueConfig(bucket=EPISODES_BUCKET, storage=StorageType.FILE, history=1)
        )
        watch = await self._nc.subscribe(subjects.RULES_CHANGED_ALL, cb=self._on_rule_change)
        detach: Callable[[], Awaitable[None]] | None = None
        try:
            detach = await self._shared.attach()
            # Read after taking over: the last owner may have changed them.
            stored = await loading.load_episodes(self._kv, owns)
            log.info("resumed %d rule episodes", len(stored))
            self._decided = episodes.Book(stored)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.lease.keep(self._quit))
                tasks.create_task(self._watch(stop, hand_over))
                # The readers run first: a reload (this one, or a rule change's) waits for
                # them to fit its rules.
                tasks.create_task(self._facts.run(self._quit))
                tasks.create_task(self._events.run(self._quit))
                async with self._reloading:  # so that every view a condition reads is read
                    self._views.clear()
                    self._viewed.clear()
                await self.reload_rules()
                tasks.create_task(every_tick(self._quit, self._tick))
                tasks.create_task(every_tick(self._quit, self._track_bound))
        finally:
            self._quit.set()
            self.bound.clear()
            self._effects.cancel()
            for task in self._following:
                task.cancel()
            await self.lease.release()
            with contextlib.suppress(Exception):
                await watch.unsubscribe()
            if detach is not None:
                await detach()

    async def _watch(self, stop: asyncio.Event, hand_over: Callable[[], bool]) -> None:
        """Quit (after the batch in hand is acked) on stop, a lost lease or a hand-over."""

        async def look() -> None:
            if stop.is_set() or not self.lease.held.is_set() or hand_over():
                self._quit.set()

        await every_tick(self._quit, look)

    async def _track_bound(self) -> None:
        if self._facts.bound and self._events.bound:
            self.bound.set()
        else:
            self.bound.clear()

    def _active(self) -> bool:
        return not self._quit.is_set()

    # --- loading ---------------------------------------------------------------------------

    async def reload_rules(self) -> None:
        """Read the partition's rules again, and the registry unless another partition of
        the process just did (the periodic catch-up)."""
        await self._reload(registry=True)

    async def _reload(self, registry: bool) -> None:
        # One at a time: a reload that read the database earlier must not finish later and
        # put back what it read.
        async with self._reloading:
            if registry:
                await self._shared.refresh(REGISTRY_MAX_AGE_S)
            rules = await loading.load_rules(self._sessions, self.partition.owns)
            # The devices conditions start to read: their facts were not read so far. Their
            # views are read before the rules apply (so that the conditions find them) and
            # again once the facts consumer reads them (so that no fact falls in between).
            fresh = rules.condition_devices - self._viewed
            views = await loading.load_views(self._sessions, fresh) if fresh else {}
            async with self._lock:
                self._rules = rules
                for device_id in self._views.keys() - rules.condition_devices:
                    del self._views[device_id]
                self._viewed &= rules.condition_devices
                self._keep_views(views)
                self._decide(episodes.retire(self._decided, rules.rules))
                self._decide(episodes.schedule(self._decided, rules.scheduled, m.now()))
                effects = self._effects.take()
            await _settle(effects)
            await self._facts.want(rules.fact_subjects, self._quit)
            if fresh:
                views = await loading.load_views(self._sessions, fresh)
                async with self._lock:
                    self._keep_views(views)
                    self._viewed |= fresh
            # Events last: an event rule's conditions find their views.
            await self._events.want(rules.event_subjects, self._quit)
            log.info("partition %s: loaded %d rules", self.partition, len(rules.rules))

    def _keep_views(self, views: Mapping[str, DeviceView]) -> None:
        """Views read from the database, unless a fact already told of a newer state (facts
        come in order, and replace a view whatever its version)."""
        for device_id, view in views.items():
            known = self._views.get(device_id)
            if known is None or known.version <= view.version:
                self._views[device_id] = view

    async def _on_rule_change(self, msg: Msg) -> None:
        """Reload the rules on a change, in a task of its own: one that has not shown yet
        must not hold up the signals after it (the subscription hands them over in turn)."""
        if not self._active():
            return
        task = asyncio.create_task(self._follow_change(msg.subject, msg.data))
        self._following.add(task)
        task.add_done_callback(self._following.discard)

    async def _follow_change(self, subject: str, data: bytes) -> None:
        """A change may be signalled before its transaction commits (a reload then reads the
        rule as it was): read again, less and less often, until the change shows."""
        try:
            await self._reload(registry=False)
            for wait in CHANGE_RETRIES_S:
                if self._shows(data):
                    return
                await asyncio.sleep(wait)
                if not self._active():
                    return
                await self._reload(registry=False)
            if not self._shows(data):
                log.warning(
                    "%s: not in the database after %d reloads", subject, len(CHANGE_RETRIES_S)
                )
        except Exception as exc:  # the periodic reload catches up
            log.warning("rule reload failed: %s", exc)

    def _shows(self, data: bytes) -> bool:
        """Whether what was loaded includes the change (a fact we cannot read: yes)."""
        try:
            change = m.change_fact_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return True
        if not self.partition.owns(change.id):
            return True
        rule = self._rules.rules.get(change.id)
        if change.change == "deleted":
            return rule is None
        return rule is not None and rule.version >= change.detail.get("version", 0)

    # --- deciding: the consumers' handlers and the clock -------------------------------------

    def _decode_fact(self, delivery: Delivery) -> m.DeviceStateFact | None:
        """The fact, or None (acked, not decoded) when no rule reads its device: most facts
        of a big fleet. Its subject names the device; the registry, its kind and place."""
        try:
            device_id, _ = subjects.parse_system_device(delivery.subject)
        except ValueError:
            device_id = None
        if device_id is not None and not self._rules.reads(
            device_id, self._registry.get(device_id)
        ):
            return None
        return m.state_fact_decoder.decode(delivery.data)

    async def _on_facts(self, items: list[Item[m.DeviceStateFact]]) -> Mapping[int, Verdict]:
        self._tell_recovered([i.delivery for i in items], "facts")
        async with self._lock:
            now = m.now()
            for item in items:
                seq, fact = item.delivery.seq, item.value
                if seq <= self._decided.fact_seq:
                    continue  # decided already (a redelivery after a recovery)
                if fact.device_id in self._rules.condition_devices:
                    self._views[fact.device_id] = DeviceView(
                        fact.state, fact.connection, fact.attributes, fact.version
                    )
                watching = self._rules.watching(fact.device_id, self._registry.get(fact.device_id))
                if not watching:  # most facts: no rule reads this device
                    self._decided = episodes.Book(
                        self._decided.episodes, seq, self._decided.event_seq
                    )
                    continue
                # What the decision does (a command, a fired fact) continues the fact's trace.
                with tracing.caused_by(item.traceparent, "rules decide", device=fact.device_id):
                    self._decide(
                        episodes.on_fact(self._decided, seq, fact, watching, self._world, now)
                    )
            effects = self._effects.take()
        await _settle(effects)
        return {}

    async def _on_events(self, items: list[Item[m.CloudEvent]]) -> Mapping[int, Verdict]:
        self._tell_recovered([i.delivery for i in items], "events")
        async with self._lock:
            now = m.now()
            for item in items:
                d = item.delivery
                with tracing.caused_by(item.traceparent, "rules decide", subject=d.subject):
                    self._decide(
                        episodes.on_event(
                            self._decided,
                            d.seq,
                            d.subject,
                            item.value,
                            d.time,
                            self._rules.on_events,
                            self._world,
                            now,
                        )
                    )
            effects = self._effects.take()
        await _settle(effects)
        return {}

    async def _tick(self) -> None:
        """Fire episodes whose time has come (also those that came while we were down)."""
        async with self._lock:
            self._decide(episodes.on_tick(self._decided, self._rules.rules, self._world, m.now()))
            effects = self._effects.take()
        await _settle(effects)

    def _tell_recovered(self, deliveries: Sequence[Delivery], what: str) -> None:
        """Say so when a batch holds what was read from the stream by sequence."""
        recovered = sum(1 for d in deliveries if d.msg is None)
        if recovered:
            log.info(
                "partition %s: evaluating %d %s left un-acked or never received",
                self.partition,
                recovered,
                what,
            )

    # --- carrying the decisions out ----------------------------------------------------------

    def _decide(self, decision: episodes.Decision) -> None:
        self._decided = decision.book
        for outcome in decision.outcomes:
            EVALUATIONS.labels(outcome).inc()
        for effect in decision.effects:
            self._effects.submit(effect.key, partial(self._carry_out, effect))

    async def _carry_out(self, effect: episodes.Effect) -> None:
        assert self._kv is not None
        match effect:
            case episodes.Run(_, rule, episode, actions, resume_at, kind, reason):
                await self._actions.run(rule, episode, actions, resume_at, kind, reason)
            case episodes.Skip(_, rule, episode, note):
                await self._actions.trace(rule, episode, "skipped", note, [])
            case episodes.Clear(_, rule, episode, note):
                await self._actions.clear(rule, episode, note)
            case episodes.Put(key, episode):
                await self._kv.put(key, m.encode(episode))
            case episodes.Delete(key):
                with contextlib.suppress(KeyNotFoundError):
                    await self._kv.delete(key)


def _decode_event(delivery: Delivery) -> m.CloudEvent | None:
    """An event, or None for a malformed one: the actors dead-letter it, not the rules."""
    try:
        return m.cloud_event_decoder.decode(delivery.data)
    except ValueError:  # msgspec's DecodeError and ValidationError
        return None


async def _settle(effects: list[asyncio.Task[None]]) -> None:
    """Wait for effects; no answer in time (the bus or the database went away) is a failure:
    the partition stops, and whoever takes it resumes from what is stored and acked."""
    if effects:
        await asyncio.wait_for(asyncio.gather(*effects), EFFECT_TIMEOUT_S)
