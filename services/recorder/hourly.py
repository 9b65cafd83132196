"""What an hour of history becomes: per device and numeric attribute, the count, mean, min,
max and last value. Pure: history rows in, statistics rows out."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

HOUR = timedelta(hours=1)
# The history types whose `data` holds attribute values.
ROLLED_UP_TYPES = ("telemetry", "state")
MAX_ATTRIBUTE = 128  # the column's length: longer names are not rolled up


def hour_of(time: datetime) -> datetime:
    """The start of the UTC hour `time` falls in (an offset such as +05:30 is no whole hour)."""
    return time.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def hours_of(history: Iterable[Mapping[str, Any]]) -> list[datetime]:
    """The UTC hours the rows' times fall in, each once, in order: `hour_of` of each, by epoch
    arithmetic (a float floor division a row, not a datetime rebuilt: the recorder's hot path)."""
    starts = {row["time"].timestamp() // 3600 for row in history}
    return [datetime.fromtimestamp(start * 3600, UTC) for start in sorted(starts)]


def number(value: Any) -> float | None:
    """A JSON number as a float; None for bools (True is no 1 W), strings and the rest."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        result = float(value)
    except OverflowError:  # an int beyond any float
        return None
    return result if math.isfinite(result) else None


@dataclass(slots=True)
class Summary:
    """One attribute's values so far; `last` is the value at the latest time. Slotted: an
    hour of a large fleet holds one per device and attribute."""

    count: int
    total: float
    min: float
    max: float
    last: float
    last_time: datetime

    @classmethod
    def of(cls, value: float, time: datetime) -> Summary:
        return cls(1, value, value, value, value, time)

    def add(self, value: float, time: datetime) -> None:
        self.count += 1
        self.total += value
        self.min = min(self.min, value)
        self.max = max(self.max, value)
        if time >= self.last_time:  # a tie goes to the later row: rows come in (time, id) order
            self.last, self.last_time = value, time

    @property
    def mean(self) -> float:
        return self.total / self.count


class HourTally:
    """The statistics of one hour, fed its history rows one at a time (memory grows with the
    devices and attributes, not with the rows)."""

    def __init__(self, hour: datetime) -> None:
        self.hour = hour
        self._summaries: dict[tuple[str, str], Summary] = {}

    def add(self, device_id: str, time: datetime, data: Any) -> None:
        if not isinstance(data, dict):
            return
        for attribute, raw in data.items():
            value = number(raw)
            if value is None or len(attribute) > MAX_ATTRIBUTE:
                continue
            summary = self._summaries.get((device_id, attribute))
            if summary is None:
                self._summaries[(device_id, attribute)] = Summary.of(value, time)
            else:
                summary.add(value, time)

    def __len__(self) -> int:
        """How many statistics rows the hour has."""
        return len(self._summaries)

    def rows(self) -> Iterator[dict[str, Any]]:
        """The `statistics` rows of this hour, made as they are written (a row dict costs
        several times its summary: not all at once)."""
        return (
            {
                "device_id": device_id,
                "hour": self.hour,
                "attribute": attribute,
                "count": s.count,
                "mean": s.mean,
                "min": s.min,
                "max": s.max,
                "last": s.last,
                "last_time": s.last_time,
            }
            for (device_id, attribute), s in self._summaries.items()
        )
