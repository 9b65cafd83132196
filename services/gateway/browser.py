"""What keeps a browser from being turned against the platform.

- `Host` must be one the gateway answers to (DNS rebinding); `Origin`, when a browser sends
  one, must be an allowed origin for every write and WebSocket upgrade (a foreign page's
  form post or socket); bodies of JSON routes must say `application/json` (a `text/plain`
  post is what a page may send without a preflight).
- Every answer carries a strict CSP and its friends (`security_headers`, a before-send hook,
  so that errors and 404s get them too).
"""

from __future__ import annotations

from typing import Any

from litestar.datastructures import Headers, MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.exceptions import ClientException, PermissionDeniedException
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from libs.settings import Settings

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
JSON_TYPES = ("application/json",)
HEADERS = {
    "content-security-policy": (
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; "
        "object-src 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
LOCAL_NAMES = ("127.0.0.1", "localhost", "[::1]")


class UnsupportedMediaType(ClientException):
    status_code = 415


class UnknownHost(ClientException):
    status_code = 400


def allowed_hosts(settings: Settings) -> frozenset[str]:
    """SMARTHOME_ALLOWED_HOSTS, or the names of the address it listens on (any port: a
    rebinding attack is about the name)."""
    names = list(settings.allowed_hosts)
    if not names:
        names = [*LOCAL_NAMES]
        if settings.http_host not in ("0.0.0.0", "::", *LOCAL_NAMES):
            names.append(settings.http_host)
    return frozenset(host_name(n) for n in names)


def host_name(host: str) -> str:
    """`Host` without its port: `[::1]:8000` → `[::1]`, `example.org:443` → `example.org`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class BrowserGuardMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP, ScopeType.WEBSOCKET)

    def __init__(self, settings: Settings) -> None:
        self._hosts = allowed_hosts(settings)
        self._origins = frozenset(o.rstrip("/").lower() for o in settings.allowed_origins)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        headers = Headers.from_scope(scope)
        host = (headers.get("host") or "").lower()
        if host_name(host) not in self._hosts and not _any_host(scope):
            raise UnknownHost(detail=f"this gateway does not answer to the host {host!r}")
        websocket = scope["type"] == ScopeType.WEBSOCKET
        if websocket or scope["method"] not in SAFE_METHODS:
            self._check_origin(headers.get("origin"), scope, host)
        if (
            not websocket
            and scope["method"] in BODY_METHODS
            and _has_body(headers)
            and _takes_json(scope)
        ):
            kind = (headers.get("content-type") or "").split(";", 1)[0].strip().lower()
            if kind not in JSON_TYPES and not kind.endswith("+json"):
                raise UnsupportedMediaType(
                    detail=f"send the body as application/json, not {kind or 'no content type'}"
                )
        await next_app(scope, receive, send)

    def _check_origin(self, origin: str | None, scope: Scope, host: str) -> None:
        if origin is None:  # not a browser, or a same-origin GET-like request
            return
        origin = origin.rstrip("/").lower()
        own = f"{scope.get('scheme', 'http').replace('ws', 'http')}://{host}"
        if origin != own and origin not in self._origins:
            raise PermissionDeniedException(detail=f"requests from {origin} are not allowed")


def _any_host(scope: Scope) -> bool:
    """Kubelet probes and Prometheus come by the pod's address, unknown in advance. Neither
    path serves a browser: health says nothing, metrics need an administrator's bearer."""
    return scope["path"].startswith("/health/") or scope["path"] == "/metrics"


def _has_body(headers: Headers) -> bool:
    length = headers.get("content-length", "")
    return (length.isdigit() and int(length) > 0) or "transfer-encoding" in headers


def _takes_json(scope: Scope) -> bool:
    handler: Any = scope.get("route_handler")
    return not (handler is not None and handler.opt.get("form"))


async def security_headers(message: Message, scope: Scope) -> None:
    """Before-send hook: the headers on every answer, errors included."""
    if message["type"] == "http.response.start":
        headers = MutableScopeHeaders.from_message(message)
        for name, value in HEADERS.items():
            headers.setdefault(name, value)
