"""Pure rule logic, shared by the rules service (live) and the gateway (dry-run):
when a trigger holds, how episodes start and end, conditions, schedules, simulation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import cronsim
import msgspec

from libs import messages as m
from libs import subjects
from libs.principals import home_of


class Episode(msgspec.Struct, frozen=True):
    """A period in which a rule's trigger holds for a device; kept in JetStream KV.

    `next_action` / `resume_at` record how far the actions got, so that a `delay`
    survives a restart; `queued` holds triggers waiting their turn (mode `queued`).
    """

    rule_id: str
    device_id: str
    started_at: datetime
    deadline: datetime
    fired: bool = False
    trigger_event_id: str | None = None
    values: dict[str, m.AttributeValue] = {}
    next_action: int = 0
    resume_at: datetime | None = None
    queued: list[str] = []
    # The rule's version it began under (0: stored before versions were kept); a rule
    # changed since, or switched off, ends it (`episodes.retire`).
    rule_version: int = 0

    @property
    def id(self) -> str:
        """Deterministic: the same episode always dedups to the same firing."""
        return f"{self.rule_id}-{self.device_id}-{int(self.started_at.timestamp() * 1_000_000)}"

    @property
    def running(self) -> bool:
        return self.resume_at is not None


episode_decoder = msgspec.json.Decoder(Episode)


@dataclass(frozen=True)
class Observation:
    """A device as a state fact shows it, with what it was just before."""

    device_id: str
    attributes: Mapping[str, m.AttributeValue]
    state: str = "off"
    connection: str = "offline"
    previous_state: str | None = None
    previous_connection: str | None = None
    cause_id: str | None = None
    stale: bool = False  # an attribute overdue (`connection` `stale` while online)

    @classmethod
    def of(cls, fact: m.DeviceStateFact) -> Observation:
        flipped = "connection" in fact.changed
        before = (
            {"online": "offline", "offline": "online"}[fact.connection]
            if flipped
            else fact.connection
        )
        return cls(
            fact.device_id,
            fact.attributes,
            fact.state,
            fact.connection,
            fact.previous_state,
            before,
            fact.cause_event_id,
            bool(fact.stale),
        )


@dataclass(frozen=True)
class DeviceInfo:
    """Registry facts a selector matches on, and whether the device takes commands."""

    kind: str
    location: str | None
    tags: tuple[str, ...] = ()
    enabled: bool = True
    lifecycle: m.Lifecycle = m.Lifecycle.ACTIVE

    @classmethod
    def of(cls, entry: m.RegistryEntry) -> DeviceInfo:
        """As a registry fact says the device is now."""
        return cls(entry.kind, entry.location, entry.tags, entry.enabled, entry.lifecycle)

    @classmethod
    def row(
        cls,
        kind: str,
        location: str | None,
        metadata: Mapping[str, object] | None,
        enabled: bool,
        lifecycle: str,
    ) -> DeviceInfo:
        """As the registry table has it (`libs.db.models.Device`)."""
        tags = (metadata or {}).get("tags")
        tag_tuple = tuple(str(t) for t in tags) if isinstance(tags, list) else ()
        return cls(kind, location, tag_tuple, enabled, m.Lifecycle(lifecycle))


def in_home(home: str | None, info: DeviceInfo | None) -> bool:
    """Whether a rule of `home` may read or act on a device: a rule of no home (an
    administrator's) on any device; a homed rule on the registered devices of its home only,
    whatever its ids and selectors say (a device may have moved since the rule was checked)."""
    return home is None or (info is not None and home_of(info.location) == home)


def selects(
    trigger: m.ThresholdTrigger, device_id: str, info: DeviceInfo | None, home: str | None = None
) -> bool:
    """Whether the trigger watches this device; a rule of `home` watches its home's only."""
    if not in_home(home, info):
        return False
    if trigger.device_id is not None:
        return trigger.device_id == device_id
    sel = trigger.selector
    if sel is None or info is None:
        return False
    return (
        (sel.kind is None or sel.kind == info.kind)
        and (sel.location is None or _at_or_under(info.location, sel.location))
        and (sel.tag is None or sel.tag in info.tags)
    )


def _at_or_under(path: str | None, prefix: str) -> bool:
    """`home/ground` covers `home/ground/kitchen`, not `home/groundfloor`."""
    prefix = prefix.rstrip("/")
    return path is not None and (path == prefix or path.startswith(prefix + "/"))


def _number(value: m.AttributeValue) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def threshold_holds(
    trigger: m.ThresholdTrigger, attributes: Mapping[str, m.AttributeValue], active: bool = False
) -> bool:
    """Whether the line is crossed; while an episode is `active`, hysteresis widens the band."""
    value = attributes.get(trigger.attribute)
    if trigger.equals is not None:
        return value == trigger.equals
    number = _number(value)
    if number is None:
        return False
    slack = trigger.hysteresis if active else 0.0
    low, high = trigger.low, trigger.high
    return (low is None or number > low - slack) and (high is None or number < high + slack)


def state_holds(trigger: m.StateTrigger, obs: Observation, active: bool) -> bool:
    if trigger.attribute == "connection" and trigger.to == "stale":
        current_holds = obs.connection == "online" and obs.stale
    else:
        current = obs.state if trigger.attribute == "state" else obs.connection
        current_holds = current == trigger.to
    if not current_holds:
        return False
    if active or trigger.from_ is None:
        return True
    before = obs.previous_state if trigger.attribute == "state" else obs.previous_connection
    return before == trigger.from_


def holds(trigger: m.Trigger, obs: Observation, active: bool = False) -> bool:
    if isinstance(trigger, m.ThresholdTrigger):
        return threshold_holds(trigger, obs.attributes, active)
    if isinstance(trigger, m.StateTrigger):
        return state_holds(trigger, obs, active)
    return False


def step(
    episode: Episode | None, rule: m.Rule, obs: Observation, at: datetime
) -> tuple[Episode | None, str]:
    """The episode after a new observation, and what happened: start, hold, end or none."""
    trigger = rule.trigger
    assert isinstance(trigger, m.ThresholdTrigger | m.StateTrigger)
    if holds(trigger, obs, active=episode is not None):
        if episode is not None:
            return episode, "hold"
        values: dict[str, m.AttributeValue] = (
            {trigger.attribute: obs.attributes.get(trigger.attribute)}
            if isinstance(trigger, m.ThresholdTrigger)
            else {trigger.attribute: trigger.to}
        )
        started = Episode(
            rule_id=rule.id,
            device_id=obs.device_id,
            started_at=at,
            deadline=at + timedelta(seconds=trigger.for_s),
            trigger_event_id=obs.cause_id,
            values=values,
            rule_version=rule.version,
        )
        return started, "start"
    if episode is not None:
        return None, "end"
    return None, "none"


def due(episode: Episode, now: datetime) -> bool:
    if episode.running:
        return episode.resume_at is not None and episode.resume_at <= now
    return not episode.fired and episode.deadline <= now


def event_matches(trigger: m.EventTrigger, subject: str, data: Mapping[str, Any] | None) -> bool:
    if not subjects.matches(trigger.subject, subject):
        return False
    data = data or {}
    return all(data.get(k) == v for k, v in trigger.match.items())


def next_occurrence(trigger: m.ScheduleTrigger, after: datetime) -> datetime:
    """The first cron time strictly after `after`, computed in the trigger's time zone."""
    zone = ZoneInfo(trigger.timezone)
    local = after.astimezone(zone)
    return next(cronsim.CronSim(trigger.cron, local)).astimezone(after.tzinfo)


# --- conditions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceView:
    state: str
    connection: str
    attributes: Mapping[str, m.AttributeValue]
    version: int = 0  # the device's state version it shows (an older one never replaces it)


def home_views(
    views: Mapping[str, DeviceView], registry: Mapping[str, DeviceInfo], home: str | None
) -> Mapping[str, DeviceView]:
    """What the conditions of a rule of `home` may read: its home's devices (any other one is
    unknown to them); every device for a rule of no home."""
    if home is None:
        return views
    return _HomeViews(views, registry, home)


class _HomeViews(Mapping[str, DeviceView]):
    """`views` through a rule's home, looked up per device (conditions read a few)."""

    def __init__(
        self, views: Mapping[str, DeviceView], registry: Mapping[str, DeviceInfo], home: str
    ) -> None:
        self._views = views
        self._registry = registry
        self._home = home

    def __getitem__(self, device_id: str) -> DeviceView:
        if not in_home(self._home, self._registry.get(device_id)):
            raise KeyError(device_id)
        return self._views[device_id]

    def __iter__(self) -> Iterator[str]:
        return (d for d in self._views if in_home(self._home, self._registry.get(d)))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def refusal(
    device_id: str, registry: Mapping[str, DeviceInfo], home: str | None = None
) -> str | None:
    """Why a rule of `home` may not command (or mark, or speak for) this device, or None when
    it may: the one answer the rules service acts on and the dry run reports."""
    device = registry.get(device_id)
    if device is None or not in_home(home, device):
        return f"device {device_id} is not registered" + (f" in home {home}" if home else "")
    if device.lifecycle != m.Lifecycle.ACTIVE:
        return f"device {device_id} is {device.lifecycle}, not active"
    if not device.enabled:
        return f"device {device_id} is disconnected"
    return None


def check(
    condition: m.Condition, devices: Mapping[str, DeviceView], now: datetime
) -> tuple[bool, str]:
    """Whether the condition holds, and a short reason for the trace."""
    match condition:
        case m.AllOf(conditions=cs):
            results = [check(c, devices, now) for c in cs]
            failed = [why for ok, why in results if not ok]
            return (not failed, "; ".join(failed) or "all hold")
        case m.AnyOf(conditions=cs):
            results = [check(c, devices, now) for c in cs]
            passed = [why for ok, why in results if ok]
            return (
                bool(passed),
                passed[0] if passed else "none of: " + "; ".join(w for _, w in results),
            )
        case m.Not(condition=c):
            ok, why = check(c, devices, now)
            return (not ok, f"not ({why})")
        case m.AttributeCondition():
            return _check_attribute(condition, devices)
        case m.StateCondition():
            return _check_state(condition, devices)
        case m.TimeCondition():
            return _check_time(condition, now)
    raise TypeError(f"unknown condition {condition!r}")


def _check_attribute(
    c: m.AttributeCondition, devices: Mapping[str, DeviceView]
) -> tuple[bool, str]:
    view = devices.get(c.device_id)
    value = view.attributes.get(c.attribute) if view else None
    number = _number(value)
    if c.equals is not None:
        ok = value == c.equals
    else:
        ok = (
            number is not None
            and (c.above is None or number > c.above)
            and (c.below is None or number < c.below)
        )
    return ok, f"{c.device_id}.{c.attribute} = {value!r}"


def _check_state(c: m.StateCondition, devices: Mapping[str, DeviceView]) -> tuple[bool, str]:
    view = devices.get(c.device_id)
    if view is None:
        return False, f"{c.device_id} is unknown"
    ok = (c.state is None or view.state == c.state) and (
        c.connection is None or view.connection == c.connection
    )
    return ok, f"{c.device_id} is {view.state}/{view.connection}"


def _check_time(c: m.TimeCondition, now: datetime) -> tuple[bool, str]:
    local = now.astimezone(ZoneInfo(c.timezone))
    clock = local.strftime("%H:%M")
    if c.weekdays is not None and local.weekday() not in c.weekdays:
        return False, f"weekday {local.weekday()} not in {c.weekdays}"
    after, before = c.after, c.before
    if after and before and after > before:  # wraps midnight: 22:00-06:00
        ok = clock >= after or clock < before
    else:
        ok = (after is None or clock >= after) and (before is None or clock < before)
    return ok, f"local time {clock} {c.timezone}"


def conditions_hold(
    rule: m.Rule, devices: Mapping[str, DeviceView], now: datetime
) -> tuple[bool, str]:
    if not rule.conditions:
        return True, "no conditions"
    return check(m.AllOf(conditions=list(rule.conditions)), devices, now)


# --- dry-run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """One history row: a device event as the recorder stored it."""

    time: datetime
    device_id: str
    type: str
    data: Mapping[str, m.AttributeValue]


@dataclass(frozen=True)
class Firing:
    at: datetime
    episode_id: str
    device_id: str
    reason: str


def simulate(
    rule: m.Rule,
    history: Iterable[Recorded],
    since: datetime,
    until: datetime,
    registry: Mapping[str, DeviceInfo] | None = None,
) -> list[Firing]:
    """When the rule would have fired over recorded history, sending nothing."""
    trigger = rule.trigger
    if isinstance(trigger, m.ScheduleTrigger):
        return _simulate_schedule(rule, trigger, since, until)
    rows = sorted(history, key=lambda r: r.time)
    if isinstance(trigger, m.EventTrigger):
        return [
            Firing(
                r.time,
                f"{rule.id}-{r.device_id}-{int(r.time.timestamp() * 1e6)}",
                r.device_id,
                f"event {r.type} of {r.device_id}",
            )
            for r in rows
            if event_matches(trigger, subjects.device_events(r.device_id, r.type), r.data)
        ]
    return _simulate_episodes(rule, rows, until, registry or {})


def _simulate_episodes(
    rule: m.Rule, rows: list[Recorded], until: datetime, registry: Mapping[str, DeviceInfo]
) -> list[Firing]:
    views: dict[str, DeviceView] = {}
    episodes: dict[str, Episode] = {}
    firings: list[Firing] = []

    def fire_due(now: datetime) -> None:
        for key, ep in list(episodes.items()):
            if not ep.fired and ep.deadline <= now:
                ok, _why = conditions_hold(rule, views, ep.deadline)
                if ok:
                    firings.append(Firing(ep.deadline, ep.id, ep.device_id, _reason(rule, ep)))
                episodes[key] = msgspec.structs.replace(ep, fired=True)

    for row in rows:
        fire_due(row.time)
        if row.type not in m.ATTRIBUTE_EVENTS:
            continue
        before = views.get(row.device_id) or DeviceView("off", "online", {})
        attributes = {**before.attributes, **row.data}
        views[row.device_id] = DeviceView(before.state, "online", attributes)
        trigger = rule.trigger
        if isinstance(trigger, m.ThresholdTrigger) and not selects(
            trigger, row.device_id, registry.get(row.device_id), rule.home
        ):
            continue
        obs = Observation(row.device_id, attributes, before.state, "online", before.state, "online")
        episode, what = step(episodes.get(row.device_id), rule, obs, row.time)
        if what == "start" and episode is not None:
            episodes[row.device_id] = episode
        elif what == "end":
            episodes.pop(row.device_id, None)
    fire_due(until)
    return firings


def _simulate_schedule(
    rule: m.Rule, trigger: m.ScheduleTrigger, since: datetime, until: datetime
) -> list[Firing]:
    firings: list[Firing] = []
    at = next_occurrence(trigger, since)
    while at <= until and len(firings) < 10_000:
        firings.append(
            Firing(at, f"{rule.id}-schedule-{int(at.timestamp())}", "", f"cron {trigger.cron}")
        )
        at = next_occurrence(trigger, at)
    return firings


def _reason(rule: m.Rule, ep: Episode) -> str:
    trigger = rule.trigger
    held = ", ".join(f"{k} = {v!r}" for k, v in ep.values.items())
    seconds = getattr(trigger, "for_s", 0.0)
    return f"{held} on {ep.device_id} held for {seconds:g}s"
