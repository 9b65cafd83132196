"""The rules engine: state facts in, episodes in JetStream KV, actions out."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from prometheus_client import Counter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus, commands, subjects
from libs import messages as m
from libs.db.models import Device, RuleRecord
from libs.lease import Lease
from services.rules.evaluate import Episode, due, episode_decoder, step

log = logging.getLogger(__name__)

DURABLE = "rules"
EPISODES_BUCKET = "rule_episodes"
TICK_S = 0.2
EVALUATIONS = Counter("smarthome_rule_evaluations_total", "Rule evaluations", ["outcome"])


def rule_from_record(record: RuleRecord) -> m.Rule:
    spec = msgspec.convert(record.spec, m.RuleSpec)
    return m.Rule(
        id=record.id,
        name=record.name,
        trigger=spec.trigger,
        actions=spec.actions,
        enabled=record.enabled,
        version=record.version,
    )


class RulesEngine:
    def __init__(
        self, nc: NATS, js: JetStreamContext, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        self._lease = Lease(js, "rules")
        self._nc = nc
        self._js = js
        self._sessions = sessions
        self._rules: dict[str, m.Rule] = {}
        self._by_device: dict[str, list[m.Rule]] = {}
        self._episodes: dict[str, Episode] = {}
        self._kv: KeyValue | None = None
        self._lock = asyncio.Lock()  # facts and timers change episodes one at a time

    # --- rules ---------------------------------------------------------------------

    async def reload_rules(self) -> None:
        async with self._sessions() as session:
            records = (await session.scalars(select(RuleRecord))).all()
        rules = {}
        for record in records:
            try:
                rules[record.id] = rule_from_record(record)
            except (msgspec.ValidationError, ValueError) as exc:
                log.error("rule %s cannot be loaded: %s", record.id, exc)
        by_device: dict[str, list[m.Rule]] = {}
        for rule in rules.values():
            if rule.enabled:
                by_device.setdefault(rule.trigger.device_id, []).append(rule)
        self._rules, self._by_device = rules, by_device
        log.info("loaded %d rules", len(rules))

    # --- run -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Evaluate while this process holds the rules lease; stand by while another does."""
        self._kv = await self._js.create_key_value(
            KeyValueConfig(bucket=EPISODES_BUCKET, storage=StorageType.FILE, history=1)
        )
        reloads = await self._nc.subscribe(subjects.RULES_CHANGED_ALL, cb=self._on_rule_changed)
        try:
            while await self._lease.acquire(stop):
                # Episodes are read after taking over: the last owner may have changed them.
                await self._load_episodes()
                await self.reload_rules()
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._lease.keep(stop))
                    tasks.create_task(self._timers(stop))
                    tasks.create_task(self._consume(stop))
        finally:
            await self._lease.release()
            with contextlib.suppress(Exception):
                await reloads.unsubscribe()

    def _active(self, stop: asyncio.Event) -> bool:
        return not stop.is_set() and self._lease.held.is_set()

    async def _on_rule_changed(self, _msg: Msg) -> None:
        try:
            await self.reload_rules()
        except Exception as exc:  # the periodic reload catches up
            log.warning("rule reload failed: %s", exc)

    async def _consume(self, stop: asyncio.Event) -> None:
        await self._js.add_consumer(
            subjects.SYSTEM_STREAM,
            ConsumerConfig(
                durable_name=DURABLE,
                filter_subject=subjects.DEVICE_STATES_ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30.0,
                max_ack_pending=1000,
            ),
        )
        sub = await self._js.pull_subscribe_bind(DURABLE, stream=subjects.SYSTEM_STREAM)
        try:
            while self._active(stop):
                try:
                    msgs = await sub.fetch(256, timeout=1.0)
                except TimeoutError:  # nats-py raises asyncio.TimeoutError here
                    continue
                for msg in msgs:
                    await self._handle(msg)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()  # a pull subscription left to drain() blocks it

    async def _handle(self, msg: Msg) -> None:
        try:
            fact = m.state_fact_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await bus.dead_letter(self._js, msg, f"invalid state fact: {exc}", DURABLE)
        else:
            async with self._lock:
                await self.observe(fact)
        await msg.ack()

    async def _timers(self, stop: asyncio.Event) -> None:
        """Fire episodes whose `for` has run out (also those that ran out while we were down)."""
        while self._active(stop):
            now = m.now()
            async with self._lock:
                for key, episode in list(self._episodes.items()):
                    rule = self._rules.get(episode.rule_id)
                    if rule is not None and rule.enabled and due(episode, now):
                        await self._fire(key, rule, episode)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_S)

    # --- episodes ------------------------------------------------------------------

    async def _load_episodes(self) -> None:
        assert self._kv is not None
        self._episodes = {}
        try:
            keys = await self._kv.keys()
        except Exception:  # an empty bucket has no keys (nats-py raises NoKeysError)
            keys = []
        for key in keys:
            with contextlib.suppress(KeyNotFoundError):
                entry = await self._kv.get(key)
                if entry.value:
                    self._episodes[key] = episode_decoder.decode(entry.value)
        log.info("resumed %d rule episodes", len(self._episodes))

    async def observe(self, fact: m.DeviceStateFact) -> None:
        """Evaluate every rule on this device against its new attributes."""
        for rule in self._by_device.get(fact.device_id, ()):
            key = f"{rule.id}.{fact.device_id}"
            current = self._episodes.get(key)
            episode, what = step(current, rule, fact.attributes, fact.time, fact.cause_event_id)
            EVALUATIONS.labels(what).inc()
            if what == "start" and episode is not None:
                await self._save(key, episode)
                if due(episode, m.now()):
                    await self._fire(key, rule, episode)
            elif what == "end" and current is not None:
                await self._end(key, rule, current)

    async def _save(self, key: str, episode: Episode) -> None:
        assert self._kv is not None
        await self._kv.put(key, m.encode(episode))
        self._episodes[key] = episode

    async def _end(self, key: str, rule: m.Rule, episode: Episode) -> None:
        assert self._kv is not None
        if episode.fired:
            outcomes = await self._clear_marks(rule, episode)
            await self._trace(rule, episode, "cleared", "trigger no longer holds", outcomes)
        with contextlib.suppress(KeyNotFoundError, KeyWrongLastSequenceError):
            await self._kv.delete(key)
        self._episodes.pop(key, None)

    async def _fire(self, key: str, rule: m.Rule, episode: Episode) -> None:
        outcomes = [await self._act(rule, episode, i, a) for i, a in enumerate(rule.actions)]
        trigger = rule.trigger
        value = episode.values.get(trigger.attribute)
        reason = (
            f"{trigger.attribute} of {trigger.device_id} = {value!r}"
            f" held {_describe(trigger)} for {trigger.for_s:g}s"
        )
        await self._trace(rule, episode, "fired", reason, outcomes)
        await self._save(key, msgspec.structs.replace(episode, fired=True))
        EVALUATIONS.labels("fired").inc()

    # --- actions -------------------------------------------------------------------

    async def _act(
        self, rule: m.Rule, episode: Episode, index: int, action: m.Action
    ) -> m.ActionOutcome:
        refusal = await self._refusal(action.device_id)
        if refusal:
            return m.ActionOutcome(action=_name(action), ok=False, detail=refusal)
        if isinstance(action, m.CommandAction):
            command = await commands.send(
                self._sessions,
                self._js,
                device_id=action.device_id,
                action=action.action,
                params=action.params,
                expires_s=action.expires_s,
                issued_by=f"rule:{rule.id}",
                correlation_id=episode.id,
                command_id=f"{episode.id}-{index}",  # a re-fire after a crash sends it once
            )
            return m.ActionOutcome(action=_name(action), ok=True, command_id=command.id)
        await self._mark(
            rule, episode, action.device_id, action.state, f"mark-{episode.id}-{index}"
        )
        return m.ActionOutcome(
            action=_name(action), ok=True, detail=f"{action.device_id} marked {action.state}"
        )

    async def _clear_marks(self, rule: m.Rule, episode: Episode) -> list[m.ActionOutcome]:
        outcomes = []
        for index, action in enumerate(rule.actions):
            if isinstance(action, m.SetStateAction):
                await self._mark(
                    rule, episode, action.device_id, None, f"unmark-{episode.id}-{index}"
                )
                outcomes.append(
                    m.ActionOutcome(action="clear_state", ok=True, detail=action.device_id)
                )
        return outcomes

    async def _mark(
        self, rule: m.Rule, episode: Episode, device_id: str, state: str | None, event_id: str
    ) -> None:
        event = m.make_event(
            device_id,
            "mark",
            {"rule_id": rule.id, "state": state},
            source=f"rule/{rule.id}",
            correlation_id=episode.id,
            event_id=event_id,
        )
        await bus.publish(self._js, event.nats_subject, event, msg_id=event.id)

    async def _refusal(self, device_id: str) -> str | None:
        async with self._sessions() as session:
            device = await session.get(Device, device_id)
        if device is None or device.lifecycle == "decommissioned":
            return f"device {device_id} is not registered"
        if not device.enabled:
            return f"device {device_id} is disconnected"
        return None

    async def _trace(
        self,
        rule: m.Rule,
        episode: Episode,
        kind: str,
        reason: str,
        outcomes: list[m.ActionOutcome],
    ) -> None:
        fired = m.RuleFired(
            rule_id=rule.id,
            episode_id=episode.id,
            kind=kind,  # type: ignore[arg-type]
            device_id=episode.device_id,
            reason=reason,
            values=episode.values,
            outcomes=outcomes,
            trigger_event_id=episode.trigger_event_id,
            correlation_id=episode.id,
            time=m.now(),
        )
        await bus.publish(
            self._js, subjects.rule_fired(rule.id), fired, msg_id=f"{kind}:{episode.id}"
        )


def _name(action: m.Action) -> str:
    if isinstance(action, m.CommandAction):
        return f"command {action.action} -> {action.device_id}"
    return f"set_state {action.state} -> {action.device_id}"


def _describe(t: m.ThresholdTrigger) -> str:
    if t.equals is not None:
        return f"= {t.equals!r}"
    parts = [f"> {t.above:g}"] if t.above is not None else []
    parts += [f"< {t.below:g}"] if t.below is not None else []
    return " and ".join(parts)
