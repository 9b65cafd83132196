"""Dry runs: replay recorded history through a rule (`rule_logic.simulate`) and say when it
would have fired and what it would have sent. Nothing is sent and nothing is written.

What is replayed is the `history` table, read between `since` (inclusive) and `until`
(exclusive), of the devices the trigger watches:

- threshold: its device, or every registered device its selector matches, and the devices the
  conditions name (so that conditions see their values); `telemetry` and `state` rows only;
- state: every recorded event of its device and of the devices the conditions name, applied
  in order by the actors' own derivation (`libs.device_state.apply`), so that `state` and
  `connection` change as they did live; heartbeats are not history, so a heartbeat timeout
  is taken from the audit log (the actors' `state.changed` caused by `presence_timeout`);
- event: the rows whose subject `events.<device_id>.<type>` the pattern matches;
- schedule: none, the cron alone says when it fires.

A rule of a home reads its home's devices only, each from when it came to the home
(`scope.in_home_since`): what the rule saw of it live, never what it recorded in a home it was
in before, whoever runs the dry run (an administrator's of that rule too).

The replay starts knowing nothing at `since` (values reported before it are not carried in;
for a state trigger, a device's first row says what it is, and `from` needs a change seen
after it) and stops at the present: an episode whose deadline has not come yet has not fired.
History does not say who published an event: a rule's `publish` action on a device's
subject counts as the device speaking (online), and whether the device was disconnected by
an administrator at the time is not known (its events are applied).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

import msgspec
from sqlalchemy import ColumnElement, Select, exists, select
from sqlalchemy.ext.asyncio import AsyncSession

from libs import device_state, subjects
from libs import messages as m
from libs import rule_logic as rl
from libs.db.engine import at_or_under
from libs.db.models import AuditEntry, HistoryEntry
from libs.db.models import Device as DeviceRow
from libs.errors import Invalid
from services.gateway import scope
from services.gateway.rules.schemas import (
    DryRunFiring,
    DryRunResult,
    DryRunWindow,
    WouldCommand,
    WouldDelay,
    WouldNotify,
    WouldPublish,
    WouldSend,
    WouldSetState,
)

MAX_SPAN = timedelta(days=31)
MAX_ROWS = 100_000
MAX_FIRINGS = 1_000
# A selector matching more devices than this is refused rather than read row by row.
MAX_DEVICES = 10_000
PRESENCE_TIMEOUT = "presence_timeout"
# Who the recorder names as the author of a state change the platform made (mark, timeout).
PRESENCE_ACTOR = "platform:actors"


def check_window(window: DryRunWindow) -> None:
    if window.until <= window.since:
        raise Invalid("must be after `since`", field="$.until")
    if window.until - window.since > MAX_SPAN:
        raise Invalid(
            f"the window from `since` may span at most {MAX_SPAN.days} days; narrow it",
            field="$.until",
        )


async def dry_run(
    session: AsyncSession, rule: m.Rule, window: DryRunWindow, rule_root: str | None
) -> DryRunResult:
    """When `rule` would have fired between `window.since` and `window.until`.

    `rule_root` is where the rule is in the request body (`$.rule`), None for a stored rule:
    a refusal of the rule names its field only when the client sent it."""
    check_window(window)
    horizon = min(window.until, m.now())
    registry = await _registry(session, rule, rule_root)
    history: list[rl.Recorded] = []
    statement = _history(rule, registry, window)
    if statement is not None:
        rows = (await session.execute(statement)).all()
        if len(rows) > MAX_ROWS:
            raise Invalid(
                f"the window holds more than {MAX_ROWS:,} history rows of the devices this rule "
                "watches; narrow it (a later `since` or an earlier `until`)",
                field="$.until",
            )
        history = [
            rl.Recorded(time, device_id, type_, data or {}) for device_id, time, type_, data in rows
        ]
    if isinstance(rule.trigger, m.StateTrigger):
        history += await _presence_timeouts(session, rule, rule.trigger, window)
        if len(history) > MAX_ROWS:
            raise Invalid(
                f"the window holds more than {MAX_ROWS:,} history rows of the devices this rule "
                "watches; narrow it (a later `since` or an earlier `until`)",
                field="$.until",
            )
        firings = simulate_states(rule, rule.trigger, history, horizon)
    else:
        firings = rl.simulate(rule, history, window.since, horizon, registry)
    return DryRunResult(
        rule_id=rule.id,
        since=window.since,
        until=window.until,
        firings=[
            DryRunFiring(
                at=f.at,
                episode_id=f.episode_id,
                device_id=f.device_id,
                reason=f.reason,
                would_send=would_send(rule, f.at, registry),
            )
            for f in firings[:MAX_FIRINGS]
        ],
        evaluated_rows=len(history),
        truncated=len(firings) > MAX_FIRINGS,
    )


def would_send(
    rule: m.Rule, at: datetime, registry: Mapping[str, rl.DeviceInfo]
) -> list[WouldSend]:
    """Each action as the rules service would send it, at the time it would go out."""
    out: list[WouldSend] = []
    for action in rule.actions:
        match action:
            case m.DelayAction():
                out.append(
                    WouldDelay(at=at, subject=None, for_=action.for_, seconds=action.seconds)
                )
                at += timedelta(seconds=action.seconds)
            case m.CommandAction():
                out.append(
                    WouldCommand(
                        at=at,
                        subject=subjects.commands(action.device_id),
                        skipped=rl.refusal(action.device_id, registry, rule.home),
                        device_id=action.device_id,
                        action=action.action,
                        params=dict(action.params),
                        expires_s=action.expires_s,
                    )
                )
            case m.SetStateAction():
                out.append(
                    WouldSetState(
                        at=at,
                        subject=subjects.device_events(action.device_id, "mark"),
                        skipped=rl.refusal(action.device_id, registry, rule.home),
                        device_id=action.device_id,
                        state=action.state,
                    )
                )
            case m.NotifyAction():
                out.append(
                    WouldNotify(
                        at=at,
                        subject=subjects.rule_notification(rule.id, action.addressee),
                        message=action.message,
                        severity=action.severity,
                    )
                )
            case m.PublishAction():
                out.append(
                    WouldPublish(
                        at=at,
                        subject=subjects.device_events(action.device_id, action.event_type),
                        skipped=rl.refusal(action.device_id, registry, rule.home),
                        device_id=action.device_id,
                        event_type=action.event_type,
                        data=dict(action.data),
                    )
                )
    return out


# --- state triggers ---------------------------------------------------------------------


def simulate_states(
    rule: m.Rule, trigger: m.StateTrigger, history: Iterable[rl.Recorded], until: datetime
) -> list[rl.Firing]:
    """When a state trigger would have fired: each device's state derived from its recorded
    events as the actors derive it, and each change observed as the rules service observes
    a state fact."""
    snapshots: dict[str, m.DeviceSnapshot] = {}
    views: dict[str, rl.DeviceView] = {}
    episode: rl.Episode | None = None
    firings: list[rl.Firing] = []

    def fire_due(now: datetime) -> None:
        nonlocal episode
        if episode is not None and not episode.fired and episode.deadline <= now:
            ok, _why = rl.conditions_hold(rule, views, episode.deadline)
            if ok:
                reason = _state_reason(trigger, episode)
                firings.append(rl.Firing(episode.deadline, episode.id, episode.device_id, reason))
            episode = msgspec.structs.replace(episode, fired=True)

    rows = sorted(history, key=lambda r: r.time)
    for seq, row in enumerate(rows, start=1):
        fire_due(row.time)
        known = snapshots.get(row.device_id)
        before = known or m.DeviceSnapshot(device_id=row.device_id)
        event = _as_event(row, before)
        try:
            result = device_state.apply(before, event, seq, row.time)
        except device_state.Unapplicable:
            continue  # the actors dead-lettered it
        after = snapshots[row.device_id] = result.snapshot
        views[row.device_id] = rl.DeviceView(after.state, after.connection, after.attributes)
        # A state fact goes out on a change; the first row of a device is what it is.
        if row.device_id != trigger.device_id or (known is not None and not result.changed):
            continue
        obs = rl.Observation(
            row.device_id,
            after.attributes,
            after.state,
            after.connection,
            known.state if known else None,
            known.connection if known else None,
            event.id,
        )
        episode, _what = rl.step(episode, rule, obs, row.time)
    fire_due(until)
    return firings


def _as_event(row: rl.Recorded, before: m.DeviceSnapshot) -> m.CloudEvent:
    data = dict(row.data)
    if row.type == PRESENCE_TIMEOUT:
        # The audit log says the timeout took the device offline: silent since it last spoke.
        data = {"last_seen": (before.last_seen or row.time).isoformat()}
    source = "service/actors" if row.type == PRESENCE_TIMEOUT else None
    return m.make_event(row.device_id, row.type, data, source=source, event_id="dry-run")


def _state_reason(trigger: m.StateTrigger, episode: rl.Episode) -> str:
    change = f"{trigger.from_} → {trigger.to}" if trigger.from_ else trigger.to
    return f"{trigger.attribute} {change} on {episode.device_id} held for {trigger.for_s:g}s"


# --- what is read ------------------------------------------------------------------------


async def _registry(
    session: AsyncSession, rule: m.Rule, rule_root: str | None
) -> dict[str, rl.DeviceInfo]:
    """The registry entries the rule touches: the devices it names and, for a selector, every
    device the selector matches (at most MAX_DEVICES); those of its home for a homed rule
    (today's registry: a device that left the home since is not read, nor sent to)."""
    targets = {
        a.device_id
        for a in rule.actions
        if isinstance(a, m.CommandAction | m.SetStateAction | m.PublishAction)
    }
    trigger = rule.trigger
    if isinstance(trigger, m.ThresholdTrigger | m.StateTrigger) and trigger.device_id:
        targets.add(trigger.device_id)
    targets |= _condition_devices(rule.conditions)
    entries = await _entries(session, rule.home, select_ids=targets) if targets else {}
    if isinstance(trigger, m.ThresholdTrigger) and trigger.selector is not None:
        selected = await _entries(session, rule.home, kind=trigger.selector.kind)
        matching = {
            device_id: entry
            for device_id, entry in selected.items()
            if rl.selects(trigger, device_id, entry, rule.home)
        }
        if len(matching) > MAX_DEVICES:
            raise Invalid(
                f"the selector matches {len(matching):,} devices; a dry run replays at most "
                f"{MAX_DEVICES:,}",
                field=_field(rule_root, "trigger.selector"),
            )
        entries |= matching
    return entries


async def _entries(
    session: AsyncSession,
    home: str | None,
    *,
    select_ids: Iterable[str] | None = None,
    kind: str | None = None,
) -> dict[str, rl.DeviceInfo]:
    statement = select(
        DeviceRow.id,
        DeviceRow.kind,
        DeviceRow.location,
        DeviceRow.metadata_,
        DeviceRow.enabled,
        DeviceRow.lifecycle,
    )
    if home is not None:
        statement = statement.where(at_or_under(DeviceRow.location, home))
    if select_ids is not None:
        statement = statement.where(DeviceRow.id.in_(list(select_ids)))
    if kind is not None:
        statement = statement.where(DeviceRow.kind == kind)
    rows = (await session.execute(statement)).all()
    return {
        device_id: rl.DeviceInfo.row(kind_, location, meta, enabled, lifecycle)
        for device_id, kind_, location, meta, enabled, lifecycle in rows
    }


def _field(root: str | None, path: str) -> str | None:
    return f"{root}.{path}" if root else None


def _history(
    rule: m.Rule, registry: Mapping[str, rl.DeviceInfo], window: DryRunWindow
) -> Select[tuple[str, datetime, str, dict[str, Any]]] | None:
    """The history rows the trigger needs, oldest first, one more than MAX_ROWS at most."""
    h = HistoryEntry
    statement = (
        select(h.device_id, h.time, h.type, h.data)
        .where(h.time >= window.since, h.time < window.until)
        .order_by(h.time, h.id)
        .limit(MAX_ROWS + 1)
    )
    if rule.home is not None:  # a homed rule reads its home's devices only
        statement = statement.where(_in_home(rule.home, h.device_id, h.time))
    trigger = rule.trigger
    if isinstance(trigger, m.ThresholdTrigger):
        if trigger.device_id is not None:
            watched = {trigger.device_id}
        else:
            watched = {d for d, entry in registry.items() if rl.selects(trigger, d, entry)}
        if not watched:
            return None
        devices = watched | _condition_devices(rule.conditions)
        return statement.where(
            h.device_id.in_(sorted(devices)), h.type.in_(sorted(m.ATTRIBUTE_EVENTS))
        )
    if isinstance(trigger, m.StateTrigger):
        devices = {trigger.device_id} | _condition_devices(rule.conditions)
        return statement.where(h.device_id.in_(sorted(devices)))
    if isinstance(trigger, m.EventTrigger):
        # Narrow by the literal tokens of `events.<device_id>.<type>`; simulate matches exactly.
        tokens = trigger.subject.split(".")
        if len(tokens) > 1 and tokens[1] not in ("*", ">"):
            statement = statement.where(h.device_id == tokens[1])
        if len(tokens) == 3 and tokens[2] not in ("*", ">"):
            statement = statement.where(h.type == tokens[2])
        return statement
    return None


async def _presence_timeouts(
    session: AsyncSession, rule: m.Rule, trigger: m.StateTrigger, window: DryRunWindow
) -> list[rl.Recorded]:
    """The heartbeat timeouts that took these devices offline, as the audit log has them."""
    a = AuditEntry
    devices = {trigger.device_id} | _condition_devices(rule.conditions)
    statement = (
        select(a.device_id, a.time, a.detail)
        .where(
            a.device_id.in_(sorted(devices)),
            a.action == "state.changed",
            a.actor == PRESENCE_ACTOR,
            a.time >= window.since,
            a.time < window.until,
        )
        .order_by(a.time, a.id)
        .limit(MAX_ROWS + 1)
    )
    if rule.home is not None:
        statement = statement.where(_in_home(rule.home, a.device_id, a.time))
    rows = await session.execute(statement)
    return [
        rl.Recorded(time, device_id, PRESENCE_TIMEOUT, {})
        for device_id, time, detail in rows
        if device_id is not None and (detail or {}).get("cause") == PRESENCE_TIMEOUT
    ]


def _in_home(home: str, device_id: Any, time: Any) -> ColumnElement[bool]:
    """Recorded (at `time`) about a device of `home` since it came there."""
    return exists().where(
        DeviceRow.id == device_id,
        at_or_under(DeviceRow.location, home),
        scope.in_home_since(time),
    )


def _condition_devices(conditions: Iterable[m.Condition]) -> set[str]:
    found: set[str] = set()
    for condition in conditions:
        match condition:
            case m.AttributeCondition(device_id=d) | m.StateCondition(device_id=d):
                found.add(d)
            case m.AllOf(conditions=inner) | m.AnyOf(conditions=inner):
                found |= _condition_devices(inner)
            case m.Not(condition=inner):
                found |= _condition_devices([inner])
    return found
