"""What an hour of history becomes: count, mean, min, max and last per numeric attribute."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.recorder.hourly import HourTally, hour_of, hours_of, number

HOUR = datetime(2026, 3, 1, 14, tzinfo=UTC)


def at(minute: int) -> datetime:
    return HOUR + timedelta(minutes=minute)


def test_an_hour_gives_count_mean_min_max_and_the_last_value_per_attribute() -> None:
    tally = HourTally(HOUR)
    tally.add("meter", at(5), {"power_w": 10, "energy_wh": 100.0})
    tally.add("meter", at(10), {"power_w": 31, "energy_wh": 104.0})
    tally.add("meter", at(50), {"power_w": 20.5, "energy_wh": 110.0})

    by_attribute = {row["attribute"]: row for row in tally.rows()}

    assert by_attribute["power_w"] == {
        "device_id": "meter",
        "hour": HOUR,
        "attribute": "power_w",
        "count": 3,
        "mean": 20.5,
        "min": 10.0,
        "max": 31.0,
        "last": 20.5,
        "last_time": at(50),
    }
    assert (by_attribute["energy_wh"]["last"], by_attribute["energy_wh"]["mean"]) == (
        110.0,
        pytest.approx(314 / 3),
    )


def test_the_last_value_is_the_latest_in_time_not_the_last_added() -> None:
    tally = HourTally(HOUR)
    tally.add("meter", at(40), {"energy_wh": 120.0})
    tally.add("meter", at(20), {"energy_wh": 110.0})  # a late row from earlier in the hour

    [row] = tally.rows()

    assert (row["last"], row["last_time"], row["min"]) == (120.0, at(40), 110.0)


def test_bools_strings_and_other_non_numbers_are_not_rolled_up() -> None:
    tally = HourTally(HOUR)
    tally.add(
        "lamp",
        at(1),
        {"on": True, "mode": "eco", "level": None, "rgb": [1, 2, 3], "nested": {"w": 1}},
    )
    tally.add("lamp", at(2), {"on": False, "brightness": 40})
    tally.add("lamp", at(3), ["not", "an", "object"])

    assert [(row["attribute"], row["count"]) for row in tally.rows()] == [("brightness", 1)]


def test_devices_are_summed_up_apart() -> None:
    tally = HourTally(HOUR)
    tally.add("a", at(1), {"power_w": 1.0})
    tally.add("b", at(2), {"power_w": 100.0})

    assert sorted((row["device_id"], row["max"]) for row in tally.rows()) == [
        ("a", 1.0),
        ("b", 100.0),
    ]


def test_an_hour_without_numbers_has_no_statistics() -> None:
    tally = HourTally(HOUR)
    tally.add("lamp", at(1), {})
    tally.add("lamp", at(2), {"on": True})

    assert list(tally.rows()) == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [(3, 3.0), (2.5, 2.5), (-1, -1.0), (True, None), (False, None), ("7", None), (None, None)],
)
def test_a_number_is_an_int_or_a_float_and_never_a_bool(
    value: object, expected: float | None
) -> None:
    assert number(value) == expected


def test_numbers_no_float_can_hold_are_left_out() -> None:
    assert number(10**400) is None
    assert number(float("nan")) is None
    assert number(float("inf")) is None


def test_the_hour_of_a_time_is_its_utc_hour() -> None:
    india = timezone(timedelta(hours=5, minutes=30))

    assert hour_of(datetime(2026, 3, 1, 20, 15, 7, 5, tzinfo=india)) == HOUR
    assert hour_of(at(59)) == HOUR


def test_the_hours_of_rows_are_the_hour_of_each_once_in_order() -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    times = [
        at(59) + timedelta(seconds=59, microseconds=999_999),  # the last instant of the hour
        HOUR + timedelta(hours=1),  # the first of the next
        datetime(2026, 3, 1, 20, 15, 7, 5, tzinfo=india),  # 14:45 UTC
        datetime(1969, 12, 31, 23, 30, tzinfo=UTC),  # before the epoch: floors, not truncates
        HOUR - timedelta(microseconds=1),
    ]
    rows = [{"time": t} for t in times]

    assert hours_of(rows) == sorted({hour_of(t) for t in times})
    assert hours_of(rows)[0] == datetime(1969, 12, 31, 23, tzinfo=UTC)
    assert all(h.tzinfo is UTC for h in hours_of(rows))
