"""Device bodies: what a user sends (`DeviceCreate`, `DeviceUpdate`, `CommandCreate`) and what
the API answers (`Device`, `CommandView`, `HistoryItem`, `StatisticItem`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from libs import subjects
from libs.messages import (
    AttributeValue,
    CommandStatus,
    Connection,
    DeviceStateName,
    Name,
    Presence,
    Token,
)
from services.gateway.credentials.schemas import BusCredentials

Kind = Annotated[
    str,
    msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}(?!\n)$", description="light, energy_meter, ..."),
]
# home → floor → room: `home/ground/kitchen`.
LocationPath = Annotated[
    str,
    msgspec.Meta(
        pattern=rf"^{subjects.TOKEN}(/{subjects.TOKEN}){{0,7}}(?!\n)$",
        max_length=512,
        examples=["home/ground/kitchen"],
    ),
]
Lifecycle = Literal["pending", "active", "rejected", "decommissioned"]
Metadata = Annotated[
    dict[Annotated[str, msgspec.Meta(min_length=1, max_length=64)], Any],
    msgspec.Meta(max_length=100),
]
ReportIntervals = Annotated[
    dict[
        Annotated[str, msgspec.Meta(min_length=1, max_length=64)],
        Annotated[float, msgspec.Meta(gt=0, le=7 * 86400)] | None,
    ],
    msgspec.Meta(
        max_length=100,
        description="seconds each attribute may go unreported before it is stale, over the "
        "kind's defaults; null: never stale",
        examples=[{"power_w": 60}],
    ),
]


class DeviceCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Register a device; without `id` one is generated."""

    name: Name
    kind: Kind
    id: Token | None = None
    location: LocationPath | None = None
    metadata: Metadata = {}
    # The bridge that speaks for it on the bus (then it gets no credentials of its own).
    bridge: Token | None = None
    report_intervals: ReportIntervals = {}


class DeviceUpdate(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """Change some registry fields; absent fields stay, `location: null` clears it."""

    name: Name | UnsetType = UNSET
    kind: Kind | UnsetType = UNSET
    location: LocationPath | UnsetType | None = UNSET
    lifecycle: Lifecycle | UnsetType = UNSET
    metadata: Metadata | UnsetType = UNSET
    report_intervals: ReportIntervals | UnsetType = UNSET


class ActionParam(msgspec.Struct, frozen=True):
    """A number an action needs in `params`."""

    name: str
    expected: str  # e.g. "an integer 0-100"
    integer: bool
    low: float | None
    high: float | None


class DeviceAction(msgspec.Struct, frozen=True):
    """An action the device's kind accepts, and the params it takes (all required)."""

    name: str
    params: list[ActionParam]


class AttributeReport(msgspec.Struct, frozen=True):
    """When an attribute was last reported, how long it may go unreported (null: no
    expectation), and whether it is overdue while the device is online."""

    last_reported: datetime
    expected_interval_s: float | None
    stale: bool


class Device(msgspec.Struct, frozen=True):
    """The registry entry and the runtime state the actors keep for it. `actions` are what
    its kind accepts as commands; null for a kind the platform does not know (any action is
    sent, and the device answers those it lacks with a `failed` status)."""

    id: str
    name: str
    kind: str
    location: str | None
    lifecycle: Lifecycle
    enabled: bool
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    state: DeviceStateName
    connection: Connection
    attributes: dict[str, AttributeValue]
    last_seen: datetime | None
    version: int
    actions: list[DeviceAction] | None
    # The entry's own intervals, as set; `reports` shows those in force, defaults included.
    report_intervals: dict[str, float | None]
    # Per reported attribute; `stale` is also `presence`'s reason.
    reports: dict[str, AttributeReport]
    # `connection`, or `stale` when online with an attribute overdue.
    presence: Presence
    # Its bus username and password, in the answer to its registration only (shown once).
    credentials: BusCredentials | UnsetType = UNSET


class CommandCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    action: Token
    params: dict[str, Any] = {}
    expires_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 60.0


class CommandView(msgspec.Struct, frozen=True):
    id: str
    device_id: str
    action: str
    params: dict[str, Any]
    status: CommandStatus
    detail: str | None
    issued_by: str
    correlation_id: str
    issued_at: datetime
    expires_at: datetime
    updated_at: datetime


class HistoryItem(msgspec.Struct, frozen=True):
    """One telemetry or state message as the recorder stored it."""

    time: datetime
    type: str
    data: dict[str, Any]
    stream: str
    seq: int


class DevicePage(msgspec.Struct, frozen=True):
    """A page of devices; `next_cursor` continues it."""

    items: list[Device]
    next_cursor: str | None


class HistoryPage(msgspec.Struct, frozen=True):
    """A page of history entries, newest last; `next_cursor` continues it."""

    items: list[HistoryItem]
    next_cursor: str | None


class StatisticItem(msgspec.Struct, frozen=True):
    """One numeric attribute over one UTC hour, rolled up from the history by the recorder;
    `last` (at `last_time`) is what counts for a counter such as `energy_wh`."""

    hour: datetime
    attribute: str
    count: int
    mean: float
    min: float
    max: float
    last: float
    last_time: datetime


class StatisticsPage(msgspec.Struct, frozen=True):
    """A page of hourly statistics, oldest first; `next_cursor` continues it."""

    items: list[StatisticItem]
    next_cursor: str | None
