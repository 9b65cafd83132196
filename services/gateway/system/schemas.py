"""What `GET /api/v1/system/services` answers."""

from __future__ import annotations

from datetime import datetime

import msgspec

from libs.service_status import ConsumerLag, ServiceState


class ServiceProcess(msgspec.Struct, frozen=True):
    """One process of the platform as it last reported itself. `gone`: it has not
    reported for three of its intervals (dead, hung or cut off from the bus)."""

    name: str
    instance: str
    state: ServiceState
    ready: bool
    why_not_ready: str | None
    restarts: int  # starts by the launcher after the first (0 in Kubernetes: see the pod)
    uptime_s: float | None  # None once gone
    version: str
    metrics_url: str | None  # the gateway's asks for an administrator's token
    last_seen: datetime
    # Its consumers' lag as its `/metrics` showed it when it reported (none once gone).
    consumers: list[ConsumerLag]


class ServiceList(msgspec.Struct, frozen=True):
    """Every process, by name and instance."""

    items: list[ServiceProcess]
