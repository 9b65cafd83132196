"""`/health/live` and `/health/ready` (Kubernetes probes)."""

from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency, Provide

from services.gateway.health.service import HealthService, Readiness
from services.gateway.resources import Resources


def provide_health_service(resources: NamedDependency[Resources]) -> HealthService:
    return HealthService(resources)


class HealthController(Controller):
    path = "/health"
    tags = ["health"]
    dependencies = {"health": Provide(provide_health_service, sync_to_thread=False)}

    @get("/live", operation_id="live", summary="Liveness: the process answers")
    async def live(self) -> dict[str, str]:
        return {"status": "ok"}

    @get(
        "/ready",
        operation_id="ready",
        summary="Readiness: the bus stores what the gateway publishes",
        description="503 with the reason while the bus is unreachable, JetStream does not "
        "answer or its storage is full. A database or cache outage leaves the gateway ready: "
        "`status` is `degraded` and `degraded` says what does not work meanwhile.",
    )
    async def ready(self, health: NamedDependency[HealthService]) -> Readiness:
        return await health.ready()
