"""The gateway's Litestar app: `create_app(settings)`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.middleware.rate_limit import RateLimitConfig
from litestar.openapi.spec import Components, SecurityScheme, Tag
from litestar.plugins import PluginProtocol
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
from nats.aio.msg import Msg

from libs import loop_health, outbox, subjects, tracing
from libs.principals import Permission
from libs.settings import Settings
from services.gateway import connections, problems
from services.gateway.audit.controllers import AuditController
from services.gateway.auth.controllers import AuthController, me, provide_auth
from services.gateway.auth.guards import provide_principal, requires
from services.gateway.auth.middleware import PUBLIC, AuthMiddleware
from services.gateway.auth.service import AuthService
from services.gateway.auth.tokens import Tokens, signing_key
from services.gateway.body import MAX_BODY_BYTES
from services.gateway.browser import BrowserGuardMiddleware, security_headers
from services.gateway.channels.controllers import ChannelController
from services.gateway.correlation import CorrelationMiddleware
from services.gateway.credentials.controllers import CredentialController
from services.gateway.deadletters.controllers import DeadLetterController
from services.gateway.devices.controllers import DeviceController, provide_device_service
from services.gateway.devices.discovery import Discovery
from services.gateway.events.controllers import EventController
from services.gateway.events.sse import ServerSendMiddleware
from services.gateway.health.controllers import HealthController
from services.gateway.locations.controllers import LocationController
from services.gateway.openapi import NumberUnionPlugin, OpenAPIDocumentConfig
from services.gateway.resources import Shutdown, open_resources, provide_resources
from services.gateway.rules.controllers import RuleController
from services.gateway.subscriptions.controllers import SubscriptionController
from services.gateway.system.controllers import SystemController, report_status
from services.gateway.ui.controllers import UIController
from services.gateway.users.controllers import ApiKeyController, UserController

API_PREFIX = "/api/v1"


TOKEN_PATH = f"{API_PREFIX}/auth/token"
ADMIN_ONLY = [requires(Permission.ADMINISTER)]


class MetricsController(PrometheusController):
    """`/metrics` for Prometheus (an administrator's token or API key); not part of the API
    reference."""

    include_in_schema = False
    guards = ADMIN_ONLY


def _writer(request: Request[Any, Any, Any]) -> str:
    """Who a write counts against: its principal (a proxy's many clients are not one)."""
    return str(request.scope["user"].actor)


async def _principals_write(request: Request[Any, Any, Any]) -> bool:
    """A principal's write; signing in and refreshing have their own limit and checks."""
    return request.method not in ("GET", "HEAD", "OPTIONS") and "user" in request.scope


async def _signing_in(request: Request[Any, Any, Any]) -> bool:
    return bool(request.scope["path"] == TOKEN_PATH)


def _write_limit(settings: Settings) -> list[DefineMiddleware]:
    """Writes per principal and minute; 0 turns the limit off (a benchmark, a trusted
    integration: Litestar keeps a log of each principal's writes in the window, so a limit of
    millions costs a decode of millions of timestamps per request)."""
    if not settings.writes_per_minute:
        return []
    config = RateLimitConfig(
        rate_limit=("minute", settings.writes_per_minute),
        identifier_for_request=_writer,
        check_throttle_handler=_principals_write,
        exclude=[r"^/health/"],
        store="write_rate_limit",
    )
    return [config.middleware]


def _login_limit(settings: Settings) -> DefineMiddleware:
    """Sign-in attempts per client address (behind a trusted proxy: the forwarded one)."""
    return RateLimitConfig(
        rate_limit=("minute", settings.logins_per_minute_per_address),
        check_throttle_handler=_signing_in,
        store="login_rate_limit",
    ).middleware


def _tracing() -> list[PluginProtocol]:
    """The HTTP spans (OpenTelemetry's ASGI instrumentation), when the OTEL_* variables name
    an exporter (`libs.tracing`); nothing at all otherwise. A span's context is current while
    the request runs: what it publishes carries its `traceparent`."""
    tracing.setup("gateway")
    if not tracing.enabled():
        return []
    from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin

    config = OpenTelemetryConfig(
        tracer_provider=tracing.provider(), exclude=["^/health/", "^/metrics"]
    )
    return [OpenTelemetryPlugin(config)]


def create_app(settings: Settings) -> Litestar:
    """Build the app; the lifespan opens the database engine, NATS and the cache."""

    # Made before the lifespan: a stop may be asked for while the start waits for the bus.
    shutdown = Shutdown()
    tokens = Tokens(signing_key(settings), settings.access_token_ttl_s)

    @asynccontextmanager
    async def resources(app: Litestar) -> AsyncIterator[None]:
        async with open_resources(settings, shutdown) as opened:
            app.state.resources = opened
            app.state.auth = auth = AuthService(
                opened.sessions, tokens, settings.refresh_token_ttl_s
            )

            async def forget_keys(_: Msg) -> None:
                auth.forget_keys()  # revoked through any gateway: forgotten by every one

            keys_changed = await opened.nc.subscribe(subjects.API_KEYS_CHANGED_ALL, cb=forget_keys)
            # Publishes the facts the change paths write into the outbox, after their commit.
            relay = outbox.Relay(opened.sessions, opened.js)
            unwatch = relay.watch()
            relaying = asyncio.create_task(relay.run(), name="outbox-relay")
            discovery = Discovery(opened.nc, provide_device_service(opened))
            await discovery.start()
            lag = asyncio.create_task(loop_health.watch_loop(), name="loop-lag")
            try:
                yield
            finally:
                lag.cancel()
                await keys_changed.unsubscribe()
                await discovery.stop()
                await relay.stop(relaying)
                unwatch()

    # Signing in has its own per-address limit, on these routes only.
    signing_in = Router(
        path=API_PREFIX, route_handlers=[AuthController], middleware=[_login_limit(settings)]
    )
    api = Router(
        path=API_PREFIX,
        route_handlers=[
            me,
            UserController,
            ApiKeyController,
            DeviceController,
            CredentialController,
            LocationController,
            EventController,
            RuleController,
            AuditController,
            SubscriptionController,
            ChannelController,
            DeadLetterController,
            SystemController,
        ],
    )
    metrics = PrometheusConfig(
        app_name="gateway",
        prefix="smarthome_gateway",
        group_path=True,  # label by route template, not by every device id
        exclude=["/metrics"],
    )
    app = Litestar(
        route_handlers=[signing_in, api, HealthController, MetricsController, UIController],
        lifespan=[resources, report_status],
        state=State({"shutdown": shutdown}),
        dependencies={
            "resources": Provide(provide_resources, sync_to_thread=False),
            "principal": Provide(provide_principal, sync_to_thread=False),
            "auth": Provide(provide_auth, sync_to_thread=False),
        },
        # ServerSendMiddleware first: a live stream's frames skip the others (see its doc).
        # Then who may ask at all (host, origin, media type), who asks, and how often.
        middleware=[
            ServerSendMiddleware(),
            CorrelationMiddleware(),
            metrics.middleware,
            BrowserGuardMiddleware(settings),
            DefineMiddleware(AuthMiddleware, exclude=PUBLIC),
            *_write_limit(settings),
        ],
        before_send=[security_headers],
        plugins=[*_tracing(), NumberUnionPlugin()],
        exception_handlers=problems.exception_handlers(),
        openapi_config=OpenAPIDocumentConfig(
            title="smarthome",
            version="1.0.0",
            description="The smart-home platform's HTTP API. Errors are RFC 9457 problem details.",
            path="/schema",
            # The document and its viewers are not operations of the API they describe.
            openapi_router=Router(
                path="/schema", route_handlers=[], guards=ADMIN_ONLY, include_in_schema=False
            ),
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(
                        type="http",
                        scheme="bearer",
                        description="An access token from `POST /api/v1/auth/token`, or an API key",
                    )
                }
            ),
            security=[{"bearer": []}],
            tags=[
                Tag(name="auth", description="Signing in, tokens, who am I"),
                Tag(name="users", description="People and integrations (administrators)"),
                Tag(name="devices", description="The registry, runtime state and commands"),
                Tag(name="locations", description="Homes, floors and rooms"),
                Tag(name="events", description="Publish, replay and follow the event bus"),
                Tag(name="rules", description="User rules and their traces"),
                Tag(name="audit", description="Who did what, when, with what result"),
                Tag(
                    name="subscriptions",
                    description="Webhooks: signed, retried with back-off, dead letters re-drivable",
                ),
                Tag(
                    name="channels",
                    description="Notifications people read: e-mail, Slack-compatible, ntfy",
                ),
                Tag(
                    name="deadletters",
                    description="Messages the workers gave up on: inspect, send back",
                ),
                Tag(name="system", description="The platform's processes (administrators)"),
                Tag(name="health", description="Probes"),
            ],
        ),
        request_max_body_size=MAX_BODY_BYTES,
        # Logs go through libs.logs (JSON on stderr), not through a handler Litestar installs.
        logging_config=None,
    )
    problems.document_problems(app, public=PUBLIC)
    # One count of live streams (SSE and WebSocket) per client address, for the app's life.
    connections.install(app.state, settings.max_streams_per_client)
    return app
