"""The CloudEvents envelope: what is accepted, and what a refusal says."""

from __future__ import annotations

import msgspec
import pytest

from libs import messages as m


def test_envelope_round_trips_and_maps_to_its_subject() -> None:
    event = m.make_event("light-1", "telemetry", {"power_w": 60.0}, correlation_id="c1")
    again = m.cloud_event_decoder.decode(m.encode(event))
    assert again == event
    assert again.nats_subject == "events.light-1.telemetry"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"id":"1","source":"s","type":"t","subject":"d"}',
            "missing required field `specversion`",
        ),
        (b'{"id":"1","source":"s","type":"t","subject":"d","specversion":"0.3"}', "$.specversion"),
        (b'{"id":"1","source":"s","type":"a.b","subject":"d","specversion":"1.0"}', "$.type"),
        (
            b'{"id":"1","source":"s","type":"t","subject":"d","specversion":"1.0","x":1}',
            "unknown field `x`",
        ),
        (b'{"id":"","source":"s","type":"t","subject":"d","specversion":"1.0"}', "$.id"),
        (
            b'{"id":"1","source":"s","type":"t","subject":"d","specversion":"1.0","data":[]}',
            "$.data",
        ),
        (b'{"id": "1", ', "truncated"),
        (
            b'{"id":"1","source":"s","type":"t","subject":"d","specversion":"1.0",'
            b'"time":"2026-01-01T10:00:00"}',
            "timezone component - at `$.time`",
        ),
    ],
)
def test_bad_envelopes_are_refused_naming_the_field(body: bytes, message: str) -> None:
    with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)) as info:
        m.cloud_event_decoder.decode(body)
    assert message in str(info.value)


def test_attributes_must_be_flat() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.nested"):
        m.decode_attributes({"nested": {"a": 1}})
    assert m.decode_attributes({"on": True, "power_w": 1.5, "mode": "eco", "x": None})
