"""The gateway's Litestar app: `create_app(settings)`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Tag
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController

from libs.settings import Settings
from services.gateway import connections, problems
from services.gateway.audit.controllers import AuditController
from services.gateway.body import MAX_BODY_BYTES
from services.gateway.correlation import CorrelationMiddleware
from services.gateway.devices.controllers import DeviceController, provide_device_service
from services.gateway.devices.discovery import Discovery
from services.gateway.events.controllers import EventController
from services.gateway.events.sse import ServerSendMiddleware
from services.gateway.health.controllers import HealthController
from services.gateway.locations.controllers import LocationController
from services.gateway.resources import Shutdown, open_resources, provide_resources
from services.gateway.rules.controllers import RuleController
from services.gateway.subscriptions.controllers import SubscriptionController
from services.gateway.ui.controllers import UIController

API_PREFIX = "/api/v1"


class MetricsController(PrometheusController):
    """`/metrics` for Prometheus; not part of the API reference."""

    include_in_schema = False


def create_app(settings: Settings) -> Litestar:
    """Build the app; the lifespan opens the database engine, NATS and the cache."""

    # Made before the lifespan: a stop may be asked for while the start waits for the bus.
    shutdown = Shutdown()

    @asynccontextmanager
    async def resources(app: Litestar) -> AsyncIterator[None]:
        async with open_resources(settings, shutdown) as opened:
            app.state.resources = opened
            discovery = Discovery(opened.nc, provide_device_service(opened))
            await discovery.start()
            try:
                yield
            finally:
                await discovery.stop()

    api = Router(
        path=API_PREFIX,
        route_handlers=[
            DeviceController,
            LocationController,
            EventController,
            RuleController,
            AuditController,
            SubscriptionController,
        ],
    )
    metrics = PrometheusConfig(
        app_name="gateway",
        prefix="smarthome_gateway",
        group_path=True,  # label by route template, not by every device id
        exclude=["/metrics"],
    )
    app = Litestar(
        route_handlers=[api, HealthController, MetricsController, UIController],
        lifespan=[resources],
        state=State({"shutdown": shutdown}),
        dependencies={"resources": Provide(provide_resources, sync_to_thread=False)},
        # ServerSendMiddleware first: a live stream's frames skip the other two (see its doc).
        middleware=[ServerSendMiddleware(), CorrelationMiddleware(), metrics.middleware],
        exception_handlers=problems.exception_handlers(),
        openapi_config=OpenAPIConfig(
            title="smarthome",
            version="1.0.0",
            description="The smart-home platform's HTTP API. Errors are RFC 9457 problem details.",
            path="/schema",
            tags=[
                Tag(name="devices", description="The registry, runtime state and commands"),
                Tag(name="locations", description="Homes, floors and rooms"),
                Tag(name="events", description="Publish, replay and follow the event bus"),
                Tag(name="rules", description="User rules and their traces"),
                Tag(name="audit", description="Who did what, when, with what result"),
                Tag(
                    name="subscriptions",
                    description="Webhooks: signed, retried with back-off, dead letters re-drivable",
                ),
                Tag(name="health", description="Probes"),
            ],
        ),
        request_max_body_size=MAX_BODY_BYTES,
        # Logs go through libs.logs (JSON on stderr), not through a handler Litestar installs.
        logging_config=None,
    )
    problems.document_problems(app)
    # One count of live streams (SSE and WebSocket) per client address, for the app's life.
    connections.install(app.state, settings.max_streams_per_client)
    return app
