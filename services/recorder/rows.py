"""What each bus message becomes in the database. Pure: message in, rows out."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any

import msgspec

from libs import commands, subjects
from libs import messages as m
from libs.actor_batch import is_transition
from libs.principals import home_of
from libs.subjects import SubjectKind

# Heartbeats say only "still here": they update presence, not history. A move is audited
# through its registry fact.
NOT_HISTORY = frozenset({"heartbeat", "presence_timeout", m.MOVED})
AUDITED_EVENTS = frozenset({"hello", "goodbye", "command_status"})
AUDIT_TEXT = 200  # the audit table's actor and result columns
AUDIT_ACTION = 128
AUDIT_HOME = 128
AUDIT_ID = 128


class Rows(msgspec.Struct):
    """A message's rows, or a batch's. A Struct: one is made per message, and a Struct's
    empty lists cost a quarter of a dataclass's default factories."""

    history: list[dict[str, Any]] = []
    audit: list[dict[str, Any]] = []
    rule_runs: list[dict[str, Any]] = []
    commands: dict[str, dict[str, Any]] = {}  # by id: one write each

    @property
    def empty(self) -> bool:
        return not (self.history or self.audit or self.rule_runs or self.commands)


def _audit(
    rows: Rows,
    src: tuple[str, int],
    time: datetime,
    actor: str,
    action: str,
    device_id: str | None,
    result: str,
    correlation_id: str | None,
    detail: dict[str, Any] | None = None,
    home: str | None = None,
    *,
    target: str | None = None,
    reason: str | None = None,
    cause_id: str | None = None,
) -> None:
    """`home`: what the row is about belongs to it (a location, a homed rule or subscription,
    a device as its registry entry says); the audit log shows it to that home's residents,
    and the rows about a device to the residents of the home the device is in. `target`:
    what was acted on (the device by default); `cause_id`: the event that caused it."""
    if target is None and device_id is not None:
        target = f"device:{device_id}"
    rows.audit.append(
        {
            "time": time,
            # Clipped to their columns: anyone on the bus can publish a long one (an alert's
            # source or severity), and a row the database refuses would stop the recorder.
            "actor": actor[:AUDIT_TEXT],
            "action": action[:AUDIT_ACTION],
            "device_id": device_id,
            "target": target[:AUDIT_TEXT] if target else None,
            "result": result[:AUDIT_TEXT],
            "reason": reason,
            "correlation_id": correlation_id,
            "cause_id": cause_id[:AUDIT_ID] if cause_id else None,
            "detail": detail or {},
            "stream": src[0],
            "source_seq": src[1],
            "home": home[:AUDIT_HOME] if isinstance(home, str) else None,
        }
    )


# A fleet publishes on a bounded set of subjects (devices and their types): each is checked
# once while it stays among the latest (a few MB at most). What is cached is a plain tuple of
# strings, or an enum member: the garbage collector untracks the one and shares the other,
# where a NamedTuple per subject (tens of thousands at 10,000 devices) it would walk at
# every full collection.
SUBJECTS_CACHED = 32_768


@functools.lru_cache(maxsize=SUBJECTS_CACHED)
def _parsed(subject: str) -> tuple[str, str]:
    device_id, event_type = subjects.parse_device_event(subject)
    return device_id, event_type


@functools.lru_cache(maxsize=SUBJECTS_CACHED)
def _kind(subject: str) -> SubjectKind:
    return subjects.classify(subject).kind


def from_event(
    rows: Rows, subject: str, data: bytes, src: tuple[str, int], received: datetime
) -> None:
    """A device event: history, and an audit row for presence and command answers."""
    device_id, event_type = _parsed(subject)
    event = m.cloud_event_decoder.decode(data)
    if event_type not in NOT_HISTORY:
        rows.history.append(
            {
                "device_id": device_id,
                "time": event.time or received,
                "type": event_type,
                "data": event.data or {},
                "stream": src[0],
                "source_seq": src[1],
            }
        )
    if event_type in AUDITED_EVENTS:
        result, detail = event_type, {}
        if event_type == "command_status":
            status = msgspec.convert(event.data or {}, m.CommandStatusData)
            result = status.status
            detail = {"command_id": status.command_id, "detail": status.detail}
        _audit(
            rows,
            src,
            received,
            f"device:{device_id}",
            f"device.{event_type}",
            device_id,
            result,
            event.correlationid,
            detail,
            reason=detail.get("detail"),
            cause_id=event.id,
        )


def from_command(rows: Rows, data: bytes, src: tuple[str, int]) -> None:
    cmd = m.command_decoder.decode(data)
    rows.commands.setdefault(cmd.id, commands.row(cmd))  # recorded already: changes nothing
    _audit(
        rows,
        src,
        cmd.issued_at,
        cmd.issued_by,
        "command.sent",
        cmd.device_id,
        "pending",
        cmd.correlation_id,
        {"command_id": cmd.id, "action": cmd.action, "params": cmd.params},
        target=f"command:{cmd.id}",
    )


def from_system(rows: Rows, subject: str, data: bytes, src: tuple[str, int]) -> None:
    """Platform facts: transitions (state changes), registry changes, rejections, rule
    firings, alerts, notifications, users' changes. Nothing of a state fact (its consumer
    does not receive them: `libs.bus.RECORDER_SYSTEM_KINDS`): the one audited is its
    transition."""
    kind = _kind(subject)
    if kind in DEVICE_FACTS:
        _from_device_fact(rows, kind, data, src)
    elif kind in (SubjectKind.ALERT, SubjectKind.NOTIFICATION):  # notify: to one webhook
        alert = m.cloud_event_decoder.decode(data)
        body = alert.data or {}
        _audit(
            rows,
            src,
            alert.time or m.now(),
            alert.source.replace("/", ":", 1),
            "alert.raised",
            alert.subject,
            str(body.get("severity", "info")),
            alert.correlationid,
            body,
            body.get("home"),  # a homed rule's (see services.rules.actions)
            reason=_text(body.get("message")),
            cause_id=alert.id,
        )
    elif kind in subjects.CHANGE_KINDS:
        fact = m.change_fact_decoder.decode(data)
        _audit(
            rows,
            src,
            fact.time,
            fact.actor,
            f"{fact.what}.{fact.change}",
            None,
            "ok",
            fact.correlation_id,
            {"id": fact.id, fact.what: fact.detail},
            fact.home,
            target=f"{fact.what}:{fact.id}",
        )
    elif kind is SubjectKind.RULE_FIRED:
        fired = m.rule_fired_decoder.decode(data)
        rows.rule_runs.append(
            {
                "rule_id": fired.rule_id,
                "episode_id": fired.episode_id,
                "kind": fired.kind,
                "time": fired.time,
                "device_id": fired.device_id,
                "reason": fired.reason,
                "values": fired.values,
                "outcomes": msgspec.to_builtins(fired.outcomes),
                "correlation_id": fired.correlation_id,
                "source_seq": src[1],
            }
        )
        ok = all(o.ok for o in fired.outcomes)
        _audit(
            rows,
            src,
            fired.time,
            f"rule:{fired.rule_id}",
            f"rule.{fired.kind}",
            fired.device_id,
            "ok" if ok else "action failed",
            fired.correlation_id,
            {"reason": fired.reason, "outcomes": msgspec.to_builtins(fired.outcomes)},
            fired.home,
            reason=fired.reason,
            cause_id=fired.trigger_event_id,
        )


DEVICE_FACTS = frozenset(
    {SubjectKind.DEVICE_TRANSITION, SubjectKind.DEVICE_REGISTRY, SubjectKind.DEVICE_REJECTED}
)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _from_device_fact(rows: Rows, fact: SubjectKind, data: bytes, src: tuple[str, int]) -> None:
    if fact is SubjectKind.DEVICE_TRANSITION:
        # The actors publish one beside each state fact that changed state, connection or
        # mark; attribute-only changes are history (telemetry), not audit.
        s = m.state_fact_decoder.decode(data)
        if not is_transition(s.changed):
            return
        actor = (
            "platform:actors"
            if s.cause_type in ("mark", "presence_timeout", m.MOVED)
            else f"device:{s.device_id}"
        )
        _audit(
            rows,
            src,
            s.time,
            actor,
            "state.changed",
            s.device_id,
            f"{s.previous_state}->{s.state} ({s.connection})",
            s.correlation_id,
            {"version": s.version, "changed": s.changed, "cause": s.cause_type},
            reason=s.cause_type,
            cause_id=s.cause_event_id,
        )
    elif fact is SubjectKind.DEVICE_REGISTRY:
        r = m.registry_fact_decoder.decode(data)
        # The home it was in then: a device deleted or moved away stays in that home's log.
        home = home_of(r.device.location if r.device else None)
        _audit(
            rows,
            src,
            r.time,
            r.actor,
            f"device.{r.change}",
            r.device_id,
            "ok",
            r.correlation_id,
            home=home,
        )
    elif fact is SubjectKind.DEVICE_REJECTED:
        rejected = m.rejected_fact_decoder.decode(data)
        _audit(
            rows,
            src,
            rejected.time,
            f"device:{rejected.device_id}",
            "event.rejected",
            rejected.device_id,
            rejected.reason,
            rejected.correlation_id,
            {"event_id": rejected.event_id, "event_type": rejected.event_type},
            reason=rejected.reason,
            cause_id=rejected.event_id,
        )
