"""What the rules of a partition read from the database and KV, and keep in memory: the rules
(indexed by what wakes them), the registry, the devices' last states and the episodes."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Iterator

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import kv as kv_read
from libs import messages as m
from libs import subjects
from libs.db.models import Device, DeviceState, RuleRecord
from libs.rule_logic import DeviceInfo, DeviceView, Episode, episode_decoder

log = logging.getLogger(__name__)

VIEWS_CHUNK = 500  # device ids in one `IN (...)`
# Past this many devices named by the rules, the partition reads every state fact (and drops
# the others before decoding them) rather than ask the bus for a filter this long.
MOST_FILTERED_DEVICES = 256


class RuleBook:
    """The enabled rules, indexed by what a state fact must be to concern them: its device
    (named by a trigger or a condition), or its kind, location or tag (a selector). A fact
    of a device no rule names and no selector can match costs a dictionary look-up or two,
    and is dropped before it is decoded (`reads`)."""

    def __init__(self, rules: dict[str, m.Rule]) -> None:
        self.rules = rules
        self.by_device: dict[str, list[m.Rule]] = {}
        self.by_selector: list[m.Rule] = []
        # Selector rules by one of what they select on: the rest is checked by `selects`.
        self._by_kind: dict[str, list[m.Rule]] = {}
        self._by_location: dict[str, list[m.Rule]] = {}  # a prefix, without its last `/`
        self._by_tag: dict[str, list[m.Rule]] = {}
        # The devices whose last state a condition reads (`DeviceView`s are kept for them).
        self.condition_devices: frozenset[str] = frozenset()
        self.on_events: list[m.Rule] = []
        self.scheduled: list[m.Rule] = []
        read: set[str] = set()
        for rule in rules.values():
            if not rule.enabled:
                continue
            for condition in rule.conditions or ():
                read.update(condition_devices(condition))
            t = rule.trigger
            if isinstance(t, m.EventTrigger):
                self.on_events.append(rule)
            elif isinstance(t, m.ScheduleTrigger):
                self.scheduled.append(rule)
            elif isinstance(t, m.ThresholdTrigger) and t.selector is not None:
                self.by_selector.append(rule)
                self._index_selector(rule, t.selector)
            else:
                self.by_device.setdefault(t.device_id or "", []).append(rule)
        self.condition_devices = frozenset(read)

    def _index_selector(self, rule: m.Rule, sel: m.Selector) -> None:
        location = (sel.location or "").rstrip("/")
        if sel.kind is not None:
            self._by_kind.setdefault(sel.kind, []).append(rule)
        elif location:
            self._by_location.setdefault(location, []).append(rule)
        elif sel.tag is not None:
            self._by_tag.setdefault(sel.tag, []).append(rule)
        else:  # a location of `/` or nothing: whatever `selects` makes of it
            self._by_location.setdefault("", []).append(rule)

    def reads(self, device_id: str, info: DeviceInfo | None) -> bool:
        """Whether a state fact of this device concerns a rule at all: a trigger may watch
        it, or a condition reads its state."""
        return (
            device_id in self.by_device
            or device_id in self.condition_devices
            or bool(self._selecting(info))
        )

    def watching(self, device_id: str, info: DeviceInfo | None) -> list[m.Rule]:
        """The rules a state fact of this device (`info` None if unregistered) may concern:
        those naming it, and the selectors that may match it (`libs.episodes.on_fact`
        checks homes, locations and tags)."""
        named = self.by_device.get(device_id)
        selecting = self._selecting(info)
        if not selecting:
            return named or []
        return [*(named or []), *selecting]

    def _selecting(self, info: DeviceInfo | None) -> list[m.Rule]:
        """The selector rules filed under this device's kind, a prefix of its location or
        one of its tags (an unregistered device: none can select it)."""
        if info is None or not self.by_selector:
            return []
        found = list(self._by_kind.get(info.kind, ()))
        if self._by_location and info.location is not None:
            for prefix in _prefixes(info.location):
                found += self._by_location.get(prefix, ())
        if self._by_tag:
            for tag in dict.fromkeys(info.tags):  # a tag given twice selects once
                found += self._by_tag.get(tag, ())
        return found

    @property
    def fact_subjects(self) -> list[str]:
        """The state facts the partition must read: none when no rule reads any (most of a
        big fleet's facts then never reach the rules), the named devices', or all of them
        (a selector may match any device, whatever it becomes)."""
        named = self.by_device.keys() | self.condition_devices
        if self.by_selector or len(named) > MOST_FILTERED_DEVICES:
            return [subjects.DEVICE_STATES_ALL]
        return sorted(subjects.device_state(d) for d in named)

    @property
    def event_subjects(self) -> list[str]:
        """The subjects the event rules listen on."""
        triggers = [r.trigger for r in self.on_events]
        return sorted({t.subject for t in triggers if isinstance(t, m.EventTrigger)})


def _prefixes(path: str) -> Iterator[str]:
    """Every location a selector may name to cover `path` (`rule_logic.selects`): the
    path itself and each part before a `/`."""
    at = path.find("/")
    while at >= 0:
        yield path[:at]
        at = path.find("/", at + 1)
    yield path


def condition_devices(condition: m.Condition) -> Iterator[str]:
    """The devices a condition reads the state of."""
    match condition:
        case m.AllOf(conditions=cs) | m.AnyOf(conditions=cs):
            for c in cs:
                yield from condition_devices(c)
        case m.Not(condition=c):
            yield from condition_devices(c)
        case m.AttributeCondition(device_id=d) | m.StateCondition(device_id=d):
            yield d


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


async def load_views(
    sessions: async_sessionmaker[AsyncSession], device_ids: Collection[str]
) -> dict[str, DeviceView]:
    """The last states of these devices (those the conditions read)."""
    ids = sorted(device_ids)
    views: dict[str, DeviceView] = {}
    async with sessions() as session:
        for start in range(0, len(ids), VIEWS_CHUNK):
            query = select(DeviceState).where(
                DeviceState.device_id.in_(ids[start : start + VIEWS_CHUNK])
            )
            for r in (await session.scalars(query)).all():
                views[r.device_id] = DeviceView(
                    r.state, r.connection, r.attributes or {}, r.version
                )
    return views


async def load_episodes(kv: KeyValue, owns: Callable[[str], bool]) -> dict[str, Episode]:
    """The episodes of the rules this partition `owns` (keys are `<rule id>.<what>`)."""
    episodes: dict[str, Episode] = {}
    for key in await kv_read.keys(kv):
        if not owns(key.split(".", 1)[0]):
            continue
        with contextlib.suppress(KeyNotFoundError):
            entry = await kv.get(key)
            if entry.value:
                episodes[key] = episode_decoder.decode(entry.value)
    return episodes
