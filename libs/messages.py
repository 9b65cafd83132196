"""Wire messages: every message on the bus and in HTTP bodies, as msgspec Structs.

Decoders are built once here and reused; their errors name the field path
(`Expected int, got str - at $.data.power_w`), which is what a 422 or a dead
letter carries.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import cronsim
import msgspec

from libs import subjects

# `(?!\n)$`: Python's `$` also matches before a final newline, so `abc\n` would pass; the
# look-ahead pins the end, and unlike `\Z` it is valid in the OpenAPI document's regex dialect.
Token = Annotated[str, msgspec.Meta(pattern=rf"^{subjects.TOKEN}(?!\n)$")]
# What a person names a thing: any text but control characters (Postgres refuses a NUL).
Name = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=200,
        pattern=r"^[^\x00-\x1f\x7f]+(?!\n)$",
        description="any text but control characters",
    ),
]
AttributeValue = float | int | bool | str | None
Attributes = dict[Annotated[str, msgspec.Meta(max_length=64)], AttributeValue]

# A time from outside with its zone (`Z` or `+01:00`): a naive one means nothing across
# homes and time zones, and the database refuses it (it stores UTC).
ZonedTime = Annotated[
    datetime,
    msgspec.Meta(
        tz=True, description="RFC 3339 time with its offset", examples=["2025-01-31T18:00:00Z"]
    ),
]
DeviceStateName = Literal["off", "active", "triggered"]
Connection = Literal["online", "offline"]
# A device's connection as an operator sees it: `stale` is online with at least one attribute
# not reported for longer than expected (the gauge `smarthome_devices`, rule triggers).
Presence = Literal["online", "offline", "stale"]
CommandStatus = Literal["pending", "delivered", "done", "failed", "expired"]
# What a rule's trace (`RuleFired`) records: a first run, a run after a delay, an end, ...
TraceKind = Literal["fired", "continued", "cleared", "skipped", "error"]


class Lifecycle(StrEnum):
    """Where a device is in the registry: only an `active` one is commanded or applied."""

    PENDING = "pending"
    ACTIVE = "active"
    REJECTED = "rejected"
    DECOMMISSIONED = "decommissioned"


class RegistryChange(StrEnum):
    """What happened to a registry entry (`RegistryFact.change`)."""

    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"


class RuleMode(StrEnum):
    """What a rule does with a trigger that comes while its last run is still running."""

    SINGLE = "single"  # the new trigger is skipped (traced)
    RESTART = "restart"  # the running one is replaced
    QUEUED = "queued"  # the new one runs after it


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
    time: ZonedTime | None = None
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
    """What the presence scan found. `last_seen`: no heartbeat since then, the device is
    offline unless it spoke since. `stale`: the attributes overdue, each with the report time
    it was judged by; an attribute reported since stays fresh, and one stale before but not
    listed is fresh again (its expected interval changed)."""

    last_seen: datetime | None = None
    stale: dict[str, datetime] | None = None


# A device placed in another home: it starts afresh there (`MovedData`).
MOVED = "moved"


class MovedData(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The gateway moved the device to another home (event type `moved`, published with the
    registry change): what it reported in its old home is not its new home's state."""

    home: str | None  # None: placed in no home


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
    # Attributes not reported for longer than expected (while online); `stale` in `changed`
    # when this set changed.
    stale: list[str] = []


class RegistryEntry(msgspec.Struct, frozen=True):
    """A device's registry entry as a registry fact carries it (what it is after the change).

    Unknown fields are ignored and every field has a default, so that a fact written before
    a field existed (or by a tool that sent a part) still decodes."""

    id: str = ""
    name: str = ""
    kind: str = ""
    location: str | None = None
    lifecycle: Lifecycle = Lifecycle.ACTIVE
    enabled: bool = True
    metadata: dict[str, Any] = {}
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def tags(self) -> tuple[str, ...]:
        """The tags a rule's selector matches (`metadata.tags`)."""
        tags = self.metadata.get("tags")
        return tuple(str(t) for t in tags) if isinstance(tags, list) else ()


class RegistryFact(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`system.device.<id>.registry`: the registry changed (created, updated, ...)."""

    device_id: str
    change: RegistryChange
    actor: str
    correlation_id: str
    time: datetime
    device: RegistryEntry | None = None


class ChangeFact(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A user created, updated or deleted a location (`system.location.<id>`), a rule
    (`system.rule.<id>.changed`), a webhook subscription (`system.subscription.<id>.changed`),
    a user (`system.user.<id>.changed`) or an API key (`system.apikey.<id>.changed`):
    `what` says which, `detail` what it is now (never a secret). The recorder audits it."""

    what: Literal[
        "location",
        "rule",
        "subscription",
        "user",
        "apikey",
        "credentials",
        "bridge",
        "provisioning",
        "deadletter",
        "channel",
    ]
    id: str
    change: Literal[
        "created", "updated", "deleted", "redelivered", "revoked", "rotated", "redriven"
    ]
    actor: str
    correlation_id: str
    time: datetime
    detail: dict[str, Any] = {}
    # The home it belongs to (a location's, a homed rule's or subscription's): residents of
    # that home see the fact live and in the audit log. None: administrators only.
    home: str | None = None


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
    kind: TraceKind
    device_id: str
    reason: str
    values: dict[str, AttributeValue]
    outcomes: list[ActionOutcome]
    trigger_event_id: str | None
    correlation_id: str
    time: datetime
    home: str | None = None  # the rule's home: its residents see the trace in the audit log


# --- rules -----------------------------------------------------------------------------
# A rule: a trigger, optional conditions, actions in order. Validation that crosses fields
# is in __post_init__ so the decoder's error names the struct (`$.trigger`).

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_CLOCK = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
MAX_DURATION_S = 7 * 86400.0


def parse_duration(value: str | float | int, what: str = "for") -> float:
    """`30s`, `10m`, `1.5h`, `2d`, or a number of seconds -> seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(str(value).strip())
        if not match:
            raise ValueError(f"`{what}`: {value!r} is not a duration like 30s, 10m, 1h or 2d")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not 0 <= seconds <= MAX_DURATION_S:
        raise ValueError(f"`{what}`: {value!r} must be between 0 and 7 days")
    return seconds


DurationValue = str | float


class Selector(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Devices by kind, location prefix (`home/ground`) and/or tag (in their metadata.tags)."""

    kind: Token | None = None
    location: Annotated[str, msgspec.Meta(max_length=512)] | None = None
    tag: Token | None = None

    def __post_init__(self) -> None:
        if self.kind is None and self.location is None and self.tag is None:
            raise ValueError("a selector needs `kind`, `location` or `tag`")


class ThresholdTrigger(msgspec.Struct, tag="threshold", forbid_unknown_fields=True, frozen=True):
    """An attribute crossing a line, optionally for a while; hysteresis stops flapping."""

    attribute: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    device_id: Token | None = None
    selector: Selector | None = None
    above: float | None = None
    below: float | None = None
    between: tuple[float, float] | None = None
    equals: AttributeValue = None
    hysteresis: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    for_: DurationValue = msgspec.field(default=0.0, name="for")

    def __post_init__(self) -> None:
        _one_target(self.device_id, self.selector)
        if self.between is not None:
            if self.above is not None or self.below is not None:
                raise ValueError("use `between` or `above`/`below`, not both")
            low, high = self.between
            if not low < high:
                raise ValueError("`between` must be [low, high] with low < high")
        if self.above is None and self.below is None and self.equals is None and not self.between:
            raise ValueError("a threshold needs `above`, `below`, `between` or `equals`")
        if self.above is not None and self.below is not None and self.below <= self.above:
            # `above 10 below 20` is a band; `above 20 below 10` can never hold.
            raise ValueError("`below` must be greater than `above` (the band would be empty)")
        if self.hysteresis and self.equals is not None:
            raise ValueError("`hysteresis` applies to `above`/`below`/`between`, not `equals`")
        parse_duration(self.for_)

    @property
    def low(self) -> float | None:
        return self.between[0] if self.between else self.above

    @property
    def high(self) -> float | None:
        return self.between[1] if self.between else self.below

    @property
    def for_s(self) -> float:
        return parse_duration(self.for_)


class EventTrigger(msgspec.Struct, tag="event", forbid_unknown_fields=True, frozen=True):
    """Every event on a subject pattern (`events.*.button`) whose data matches `match`."""

    subject: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    match: dict[str, AttributeValue] = {}

    def __post_init__(self) -> None:
        if not subjects.is_filter(self.subject) or not self.subject.startswith("events."):
            raise ValueError(f"`subject` {self.subject!r} must be a pattern under `events.`")


class StateTrigger(msgspec.Struct, tag="state", forbid_unknown_fields=True, frozen=True):
    """A device's `state` or `connection` changing to a value (from a value), for a while.

    `connection` `stale` holds while the device is online with an attribute overdue, and ends
    when it reports again; `online` holds whether or not an attribute is overdue."""

    device_id: Token
    to: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    attribute: Literal["state", "connection"] = "state"
    from_: Annotated[str, msgspec.Meta(max_length=32)] | None = msgspec.field(
        default=None, name="from"
    )
    for_: DurationValue = msgspec.field(default=0.0, name="for")

    def __post_init__(self) -> None:
        for name, value in (("to", self.to), ("from", self.from_)):
            if self.attribute == "state":
                allowed: tuple[str, ...] = ("off", "active", "triggered")
            elif name == "to":
                allowed = ("online", "offline", "stale")
            else:  # a fact says whether a device is stale, not whether it was just before
                allowed = ("online", "offline")
            if value is not None and value not in allowed:
                raise ValueError(
                    f"`{name}` must be one of {', '.join(allowed)} for {self.attribute}"
                )
        parse_duration(self.for_)

    @property
    def for_s(self) -> float:
        return parse_duration(self.for_)


class ScheduleTrigger(msgspec.Struct, tag="schedule", forbid_unknown_fields=True, frozen=True):
    """Cron times (5 fields: minute hour day month weekday) in the home's time zone."""

    cron: Annotated[str, msgspec.Meta(min_length=9, max_length=128)]
    timezone: Annotated[str, msgspec.Meta(max_length=64)] = "UTC"

    def __post_init__(self) -> None:
        fields = self.cron.split()
        if len(fields) != 5:
            raise ValueError(
                f"`cron` needs 5 fields (minute hour day month weekday), got {len(fields)}"
            )
        try:
            cronsim.CronSim(self.cron, datetime.now(UTC))
        except cronsim.CronSimError as exc:
            raise ValueError(f"`cron` {self.cron!r}: {exc}") from None
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"`timezone` {self.timezone!r} is not an IANA time zone") from None


Trigger = ThresholdTrigger | EventTrigger | StateTrigger | ScheduleTrigger


class AttributeCondition(msgspec.Struct, tag="attribute", forbid_unknown_fields=True, frozen=True):
    device_id: Token
    attribute: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    above: float | None = None
    below: float | None = None
    equals: AttributeValue = None

    def __post_init__(self) -> None:
        if self.above is None and self.below is None and self.equals is None:
            raise ValueError("an attribute condition needs `above`, `below` or `equals`")


class StateCondition(msgspec.Struct, tag="state", forbid_unknown_fields=True, frozen=True):
    device_id: Token
    state: DeviceStateName | None = None
    connection: Connection | None = None


class TimeCondition(msgspec.Struct, tag="time", forbid_unknown_fields=True, frozen=True):
    """Between two clock times (`22:00`-`06:00` wraps midnight), on some weekdays (0=Monday)."""

    after: str | None = None
    before: str | None = None
    weekdays: list[Annotated[int, msgspec.Meta(ge=0, le=6)]] | None = None
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        for name, value in (("after", self.after), ("before", self.before)):
            if value is not None and not _CLOCK.fullmatch(value):
                raise ValueError(f"`{name}` {value!r} is not a time like 07:30")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"`timezone` {self.timezone!r} is not an IANA time zone") from None


class AllOf(msgspec.Struct, tag="all", forbid_unknown_fields=True, frozen=True):
    conditions: list[Condition]


class AnyOf(msgspec.Struct, tag="any", forbid_unknown_fields=True, frozen=True):
    conditions: list[Condition]


class Not(msgspec.Struct, tag="not", forbid_unknown_fields=True, frozen=True):
    condition: Condition


Condition = AttributeCondition | StateCondition | TimeCondition | AllOf | AnyOf | Not


class CommandAction(msgspec.Struct, tag="command", forbid_unknown_fields=True, frozen=True):
    device_id: Token
    action: Token
    params: dict[str, Any] = {}
    expires_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 60.0


class SetStateAction(msgspec.Struct, tag="set_state", forbid_unknown_fields=True, frozen=True):
    """Mark a device `triggered` while the episode lasts; cleared when it ends."""

    device_id: Token
    state: Literal["triggered"] = "triggered"


class NotifyAction(msgspec.Struct, tag="notify", forbid_unknown_fields=True, frozen=True):
    """An alert: to one webhook subscription or one notification channel (an e-mail, Slack or
    ntfy message) when named (`system.notify.<id>`, delivered by the webhooks service), else
    on `system.alert.<rule_id>` for whoever subscribed to alerts."""

    message: Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]
    severity: Literal["info", "warning", "critical"] = "info"
    subscription_id: Token | None = None
    channel: Token | None = None

    def __post_init__(self) -> None:
        if self.subscription_id is not None and self.channel is not None:
            raise ValueError("name a subscription_id or a channel, not both")

    @property
    def addressee(self) -> str | None:
        """The subscription or channel the alert goes to (`system.notify.<it>`)."""
        return self.channel or self.subscription_id


class PublishAction(msgspec.Struct, tag="publish", forbid_unknown_fields=True, frozen=True):
    """A custom event on `events.<device_id>.<event_type>`."""

    device_id: Token
    event_type: Token
    data: dict[str, Any] = {}


class DelayAction(msgspec.Struct, tag="delay", forbid_unknown_fields=True, frozen=True):
    """Wait before the next action; the wait survives restarts."""

    for_: DurationValue = msgspec.field(name="for")

    def __post_init__(self) -> None:
        parse_duration(self.for_)

    @property
    def seconds(self) -> float:
        return parse_duration(self.for_)


Action = CommandAction | SetStateAction | NotifyAction | PublishAction | DelayAction


class RuleSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A rule as a user writes it (POST /api/v1/rules)."""

    name: Name
    trigger: Trigger
    actions: Annotated[list[Action], msgspec.Meta(min_length=1, max_length=20)]
    conditions: list[Condition] = []
    mode: RuleMode = RuleMode.SINGLE
    enabled: bool = True
    id: Token | None = None
    home: Annotated[
        Token | None,
        msgspec.Meta(
            description="the home whose devices the rule reads and commands; a "
            "resident's rule always has one (its only home when omitted)"
        ),
    ] = None


class Rule(msgspec.Struct, frozen=True):
    """A stored rule, as the rules service loads it."""

    id: str
    name: str
    trigger: Trigger
    actions: list[Action]
    enabled: bool
    version: int
    conditions: list[Condition] = []
    mode: RuleMode = RuleMode.SINGLE
    # Its devices are this home's only (`rule_logic.in_home`); None: any device (an admin's).
    home: str | None = None


def _one_target(device_id: str | None, selector: Selector | None) -> None:
    if (device_id is None) == (selector is None):
        raise ValueError("give exactly one of `device_id` and `selector`")


# --- decoders, built once --------------------------------------------------------------

cloud_event_decoder = msgspec.json.Decoder(CloudEvent)
command_decoder = msgspec.json.Decoder(Command)
state_fact_decoder = msgspec.json.Decoder(DeviceStateFact)
registry_fact_decoder = msgspec.json.Decoder(RegistryFact)
change_fact_decoder = msgspec.json.Decoder(ChangeFact)
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
    # When each attribute was last reported (the stream's clock), and those overdue.
    reported: dict[str, datetime] = {}
    stale: list[str] = []


snapshot_decoder = msgspec.json.Decoder(DeviceSnapshot)


# --- notification channels -------------------------------------------------------------------

EmailAddress = Annotated[str, msgspec.Meta(pattern=r"^[^@\s]+@[^@\s]+$", max_length=254)]


class EmailChannel(
    msgspec.Struct, tag="email", tag_field="kind", forbid_unknown_fields=True, frozen=True
):
    """Each alert as an e-mail, over SMTP (`security`: STARTTLS, implicit TLS, or none)."""

    host: Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
    from_: EmailAddress = msgspec.field(name="from")
    to: Annotated[list[EmailAddress], msgspec.Meta(min_length=1, max_length=20)]
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 587
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    password: Annotated[str, msgspec.Meta(max_length=1024, description="write-only")] | None = None


class SlackChannel(
    msgspec.Struct, tag="slack", tag_field="kind", forbid_unknown_fields=True, frozen=True
):
    """Each alert POSTed to a Slack-compatible incoming webhook (`{"text": ...}`)."""

    url: Annotated[
        str,
        msgspec.Meta(
            min_length=1, max_length=2048, description="the webhook URL; write-only (its token)"
        ),
    ]


class NtfyChannel(
    msgspec.Struct, tag="ntfy", tag_field="kind", forbid_unknown_fields=True, frozen=True
):
    """Each alert published to an ntfy topic (`POST <server>/<topic>`)."""

    topic: Token
    server: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)] = "https://ntfy.sh"
    token: Annotated[str, msgspec.Meta(max_length=1024, description="write-only")] | None = None


ChannelConfig = EmailChannel | SlackChannel | NtfyChannel
