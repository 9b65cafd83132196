"""A device's state derived from its events: `apply(snapshot, event) -> Applied`.

Pure: no I/O, no clock. The actors apply it to the live stream; the gateway's rule dry-run
replays recorded history through it, so that both derive `state` and `connection` alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import msgspec

from libs import messages as m
from libs.messages import CloudEvent, DeviceSnapshot

# Events the platform publishes about a device (rule actions) say nothing of its presence.
PLATFORM_SOURCES = ("rule/", "service/")


class Unapplicable(ValueError):
    """The event's data can never be applied (it goes to the dead-letter stream)."""


@dataclass(frozen=True)
class Applied:
    snapshot: DeviceSnapshot
    changed: list[str]  # empty: nothing a reader would see changed (no new version)
    command_status: m.CommandStatusData | None = None


def derive_state(mark: str | None, attributes: dict[str, m.AttributeValue]) -> m.DeviceStateName:
    """`triggered` while a rule marks it; `off` when it reports off or draws no power."""
    if mark == "triggered":
        return "triggered"
    if attributes.get("on") is False:
        return "off"
    if "on" not in attributes and attributes.get("power_w") in (0, 0.0):
        return "off"
    return "active" if attributes else "off"


def overdue(
    intervals: Mapping[str, float], reported: Mapping[str, datetime], now: datetime
) -> dict[str, datetime]:
    """The attributes not reported for longer than their interval, with when they last were.

    An attribute never reported is not overdue: silence is judged from a report on (a meter
    without an `energy_wh` counter is not broken for lacking one)."""
    return {
        name: at
        for name, at in reported.items()
        if name in intervals and now - at > timedelta(seconds=intervals[name])
    }


def presence(connection: m.Connection, stale: list[str]) -> m.Presence:
    """The connection an operator sees: `stale` when online with an attribute overdue."""
    return "stale" if connection == "online" and stale else connection


def apply(snapshot: DeviceSnapshot, event: CloudEvent, seq: int, received: datetime) -> Applied:
    """Apply one event of this device, received by the stream at `received` (its clock)."""
    attributes = dict(snapshot.attributes)
    reported = dict(snapshot.reported)
    stale = set(snapshot.stale)
    mark = snapshot.mark
    connection = snapshot.connection
    last_seen = snapshot.last_seen
    status: m.CommandStatusData | None = None
    said: dict[str, m.AttributeValue] = {}
    try:
        match event.type:
            case "mark":
                mark = msgspec.convert(event.data or {}, m.MarkData).state
            case "presence_timeout":
                found = msgspec.convert(event.data or {}, m.PresenceTimeoutData, strict=False)
                # A device that spoke after the check that found it silent stays online.
                if found.last_seen is not None and (
                    last_seen is None or last_seen <= found.last_seen
                ):
                    connection = "offline"
                if found.stale is not None:
                    # An attribute reported after the check that found it overdue is fresh.
                    stale = {
                        name
                        for name, at in found.stale.items()
                        if name in reported and reported[name] <= at
                    }
            case m.MOVED if event.source.startswith(PLATFORM_SOURCES):
                msgspec.convert(event.data or {}, m.MovedData)
                # In its new home it starts afresh: what it reported (and when) in the old
                # one is not that home's. Its connection, `last_seen` (what its presence is
                # judged by; residents see it from the move on: `scope.state_since_home`) and
                # a rule's mark stay: it is no more and no less connected for being moved.
                attributes, reported, stale = {}, {}, set()
            case _:
                if not event.source.startswith(PLATFORM_SOURCES):  # the device spoke
                    last_seen = received
                    connection = "offline" if event.type == "goodbye" else "online"
                if event.type in m.ATTRIBUTE_EVENTS:
                    said = m.decode_attributes(event.data)
                elif event.type == "hello":
                    hello = msgspec.convert(event.data or {}, m.HelloData)
                    said = dict(hello.attributes or {})
                elif event.type == "command_status":
                    status = msgspec.convert(event.data or {}, m.CommandStatusData)
    except msgspec.ValidationError as exc:
        raise Unapplicable(f"{event.type} data: {exc}".replace("`$", "`$.data")) from exc

    attributes.update(said)
    if not event.source.startswith(PLATFORM_SOURCES):
        # A rule's event setting an attribute is not the device reporting it.
        reported.update(dict.fromkeys(said, received))
        stale -= said.keys()
    if connection == "offline":
        stale = set()  # staleness is an online device's: offline says more
    state = derive_state(mark, attributes)
    changed = [
        name
        for name, before, after in (
            ("state", snapshot.state, state),
            ("mark", snapshot.mark, mark),
            ("connection", snapshot.connection, connection),
            ("attributes", snapshot.attributes, attributes),
            ("stale", snapshot.stale, sorted(stale)),
        )
        if before != after
    ]
    new = DeviceSnapshot(
        device_id=snapshot.device_id,
        state=state,
        mark=mark,
        connection=connection,
        attributes=attributes,
        last_seen=last_seen,
        version=snapshot.version + (1 if changed else 0),
        last_seq=seq,
        reported=reported,
        stale=sorted(stale),
    )
    return Applied(new, changed, status)
