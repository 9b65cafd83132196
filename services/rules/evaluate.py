"""Pure rule logic: does a trigger hold, and what an episode becomes on a new value."""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec

from libs import messages as m


class Episode(msgspec.Struct, frozen=True):
    """A period in which a rule's trigger holds for a device. Kept in JetStream KV."""

    rule_id: str
    device_id: str
    started_at: datetime
    deadline: datetime
    fired: bool = False
    trigger_event_id: str | None = None
    values: dict[str, m.AttributeValue] = {}

    @property
    def id(self) -> str:
        """Deterministic: the same episode always dedups to the same firing."""
        return f"{self.rule_id}-{int(self.started_at.timestamp() * 1_000_000)}"


episode_decoder = msgspec.json.Decoder(Episode)


def holds(trigger: m.ThresholdTrigger, attributes: dict[str, m.AttributeValue]) -> bool:
    value = attributes.get(trigger.attribute)
    if trigger.equals is not None:
        return value == trigger.equals
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if trigger.above is not None and not value > trigger.above:
        return False
    return not (trigger.below is not None and not value < trigger.below)


def step(
    episode: Episode | None,
    rule: m.Rule,
    attributes: dict[str, m.AttributeValue],
    at: datetime,
    cause_id: str | None,
) -> tuple[Episode | None, str]:
    """The episode after a new observation, and what happened: start, hold, end or none."""
    trigger = rule.trigger
    if holds(trigger, attributes):
        if episode is not None:
            return episode, "hold"
        started = Episode(
            rule_id=rule.id,
            device_id=trigger.device_id,
            started_at=at,
            deadline=at + timedelta(seconds=trigger.for_s),
            trigger_event_id=cause_id,
            values={trigger.attribute: attributes.get(trigger.attribute)},
        )
        return started, "start"
    if episode is not None:
        return None, "end"
    return None, "none"


def due(episode: Episode, now: datetime) -> bool:
    return not episode.fired and episode.deadline <= now
