"""The operator CLI's pure parts: gateway URLs, Server-Sent Event frames, command params,
times, and problem details as one line."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.ctl.config import normalize_url
from services.ctl.devices import parse_params
from services.ctl.errors import ApiError, CtlError
from services.ctl.events import frames
from services.ctl.output import cell
from services.ctl.times import instant


@pytest.mark.parametrize(
    "given",
    [
        "127.0.0.1:8000",
        "http://127.0.0.1:8000/",
        "http://127.0.0.1:8000/api/v1",
        " http://127.0.0.1:8000/api/v1/ ",
    ],
)
def test_every_natural_spelling_of_a_gateway_is_its_root(given: str) -> None:
    assert normalize_url(given) == "http://127.0.0.1:8000"


def test_sse_frames_are_read_with_their_sequence_and_subject_and_comments_left_out() -> None:
    body = [
        ": subscribed", "",
        "id: 7", "event: events.lamp.telemetry", 'data: {"a":', "data: 1}", "",
        ": heartbeat", "",
        "event: error", 'data: {"detail": "behind"}', "",
    ]  # fmt: skip

    read = list(frames(iter(body)))

    assert [(f.id, f.event, f.data) for f in read] == [
        ("7", "events.lamp.telemetry", ['{"a":', "1}"]),
        (None, "error", ['{"detail": "behind"}']),
    ]


def test_command_params_are_json_when_they_read_as_json() -> None:
    assert parse_params(["level=40", "name=kitchen", "on=true", 'x={"a": 1}']) == {
        "level": 40,
        "name": "kitchen",
        "on": True,
        "x": {"a": 1},
    }
    with pytest.raises(CtlError, match="name=value"):
        parse_params(["level"])


def test_times_are_iso_or_a_span_before_now() -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    assert instant("90m", "--since", now) == "2026-03-01T10:30:00+00:00"
    assert instant("2026-02-01T00:00:00", "--since", now) == "2026-02-01T00:00:00+00:00"
    assert instant("now", "--until", now) == now.isoformat()
    with pytest.raises(CtlError, match="--since 'yesterday'"):
        instant("yesterday", "--since", now)


def test_a_problem_is_one_line_with_the_fields_its_detail_does_not_name() -> None:
    named = ApiError(
        422,
        {
            "detail": "$.kind: Expected `str`",
            "errors": [{"field": "$.kind", "message": "Expected `str`"}],
        },
        "",
    )
    unnamed = ApiError(
        422, {"detail": "Invalid input", "errors": [{"field": "$.name", "message": "too long"}]}, ""
    )
    missing_route = ApiError(404, {"type": "about:blank", "detail": "no such resource"}, "")
    missing_thing = ApiError(404, {"type": "urn:smarthome:problem:not-found", "detail": "no"}, "")

    assert named.message == "422: $.kind: Expected `str`"
    assert unnamed.message == "422: Invalid input; $.name: too long"
    assert missing_route.route_missing and not missing_thing.route_missing


def test_cells_read_well() -> None:
    assert cell("2026-03-01T12:00:00.123456Z") == "2026-03-01 12:00:00Z"
    assert cell(None) == "-" and cell(True) == "yes" and cell(["a", "b"]) == "a, b"
