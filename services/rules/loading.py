"""What the rules of a partition read from the database and KV, and keep in memory: the rules
(indexed by what wakes them), the registry, the devices' last states and the episodes."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import messages as m
from libs.db.models import Device, DeviceState, RuleRecord
from libs.rule_logic import DeviceInfo, DeviceView, Episode, episode_decoder

log = logging.getLogger(__name__)


class RuleBook:
    """The enabled rules, indexed by what wakes them: a state fact of a device no rule names
    and no selector can match costs a dictionary look-up."""

    def __init__(self, rules: dict[str, m.Rule]) -> None:
        self.rules = rules
        self.by_device: dict[str, list[m.Rule]] = {}
        self.by_selector: list[m.Rule] = []
        self._by_kind: dict[str | None, list[m.Rule]] = {}  # selector rules by their kind
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
                self._by_kind.setdefault(t.selector.kind, []).append(rule)
            else:
                self.by_device.setdefault(t.device_id or "", []).append(rule)

    def watching(self, device_id: str, kind: str | None) -> list[m.Rule]:
        """The rules a state fact of this device (of `kind`, None if unregistered) may
        concern: those naming it, and the selectors of its kind or of any kind
        (`libs.episodes.on_fact` checks homes, locations and tags)."""
        named = self.by_device.get(device_id)
        if not self._by_kind:
            return named or []
        any_kind = self._by_kind.get(None, [])
        of_kind = self._by_kind.get(kind, []) if kind is not None else []
        if not any_kind and not of_kind:
            return named or []
        return [*(named or []), *any_kind, *of_kind]

    @property
    def event_subjects(self) -> list[str]:
        """The subjects the event rules listen on."""
        triggers = [r.trigger for r in self.on_events]
        return sorted({t.subject for t in triggers if isinstance(t, m.EventTrigger)})


async def load_rules(
    sessions: async_sessionmaker[AsyncSession], owns: Callable[[str], bool]
) -> RuleBook:
    """The rules this partition `owns`; one that cannot be read is logged and left out."""
    async with sessions() as session:
        records = (await session.scalars(select(RuleRecord))).all()
    rules = {}
    for record in records:
        if not owns(record.id):
            continue
        try:
            rules[record.id] = record.to_rule()
        except (msgspec.ValidationError, ValueError) as exc:
            log.error("rule %s cannot be loaded: %s", record.id, exc)
    return RuleBook(rules)


async def load_registry(sessions: async_sessionmaker[AsyncSession]) -> dict[str, DeviceInfo]:
    """The whole registry (whether a rule may command a device: `rule_logic.refusal`)."""
    async with sessions() as session:
        rows = (
            await session.execute(
                select(
                    Device.id,
                    Device.kind,
                    Device.location,
                    Device.metadata_,
                    Device.enabled,
                    Device.lifecycle,
                )
            )
        ).all()
    return {
        device_id: DeviceInfo.row(kind, location, meta, enabled, lifecycle)
        for device_id, kind, location, meta, enabled, lifecycle in rows
    }


def apply_registry_fact(registry: dict[str, DeviceInfo], fact: m.RegistryFact) -> None:
    """One registry change, applied in place: what the fact says the device is now."""
    if fact.change == m.RegistryChange.DELETED:
        registry.pop(fact.device_id, None)
    elif fact.device is not None:
        registry[fact.device_id] = DeviceInfo.of(fact.device)


async def load_views(sessions: async_sessionmaker[AsyncSession]) -> dict[str, DeviceView]:
    async with sessions() as session:
        rows = (await session.scalars(select(DeviceState))).all()
    return {r.device_id: DeviceView(r.state, r.connection, r.attributes or {}) for r in rows}


async def load_episodes(kv: KeyValue, owns: Callable[[str], bool]) -> dict[str, Episode]:
    """The episodes of the rules this partition `owns` (keys are `<rule id>.<what>`)."""
    episodes: dict[str, Episode] = {}
    try:
        keys: Iterable[str] = await kv.keys()
    except Exception:  # an empty bucket has no keys (nats-py raises NoKeysError)
        keys = []
    for key in keys:
        if not owns(key.split(".", 1)[0]):
            continue
        with contextlib.suppress(KeyNotFoundError):
            entry = await kv.get(key)
            if entry.value:
                episodes[key] = episode_decoder.decode(entry.value)
    return episodes
