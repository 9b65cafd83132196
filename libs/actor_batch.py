"""The device actors' decision for one batch: `decide(state, batch, now) -> (state, effects)`.

Pure: no I/O, no clock. The actors' worker reads the devices' state and standing, calls
this, then publishes the facts, writes the state and acks; this module says what to do:

- an event of a device that may not report (not registered, pending, rejected, or
  disconnected by an administrator: only `mark` passes then) is refused: a `rejected`
  fact, the state untouched; a `moved` (to another home) of a registered device is not;
- an event at or below its device's `last_seq` was applied before (a crash between the
  commit and the ack): nothing changes, but the device's latest fact is sent again, since
  the crash may have come before it reached the bus (its id makes a second copy harmless);
- any other event is applied in stream order (`libs.device_state.apply`): a state fact for
  each change, with the message id `state:<device>:<version>`, so that a decision taken
  again on the same state publishes nothing new; and beside it, when its state,
  connection or mark changed (`AUDITED_CHANGES`), the same fact as a transition (message id
  `transition:<device>:<version>`), the one the recorder audits;
- an event whose data can never be applied is dead-lettered with the reason.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from libs import messages as m
from libs import subjects
from libs.device_state import Unapplicable, apply

Fact = tuple[str, bytes, str]  # subject, body, message id (as `bus.publish_many` takes them)

# A state fact is a transition (audited: `services.recorder.rows`) when one of these changed;
# most change attributes only (telemetry), which is history, not audit.
AUDITED_CHANGES = frozenset({"state", "connection", "mark"})


def is_transition(changed: Sequence[str]) -> bool:
    return not AUDITED_CHANGES.isdisjoint(changed)


class Standing(StrEnum):
    """Whether a registered device's events are applied: only an `active` one's are."""

    ACTIVE = "active"
    DISCONNECTED = "disconnected"
    PENDING = "pending"
    REJECTED = "rejected"


class Outcome(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    DEAD_LETTER = "dead_letter"


def standing(lifecycle: str, enabled: bool) -> Standing | None:
    """A registry entry's standing; None for a decommissioned device (as if unregistered)."""
    if lifecycle == m.Lifecycle.DECOMMISSIONED:
        return None
    if lifecycle == m.Lifecycle.PENDING:
        return Standing.PENDING
    if lifecycle == m.Lifecycle.REJECTED:
        return Standing.REJECTED
    return Standing.ACTIVE if enabled else Standing.DISCONNECTED


def refusal(event_type: str, standing: Standing | None) -> str | None:
    """Why an event of a device of this standing is not applied; None when it is."""
    if standing is None:
        return "device is not registered"
    if event_type == m.MOVED:
        # The platform's, not the device reporting: whatever its standing, it must not come
        # back to service in its new home with what it reported in the old one.
        return None
    if standing == Standing.PENDING:
        return "device is waiting for an administrator to approve it"
    if standing == Standing.REJECTED:
        return "device was rejected by an administrator"
    if standing == Standing.DISCONNECTED and event_type != "mark":
        return "device is disconnected by an administrator"
    return None


@dataclass(frozen=True, slots=True)
class Incoming:
    """One event of the batch: its stream sequence, when the stream received it, and the
    standing of its device when the batch is decided."""

    seq: int
    received: datetime
    event: m.CloudEvent
    standing: Standing | None


@dataclass
class Effects:
    """What the worker does for a decided batch: publish `facts` (in order), write `written`
    and `statuses` in one transaction, dead-letter `dead` (by stream sequence)."""

    written: dict[str, m.DeviceSnapshot] = field(default_factory=dict)
    statuses: list[tuple[str, m.CommandStatusData]] = field(default_factory=list)
    facts: list[Fact] = field(default_factory=list)
    dead: dict[int, str] = field(default_factory=dict)
    outcomes: collections.Counter[Outcome] = field(default_factory=collections.Counter)
    applied: collections.Counter[str] = field(default_factory=collections.Counter)  # by type


State = Mapping[str, m.DeviceSnapshot]


def decide(
    state: State, batch: Sequence[Incoming], now: datetime
) -> tuple[dict[str, m.DeviceSnapshot], Effects]:
    """The devices' state after `batch` (in stream order), and what to do about it.

    `state` holds the devices' snapshots as last decided (a device absent from it starts
    empty); it is not changed. `now` stamps the facts.
    """
    new = dict(state)
    out = Effects()
    for item in sorted(batch, key=lambda i: i.seq):
        event = item.event
        device_id = event.subject
        current = new.get(device_id) or m.DeviceSnapshot(device_id=device_id)
        if item.seq <= current.last_seq:
            out.outcomes[Outcome.DUPLICATE] += 1
            if item.seq == current.last_seq and current.version:
                out.facts.append(state_fact(current, current.state, ["attributes"], event, now))
            continue
        reason = refusal(event.type, item.standing)
        if reason:
            out.facts.append(rejected_fact(event, reason, item.seq, now))
            out.outcomes[Outcome.REJECTED] += 1
            continue
        try:
            result = apply(current, event, item.seq, item.received)
        except Unapplicable as exc:
            out.dead[item.seq] = str(exc)
            out.outcomes[Outcome.DEAD_LETTER] += 1
            continue
        after = result.snapshot
        new[device_id] = out.written[device_id] = after
        if result.command_status:
            out.statuses.append((device_id, result.command_status))
        if result.changed:
            fact = state_fact(after, current.state, result.changed, event, now)
            out.facts.append(fact)
            if is_transition(result.changed):
                out.facts.append(transition_fact(fact, after))
        out.outcomes[Outcome.APPLIED] += 1
        out.applied[event.type] += 1
    return new, out


def state_fact(
    new: m.DeviceSnapshot,
    previous_state: m.DeviceStateName,
    changed: list[str],
    event: m.CloudEvent,
    now: datetime,
) -> Fact:
    fact = m.DeviceStateFact(
        device_id=new.device_id,
        version=new.version,
        state=new.state,
        connection=new.connection,
        attributes=new.attributes,
        last_seen=new.last_seen,
        changed=changed,
        # A moved device had no state in its new home: a rule `from` one is not met by it.
        previous_state=None if event.type == m.MOVED else previous_state,
        cause_event_id=event.id,
        cause_type=event.type,
        correlation_id=event.correlationid,
        time=now,
        stale=new.stale,
    )
    return (
        subjects.device_state(new.device_id),
        m.encode(fact),
        f"state:{new.device_id}:{new.version}",
    )


def transition_fact(state: Fact, new: m.DeviceSnapshot) -> Fact:
    """The state fact `state` (of `new`) on the transition subject: its bytes, and an id of
    its own that a decision taken again on the same state gives again."""
    _, body, _ = state
    return (
        subjects.device_transition(new.device_id),
        body,
        f"transition:{new.device_id}:{new.version}",
    )


def rejected_fact(event: m.CloudEvent, reason: str, seq: int, now: datetime) -> Fact:
    fact = m.RejectedFact(
        device_id=event.subject,
        event_id=event.id,
        event_type=event.type,
        reason=reason,
        correlation_id=event.correlationid,
        time=now,
    )
    return subjects.device_rejected(event.subject), m.encode(fact), f"rejected:{seq}"
