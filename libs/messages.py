"""Wire messages: every message on the bus and in HTTP bodies, as msgspec Structs.

Decoders are built once here and reused; their errors name the field path
(`Expected int, got str - at $.data.power_w`), which is what a 422 or a dead
letter carries.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

from libs import subjects

Token = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
AttributeValue = float | int | bool | str | None
Attributes = dict[Annotated[str, msgspec.Meta(max_length=64)], AttributeValue]

DeviceStateName = Literal["off", "active", "triggered"]
Connection = Literal["online", "offline"]
CommandStatus = Literal["pending", "delivered", "done", "failed", "expired"]


def now() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class CloudEvent(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    """CloudEvents 1.0, JSON structured mode. `subject` is the device id, `type` the event type.

    `correlationid` is a CloudEvents extension attribute: one id per cause,
    carried by everything the cause produces.
    """

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    type: Token
    subject: Token
    specversion: Literal["1.0"]
    time: datetime | None = None
    datacontenttype: Literal["application/json"] = "application/json"
    data: dict[str, Any] | None = None
    correlationid: Annotated[str, msgspec.Meta(max_length=128)] | None = None

    @property
    def nats_subject(self) -> str:
        return subjects.device_events(self.subject, self.type)


def make_event(
    device_id: str,
    event_type: str,
    data: dict[str, Any] | None = None,
    *,
    source: str | None = None,
    correlation_id: str | None = None,
    event_id: str | None = None,
) -> CloudEvent:
    return CloudEvent(
        id=event_id or new_id(),
        source=source or f"device/{device_id}",
        type=event_type,
        subject=device_id,
        specversion="1.0",
        time=now(),
        data=data,
        correlationid=correlation_id,
    )


# --- data of the event types the platform understands ---------------------------------


class CommandStatusData(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A device's answer to a command (event type `command_status`)."""

    command_id: str
    status: Literal["delivered", "done", "failed", "expired"]
    detail: str | None = None


class MarkData(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A rule marks a device's state (`triggered`) or clears its mark (state None)."""

    rule_id: str
    state: Literal["triggered"] | None = None


class PresenceTimeoutData(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """No heartbeat since `last_seen`: the device is offline unless it spoke since."""

    last_seen: datetime


class HelloData(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    firmware: str | None = None
    attributes: Attributes | None = None


# Event types whose data is attributes (`{"power_w": 60.0}`).
ATTRIBUTE_EVENTS = frozenset({"telemetry", "state"})
PRESENCE_EVENTS = frozenset({"hello", "heartbeat", "goodbye"})


_SCALARS = (bool, int, float, str, type(None))


def decode_attributes(data: dict[str, Any] | None) -> dict[str, AttributeValue]:
    """Attributes are flat: each value a number, boolean, string or null."""
    for key, value in (data or {}).items():
        if len(key) > 64:
            raise msgspec.ValidationError(f"attribute name longer than 64 - at `$.{key[:64]}`")
        if not isinstance(value, _SCALARS):
            raise msgspec.ValidationError(
                f"Expected a number, boolean, string or null, got `{type(value).__name__}`"
                f" - at `$.{key}`"
            )
    return dict(data or {})


# --- commands --------------------------------------------------------------------------


class Command(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Platform → device on `commands.<device_id>`; the id is also the Nats-Msg-Id."""

    id: str
    device_id: str
    action: Token
    params: dict[str, Any]
    issued_at: datetime
    expires_at: datetime
    issued_by: str
    correlation_id: str


# --- platform facts (stream SYSTEM) ----------------------------------------------------


class DeviceStateFact(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`system.device.<id>.state`: published by the actors when a device's state changed."""

    device_id: str
    version: int
    state: DeviceStateName
    connection: Connection
    attributes: dict[str, AttributeValue]
    last_seen: datetime | None
    changed: list[str]
    previous_state: DeviceStateName | None
    cause_event_id: str
    cause_type: str
    correlation_id: str | None
    time: datetime


class RegistryFact(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`system.device.<id>.registry`: the registry changed (created, updated, ...)."""

    device_id: str
    change: Literal["created", "updated", "deleted", "connected", "disconnected"]
    actor: str
    correlation_id: str
    time: datetime
    device: dict[str, Any] | None = None


class RejectedFact(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`system.device.<id>.rejected`: an event that was not applied, and why."""

    device_id: str
    event_id: str
    event_type: str
    reason: str
    correlation_id: str | None
    time: datetime


class ActionOutcome(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    action: str
    ok: bool
    detail: str | None = None
    command_id: str | None = None


class RuleFired(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`system.rule.<id>.fired`: one rule firing (or episode end) with its trace."""

    rule_id: str
    episode_id: str
    kind: Literal["fired", "cleared", "error"]
    device_id: str
    reason: str
    values: dict[str, AttributeValue]
    outcomes: list[ActionOutcome]
    trigger_event_id: str | None
    correlation_id: str
    time: datetime


# --- rules (skeleton; issue 4 grows the model) -----------------------------------------


class ThresholdTrigger(msgspec.Struct, tag="threshold", forbid_unknown_fields=True, frozen=True):
    device_id: Token
    attribute: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    above: float | None = None
    below: float | None = None
    equals: AttributeValue = None
    for_s: Annotated[float, msgspec.Meta(ge=0, le=86400 * 7)] = 0.0

    def __post_init__(self) -> None:
        if self.above is None and self.below is None and self.equals is None:
            raise ValueError("a threshold needs `above`, `below` or `equals`")
        if self.above is not None and self.below is not None and self.below <= self.above:
            # `above 10 below 20` is a band; `above 20 below 10` can never hold.
            raise ValueError("`below` must be greater than `above` (the band would be empty)")


class CommandAction(msgspec.Struct, tag="command", forbid_unknown_fields=True, frozen=True):
    device_id: Token
    action: Token
    params: dict[str, Any] = {}
    expires_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 60.0


class SetStateAction(msgspec.Struct, tag="set_state", forbid_unknown_fields=True, frozen=True):
    """Mark a device `triggered` while the episode lasts; cleared when it ends."""

    device_id: Token
    state: Literal["triggered"] = "triggered"


Trigger = ThresholdTrigger
Action = CommandAction | SetStateAction


class RuleSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A rule as a user writes it (POST /api/v1/rules)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    trigger: Trigger
    actions: Annotated[list[Action], msgspec.Meta(min_length=1, max_length=20)]
    enabled: bool = True
    id: Token | None = None


class Rule(msgspec.Struct, frozen=True):
    """A stored rule, as the rules service loads it."""

    id: str
    name: str
    trigger: Trigger
    actions: list[Action]
    enabled: bool
    version: int


# --- decoders, built once --------------------------------------------------------------

cloud_event_decoder = msgspec.json.Decoder(CloudEvent)
command_decoder = msgspec.json.Decoder(Command)
state_fact_decoder = msgspec.json.Decoder(DeviceStateFact)
registry_fact_decoder = msgspec.json.Decoder(RegistryFact)
rejected_fact_decoder = msgspec.json.Decoder(RejectedFact)
rule_fired_decoder = msgspec.json.Decoder(RuleFired)
rule_spec_decoder = msgspec.json.Decoder(RuleSpec)
encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    return encoder.encode(message)


class DeviceSnapshot(msgspec.Struct, frozen=True):
    """A device's runtime state as the actors keep it (cache value, API body part)."""

    device_id: str
    state: DeviceStateName = "off"
    mark: Literal["triggered"] | None = None
    connection: Connection = "offline"
    attributes: dict[str, AttributeValue] = {}
    last_seen: datetime | None = None
    version: int = 0
    last_seq: int = 0


snapshot_decoder = msgspec.json.Decoder(DeviceSnapshot)
