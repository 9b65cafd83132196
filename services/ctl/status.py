"""`smarthome status`: is the platform healthy right now?"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer

from services.ctl.client import Api, session
from services.ctl.errors import ApiError
from services.ctl.output import Column, JsonFlag, columns_of, console, emit_json, note, table

SERVICE_COLUMNS: list[Column] = [
    ("service", "name"),
    ("state", "state"),
    ("ready", "ready"),
    ("why not ready", "why_not_ready"),
    ("restarts", "restarts"),
    ("uptime s", "uptime_s"),
    ("pending", lambda s: _total(s, "pending")),
    ("ack pending", lambda s: _total(s, "ack_pending")),
    ("version", "version"),
]
CONSUMER_COLUMNS: list[Column] = [
    ("service", "service"),
    ("instance", "instance"),
    ("stream", "stream"),
    ("consumer", "consumer"),
    ("pending", "pending"),
    ("ack pending", "ack_pending"),
]
DEFAULT_STALE_S = 600
DEADLETTERS_COUNTED = 1000  # more is shown as "1000+"


def _total(service: Mapping[str, Any], field: str) -> int | None:
    """A process's lag over its consumers; None when it measures none."""
    known = [c[field] for c in service.get("consumers") or [] if c.get(field) is not None]
    return sum(known) if known else None


def consumer_lag(services: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every process's consumers with their lag, one row each: messages not yet delivered
    (`pending`) and delivered but not yet acknowledged (`ack_pending`)."""
    return [
        {"service": s.get("name"), "instance": s.get("instance"), **consumer}
        for s in services
        for consumer in s.get("consumers") or []
    ]


def _readiness(api: Api) -> dict[str, Any]:
    response = api.request("GET", "/health/ready", allow=(503,))
    body = response.json() if response.content else {}
    return body if isinstance(body, dict) else {"status": str(body)}


def _optional(api: Api, path: str, **params: Any) -> tuple[Any, str | None]:
    """The answer of a route this gateway may not have yet: (answer, None) or (None, why)."""
    try:
        return api.get(path, **params), None
    except ApiError as exc:
        if exc.route_missing:
            return None, f"this gateway has no GET /api/v1{path}"
        return None, exc.message


def _devices(api: Api, stale_after_s: float) -> dict[str, int]:
    """Online and offline counts of active devices; `stale`: not heard from for a while."""
    cutoff = datetime.now(UTC) - timedelta(seconds=stale_after_s)
    counts: Counter[str] = Counter()
    for device in api.items("/devices", lifecycle="active"):
        counts["total"] += 1
        counts[device["connection"]] += 1
        seen = device.get("last_seen")
        if seen is None or datetime.fromisoformat(seen.replace("Z", "+00:00")) < cutoff:
            counts["stale"] += 1
    return {key: counts[key] for key in ("total", "online", "offline", "stale")}


def _deadletters(api: Api) -> tuple[int | None, str | None]:
    """How many dead letters there are, counted up to `DEADLETTERS_COUNTED`."""
    try:
        return sum(1 for _ in api.items("/deadletters", DEADLETTERS_COUNTED, 200)), None
    except ApiError as exc:
        if exc.route_missing:
            return None, "this gateway has no GET /api/v1/deadletters"
        return None, exc.message


def status(
    stale_after: Annotated[
        float, typer.Option(help="Seconds without a message after which a device is stale.")
    ] = DEFAULT_STALE_S,
    as_json: JsonFlag = False,
) -> None:
    """The gateway's readiness, the services and their consumers' lag, dead letters, devices
    online/offline/stale."""
    with session() as api:
        ready = _readiness(api)
        services, services_why = _optional(api, "/system/services")
        deadletters, deadletters_why = _deadletters(api)
        devices = _devices(api, stale_after)
    if isinstance(services, dict):
        services = services.get("items", services.get("services"))
    consumers = consumer_lag(services) if services else []
    if as_json:
        emit_json(
            {
                "url": api.target.url,
                "gateway": ready,
                "services": services,
                "consumers": consumers,
                "deadletters": deadletters,
                "devices": devices,
                "unavailable": {
                    k: v
                    for k, v in (("services", services_why), ("deadletters", deadletters_why))
                    if v
                },
            }
        )
        return
    checks = ", ".join(f"{k} {v}" for k, v in ready.get("checks", {}).items())
    console.print(f"gateway      {api.target.url}: {ready.get('status')} ({checks})", markup=False)
    if degraded := ready.get("degraded"):
        console.print(f"             degraded: {', '.join(degraded)}", markup=False)
    if services:
        known = all(k in services[0] for k in ("name", "state"))
        table(services, SERVICE_COLUMNS if known else columns_of(services), title="services")
        if consumers:
            table(consumers, CONSUMER_COLUMNS, title="consumer lag")
    else:
        note(
            f"services     unknown: {services_why}" if services_why else "services     none listed"
        )
    more = "+" if deadletters == DEADLETTERS_COUNTED else ""
    line = f"{deadletters}{more}" if deadletters is not None else f"unknown: {deadletters_why}"
    console.print(f"dead letters {line}", markup=False)
    console.print(
        f"devices      {devices['online']} online, {devices['offline']} offline, "
        f"{devices['stale']} stale (silent > {stale_after:g}s) of {devices['total']} active",
        markup=False,
    )
