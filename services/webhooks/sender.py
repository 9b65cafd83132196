"""Signed POSTs to one webhook endpoint, bounded in time, connecting only to addresses the
webhook may reach; their outcome, never an exception."""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from libs import tracing, webhooks
from libs.webhooks import Failure
from services.webhooks.payload import Payload

USER_AGENT = "smarthome-webhooks/1"
# An answer up to this long is read to its end (its connection is then kept alive), and
# thrown away: what a receiver answers is never kept.
DRAIN_BYTES = 64 * 1024


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status_code: int | None = None
    error: str | None = None  # `<Failure>: <our own words>`, never the receiver's


def failed(failure: Failure, why: str, status_code: int | None = None) -> Outcome:
    return Outcome(False, status_code, f"{failure}: {why}")


class Blocked(OSError):
    """A host name resolved only to addresses the webhook may not reach."""


class CheckedResolver(AbstractResolver):
    """Resolves a webhook's host name and answers only the addresses the webhook may reach,
    and aiohttp connects to what it answers: a name that resolves elsewhere between the check
    and the connection (DNS rebinding) cannot slip through, while the request keeps the name
    (Host, TLS SNI). aiohttp asks no resolver about an IP address: `Sender` checks those."""

    def __init__(
        self,
        nets: Iterable[webhooks.IPNetwork],
        *,
        allow_private_targets: bool,
        resolver: AbstractResolver | None = None,
    ) -> None:
        self._nets = tuple(nets)
        self._private = allow_private_targets
        self._resolver = resolver or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        allowed: list[ResolveResult] = []
        refused: list[str] = []
        for answer in await self._resolver.resolve(host, port, family):
            reason = self._refused(answer["host"])
            if reason is None:
                allowed.append(answer)
            else:
                refused.append(reason)
        if not allowed:
            raise Blocked(f"{host} resolves to {refused[0] if refused else 'no address'}")
        return allowed

    async def close(self) -> None:
        await self._resolver.close()

    def _refused(self, address: str) -> str | None:
        return webhooks.refused_range(address, self._nets, allow_private_targets=self._private)


def make_session(
    settings: webhooks.WebhookSettings,
    *,
    allow_private_targets: bool,
    resolver: AbstractResolver | None = None,
) -> aiohttp.ClientSession:
    """One session per subscription: its own keep-alive connections to its endpoint, which a
    hanging endpoint of another subscription can never take, and its own `CheckedResolver`.
    A subscription's workers (its filter's and its notifications') have at most one request
    in flight each. Call it inside the running event loop (a session belongs to the loop it
    was made in); close it after. `resolver`: what looks names up (tests)."""
    checked = CheckedResolver(
        settings.allow_nets, allow_private_targets=allow_private_targets, resolver=resolver
    )
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=4, keepalive_timeout=30, resolver=checked),
        headers={"user-agent": USER_AGENT},
        # Sender.send bounds each request as a whole (the answer's head included).
        timeout=aiohttp.ClientTimeout(total=None),
    )


class Sends(Protocol):
    """What delivers a rendered payload: a subscription's `Sender`, a notification channel's."""

    async def send(self, payload: Payload) -> Outcome: ...


class Sender:
    """POSTs to one subscription's URL with its secret, over the subscription's own session
    (made by `make_session` with the same `allow_private_targets`). Without a secret (a
    notification channel's Slack or ntfy endpoint) the requests go unsigned."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: webhooks.WebhookSettings,
        url: str,
        secret: str | None,
        *,
        allow_private_targets: bool,
    ) -> None:
        self._session = session
        self._timeout = settings.timeout_s
        self._url = url
        self._secret = secret
        self._refused = _refused_literal(url, settings.allow_nets, allow_private_targets)

    async def send(self, payload: Payload) -> Outcome:
        """POST `payload` signed with the secret; 2xx is a success, anything else a failure."""
        if self._refused:
            return failed(Failure.BLOCKED, self._refused)
        signed = (
            webhooks.signature_headers(self._secret, payload.msg_id, int(time.time()), payload.body)
            if self._secret
            else {}
        )
        traceparent = tracing.current_traceparent()  # the receiver may continue the trace
        if traceparent:
            signed[tracing.TRACEPARENT] = traceparent
        try:
            async with asyncio.timeout(self._timeout):
                async with self._session.post(
                    self._url,
                    data=payload.body,
                    headers={**payload.headers, **signed},
                    allow_redirects=False,  # a redirect could lead where check_url would refuse
                ) as response:
                    await _drain(response)
        except TimeoutError:  # aiohttp's own timeouts are TimeoutErrors too
            return failed(Failure.TIMEOUT, f"no answer within {self._timeout:g} s")
        # ValueError: what aiohttp refuses to send (a control character in a header value).
        except (aiohttp.ClientError, ssl.SSLError, ValueError) as exc:
            return _failure(exc)
        if 200 <= response.status < 300:  # not response.ok, which takes 3xx as a success
            return Outcome(True, response.status)
        status = response.status
        return failed(Failure.of_status(status), f"HTTP {status}", status)


def _refused_literal(
    url: str, nets: Iterable[webhooks.IPNetwork], allow_private_targets: bool
) -> str | None:
    """Why the URL may not be called, when that does not depend on DNS (a malformed URL, an
    IP address that is refused); names are checked on every connection by the resolver."""
    try:
        host, _ = webhooks.parse_url(url)
    except ValueError as exc:
        return f"the URL {exc}"
    return refused_address(host, nets, allow_private_targets=allow_private_targets)


def refused_address(
    host: str, nets: Iterable[webhooks.IPNetwork], *, allow_private_targets: bool
) -> str | None:
    """Why a host that is an IP address may not be reached (`<host> is <reason>`); None when
    it may, or when it is a name (`CheckedResolver` checks what a name resolves to)."""
    if not webhooks.is_address(host):
        return None
    reason = webhooks.refused_range(host, nets, allow_private_targets=allow_private_targets)
    return None if reason is None else f"{host} is {reason}"


def _failure(exc: Exception) -> Outcome:
    """What went wrong, in our own words: an exception's text may quote the address it
    tried or what the receiver sent."""
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return failed(Failure.TLS, "the TLS handshake failed")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        if isinstance(exc.os_error, Blocked):
            return failed(Failure.BLOCKED, str(exc.os_error))
        return failed(Failure.DNS, "the host name does not resolve")
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return failed(Failure.REFUSED, "the connection was refused")
        if exc.os_error.errno == errno.ETIMEDOUT:
            return failed(Failure.TIMEOUT, "the connection timed out")
        return failed(Failure.CONNECTION, "no connection could be made")
    if isinstance(exc, ValueError):  # aiohttp.InvalidURL among them
        return failed(Failure.INVALID, "the request could not be sent")
    return failed(Failure.CONNECTION, "the connection failed before an answer")


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read a short answer to its end, so that its connection is kept for the next request;
    never a large one (released unread, its connection is closed)."""
    read = 0
    async for part in response.content.iter_any():
        read += len(part)
        if read > DRAIN_BYTES:
            break
