"""Dry runs: replay recorded history through a rule (`rule_logic.simulate`) and say when it
would have fired and what it would have sent. Nothing is sent and nothing is written.

What is replayed is the `history` table, read between `since` (inclusive) and `until`
(exclusive), of the devices the trigger watches:

- threshold: its device, or every registered device its selector matches, and the devices the
  conditions name (so that conditions see their values); `telemetry` and `state` rows only;
- event: the rows whose subject `events.<device_id>.<type>` the pattern matches;
- schedule: none, the cron alone says when it fires.

The replay starts knowing nothing at `since` (values reported before it are not carried in)
and stops at the present: an episode whose deadline has not come yet has not fired.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from libs import messages as m
from libs import rule_logic as rl
from libs import subjects
from libs.db.models import Device as DeviceRow
from libs.db.models import HistoryEntry
from libs.errors import Invalid
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
    if isinstance(rule.trigger, m.StateTrigger):
        # The history holds what devices reported, not the state the actors derived from it
        # (`off`/`active`/`triggered`, online/offline): a replay would have to invent it.
        raise Invalid(
            "a dry run replays reported attributes and events; it cannot replay device "
            "state yet, so a state trigger cannot be tried",
            field=_field(rule_root, "trigger"),
        )
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
                        skipped=_refusal(action.device_id, registry),
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
                        skipped=_refusal(action.device_id, registry),
                        device_id=action.device_id,
                        state=action.state,
                    )
                )
            case m.NotifyAction():
                out.append(
                    WouldNotify(
                        at=at,
                        subject=subjects.alert(rule.id),
                        message=action.message,
                        severity=action.severity,
                    )
                )
            case m.PublishAction():
                out.append(
                    WouldPublish(
                        at=at,
                        subject=subjects.device_events(action.device_id, action.event_type),
                        skipped=_refusal(action.device_id, registry),
                        device_id=action.device_id,
                        event_type=action.event_type,
                        data=dict(action.data),
                    )
                )
    return out


# --- what is read ------------------------------------------------------------------------


async def _registry(
    session: AsyncSession, rule: m.Rule, rule_root: str | None
) -> dict[str, rl.DeviceInfo]:
    """The registry entries the rule touches: its action targets and, for a selector, every
    device the selector matches (at most MAX_DEVICES)."""
    targets = {
        a.device_id
        for a in rule.actions
        if isinstance(a, m.CommandAction | m.SetStateAction | m.PublishAction)
    }
    entries = await _entries(session, select_ids=targets) if targets else {}
    trigger = rule.trigger
    if isinstance(trigger, m.ThresholdTrigger) and trigger.selector is not None:
        selected = await _entries(session, kind=trigger.selector.kind)
        matching = {
            device_id: entry
            for device_id, entry in selected.items()
            if rl.selects(trigger, device_id, entry)
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
    session: AsyncSession, *, select_ids: Iterable[str] | None = None, kind: str | None = None
) -> dict[str, rl.DeviceInfo]:
    statement = select(
        DeviceRow.id, DeviceRow.kind, DeviceRow.location, DeviceRow.metadata_, DeviceRow.enabled
    )
    if select_ids is not None:
        statement = statement.where(DeviceRow.id.in_(list(select_ids)))
    if kind is not None:
        statement = statement.where(DeviceRow.kind == kind)
    rows = (await session.execute(statement)).all()
    return {
        device_id: rl.DeviceInfo(kind_, location, _tags(meta), enabled)
        for device_id, kind_, location, meta, enabled in rows
    }


def _field(root: str | None, path: str) -> str | None:
    return f"{root}.{path}" if root else None


def _tags(metadata: dict[str, Any] | None) -> tuple[str, ...]:
    # As the rules service reads them.
    return tuple((metadata or {}).get("tags", []) or ())


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
    if isinstance(trigger, m.EventTrigger):
        # Narrow by the literal tokens of `events.<device_id>.<type>`; simulate matches exactly.
        tokens = trigger.subject.split(".")
        if len(tokens) > 1 and tokens[1] not in ("*", ">"):
            statement = statement.where(h.device_id == tokens[1])
        if len(tokens) == 3 and tokens[2] not in ("*", ">"):
            statement = statement.where(h.type == tokens[2])
        return statement
    return None


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


# --- why an action would not go out --------------------------------------------------------


def _refusal(device_id: str, registry: Mapping[str, rl.DeviceInfo]) -> str | None:
    # As the rules service refuses it (services/rules/actions.py), judged on today's registry.
    entry = registry.get(device_id)
    if entry is None:
        return f"device {device_id} is not registered"
    if not entry.enabled:
        return f"device {device_id} is disconnected"
    return None
