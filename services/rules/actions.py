"""What a firing rule does, action by action, and the trace it leaves."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import msgspec
from nats.js import JetStreamContext
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus, commands, rule_logic, subjects, tracing
from libs import messages as m
from libs.rule_logic import DeviceInfo, Episode

RUNS = Counter("smarthome_rule_runs_total", "Rule runs traced, by kind", ["kind"])
ERRORS = Counter(
    "smarthome_rule_errors_total", "Rule actions that failed (an error, or a refused device)"
)


class ActionRunner:
    def __init__(self, js: JetStreamContext, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._js = js
        self._sessions = sessions
        # The registry as the engine keeps it (a registry fact changes its entry).
        self.registry: Mapping[str, DeviceInfo] = {}

    async def run(
        self,
        rule: m.Rule,
        episode: Episode,
        actions: range,
        resume_at: datetime | None,
        kind: m.TraceKind,
        reason: str,
    ) -> None:
        """Run `actions` (a `plan_run`), each with its own outcome, then leave the trace.

        The actions go out back to back on the bus; the commands among them are recorded
        after, in one write: the devices do not wait for the database, nor does the next
        action (a mark sent 300 ms late by a busy database would land after its device moved
        on), and the commands still go out while the database is down."""
        outcomes = []
        sent: list[tuple[int, m.Command]] = []  # commands to record: (outcome index, command)
        for index in actions:
            action = rule.actions[index]
            if isinstance(action, m.DelayAction):
                assert resume_at is not None
                outcomes.append(
                    m.ActionOutcome(_name(action), True, f"resumes at {resume_at.isoformat()}")
                )
                continue
            try:
                with tracing.span("rules action", rule=rule.id, action=_name(action)):
                    outcome, command = await self._run(rule, episode, index, action)
            except Exception as exc:  # one failing action is traced; the engine goes on
                outcome = m.ActionOutcome(_name(action), False, f"{type(exc).__name__}: {exc}")
            else:
                if command is not None:
                    sent.append((len(outcomes), command))
            outcomes.append(outcome)
        await self._record(sent, outcomes)
        await self.trace(rule, episode, kind, reason, outcomes, part=actions.start)

    async def _record(
        self, sent: list[tuple[int, m.Command]], outcomes: list[m.ActionOutcome]
    ) -> None:
        if not sent:
            return
        try:
            await commands.record(self._sessions, *(command for _, command in sent))
        except Exception as exc:  # sent all the same; the recorder records it from the bus
            detail = f"sent; recorded later from the bus ({type(exc).__name__}: {exc})"
            for position, _ in sent:
                outcomes[position] = msgspec.structs.replace(outcomes[position], detail=detail)

    async def _run(
        self, rule: m.Rule, episode: Episode, index: int, action: m.Action
    ) -> tuple[m.ActionOutcome, m.Command | None]:
        """The action's outcome, and the command it sent (to be recorded) if any."""
        # Ids derive from the episode and the action's place: a re-run sends nothing twice.
        action_id = f"{episode.id}-{index}"
        if isinstance(action, m.NotifyAction):
            subject = await self._notify(rule, episode, action, action_id)
            return m.ActionOutcome(_name(action), True, f"alert on {subject}"), None
        assert not isinstance(action, m.DelayAction)  # a delay is not run (see `run`)
        refusal = rule_logic.refusal(action.device_id, self.registry, rule.home)
        if refusal:
            return m.ActionOutcome(_name(action), False, refusal), None
        match action:
            case m.CommandAction():
                command = await self._command(rule, episode, action, action_id)
                return m.ActionOutcome(_name(action), True, command_id=command.id), command
            case m.SetStateAction():
                await self.mark(rule, episode, action.device_id, action.state, f"mark-{action_id}")
                outcome = m.ActionOutcome(
                    _name(action), True, f"{action.device_id} marked {action.state}"
                )
                return outcome, None
            case m.PublishAction():
                event = m.make_event(
                    action.device_id,
                    action.event_type,
                    action.data,
                    source=f"rule/{rule.id}",
                    correlation_id=episode.id,
                    event_id=f"publish-{action_id}",
                )
                await bus.publish(self._js, event.nats_subject, event, msg_id=event.id)
                return m.ActionOutcome(_name(action), True, f"published {event.nats_subject}"), None
        raise TypeError(f"unknown action {action!r}")

    async def _command(
        self, rule: m.Rule, episode: Episode, action: m.CommandAction, action_id: str
    ) -> m.Command:
        command = commands.new(
            device_id=action.device_id,
            action=action.action,
            params=action.params,
            expires_s=action.expires_s,
            issued_by=f"rule:{rule.id}",
            correlation_id=episode.id,
            command_id=action_id,
        )
        await commands.publish(self._js, command)
        return command

    async def _notify(
        self, rule: m.Rule, episode: Episode, action: m.NotifyAction, action_id: str
    ) -> str:
        data = {
            "rule_id": rule.id,
            "message": action.message,
            "severity": action.severity,
            "values": episode.values,
            "rule_name": rule.name,
        }
        if rule.home is not None:  # the recorder files the alert under it (the audit log)
            data["home"] = rule.home
        alert = m.make_event(
            episode.device_id or rule.id,
            "alert",
            data,
            source=f"rule/{rule.id}",
            correlation_id=episode.id,
            event_id=f"alert-{action_id}",
        )
        # A named subscription or channel has its own consumer in the webhooks service.
        subject = subjects.rule_notification(rule.id, action.addressee)
        await bus.publish(self._js, subject, alert, msg_id=alert.id)
        return subject

    async def clear(self, rule: m.Rule, episode: Episode, note: str) -> None:
        """The episode ended: clear the marks its run set, then leave the trace."""
        outcomes = []
        for index, action in enumerate(rule.actions[: episode.next_action]):
            if isinstance(action, m.SetStateAction):
                await self.mark(
                    rule, episode, action.device_id, None, f"unmark-{episode.id}-{index}"
                )
                outcomes.append(m.ActionOutcome("clear_state", True, action.device_id))
        await self.trace(rule, episode, "cleared", note, outcomes)

    async def mark(
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

    async def trace(
        self,
        rule: m.Rule,
        episode: Episode,
        kind: m.TraceKind,
        reason: str,
        outcomes: list[m.ActionOutcome],
        part: int = 0,
    ) -> None:
        fired = m.RuleFired(
            rule_id=rule.id,
            episode_id=episode.id,
            kind=kind,
            device_id=episode.device_id,
            reason=reason,
            values=episode.values,
            outcomes=outcomes,
            trigger_event_id=episode.trigger_event_id,
            correlation_id=episode.id,
            time=m.now(),
            home=rule.home,
        )
        msg_id = f"{kind}:{episode.id}:{part}"
        if kind == "skipped":  # each skipped trigger is its own trace
            msg_id += f":{episode.trigger_event_id}"
        ack = await bus.publish(self._js, subjects.rule_fired(rule.id), fired, msg_id=msg_id)
        if not ack.duplicate:  # a run traced again after a crash is counted once
            RUNS.labels(kind).inc()
            ERRORS.inc(sum(not outcome.ok for outcome in outcomes))


def _name(action: m.Action) -> str:
    match action:
        case m.CommandAction():
            return f"command {action.action} -> {action.device_id}"
        case m.SetStateAction():
            return f"set_state {action.state} -> {action.device_id}"
        case m.NotifyAction():
            return f"notify {action.severity}"
        case m.PublishAction():
            return f"publish {action.event_type} -> {action.device_id}"
        case m.DelayAction():
            return f"delay {action.for_}"
    return type(action).__name__
