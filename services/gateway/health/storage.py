"""Whether the bus stores what the gateway publishes: what readiness knows of a full bus.

nats-server refuses a message at once when its storage limit is reached (`libs.bus
.STORAGE_FULL_CODES`); the gateway answers 507 and notes it here. It is full from then on,
until a publish is stored again, or JetStream's usage falls below what it was when first
looked at after the refusal (retention or a purge freed space), or `RECHECK_S` passed: a
gateway taken out of service by its probe gets no publishes that could tell it, so it tries
again, and the next refusal says it again.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge

REFUSALS = Counter(
    "smarthome_gateway_bus_storage_refusals_total",
    "Publishes the bus refused for want of storage (answered 507)",
)
FULL = Gauge(
    "smarthome_gateway_bus_storage_full",
    "1 while the bus refuses to store for want of space (as this gateway last saw it)",
)

RECHECK_S = 30.0


class BusStorage:
    def __init__(self) -> None:
        self._refused_at: float | None = None
        self._usage_then: int | None = None  # JetStream's bytes stored, seen after a refusal

    def refused(self) -> None:
        REFUSALS.inc()
        FULL.set(1)
        self._refused_at = time.monotonic()

    def stored(self) -> None:
        if self._refused_at is not None:
            self._refused_at = self._usage_then = None
            FULL.set(0)

    def full(self, usage: int) -> bool:
        """Whether the bus is full, given the bytes JetStream stores now."""
        if self._refused_at is None:
            return False
        if time.monotonic() - self._refused_at > RECHECK_S:
            self.stored()
            return False
        if self._usage_then is not None and usage < self._usage_then:
            self.stored()
            return False
        self._usage_then = usage if self._usage_then is None else max(usage, self._usage_then)
        return True
