"""`/api/v1/system`: HTTP only; the logic is in `service.py`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Controller, Litestar, get
from litestar.di import NamedDependency, Provide

from libs.principals import Permission
from services.gateway.auth.guards import requires
from services.gateway.resources import Resources
from services.gateway.system.schemas import ServiceList
from services.gateway.system.service import SystemService, reporting


def provide_system_service(resources: NamedDependency[Resources]) -> SystemService:
    return SystemService(resources.js)


@asynccontextmanager
async def report_status(app: Litestar) -> AsyncIterator[None]:
    """The lifespan that writes the gateway's own status (after the resources open)."""
    async with reporting(app.state.resources):
        yield


class SystemController(Controller):
    path = "/system"
    tags = ["system"]
    guards = [requires(Permission.ADMINISTER)]
    dependencies = {"system": Provide(provide_system_service, sync_to_thread=False)}

    @get(
        "/services",
        operation_id="listServices",
        summary="The platform's processes: state, readiness, restarts, metrics",
        description="Each process (gateway, workers, replicas alike) writes its own status to "
        "the bus every few seconds; this lists the last one of each. `state` is `starting`, "
        "`ready`, `not_ready` (with `why_not_ready`) or `gone` when a process has not "
        "reported for three of its intervals; a gone one disappears a minute later, a "
        "cleanly stopped one at once. `metrics_url` is where Prometheus scrapes it; "
        "`consumers`, the lag of each of its durable consumers as its metrics showed it.",
    )
    async def services(self, system: NamedDependency[SystemService]) -> ServiceList:
        return ServiceList(items=await system.services())
