"""Times on the command line: ISO 8601, or a span before now (`90s`, `15m`, `24h`, `7d`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from services.ctl.errors import CtlError

_SPAN = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def instant(value: str, option: str, now: datetime | None = None) -> str:
    """`value` as an ISO 8601 time with a zone (UTC when it has none)."""
    now = now or datetime.now(UTC)
    if value == "now":
        return now.isoformat()
    if span := _SPAN.match(value):
        return (now - timedelta(seconds=float(span[1]) * _UNIT_S[span[2]])).isoformat()
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise CtlError(
            f"{option} {value!r}: an ISO 8601 time or a span before now (15m, 24h, 7d)"
        ) from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).isoformat()
