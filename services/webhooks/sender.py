"""Signed POSTs to one webhook endpoint, bounded in time; their outcome, never an exception."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

from libs import webhooks
from services.webhooks.payload import Payload

USER_AGENT = "smarthome-webhooks/1"
# What is kept of a refusing endpoint's answer, for the delivery record.
ANSWER_CHARS = 300
# An answer up to this long is read to its end (its connection is then kept alive).
DRAIN_BYTES = 64 * 1024
# A URL found allowed is looked up again after this long (its name may resolve elsewhere by
# then), not before every request: at hundreds of requests a second the lookup would cost more
# than the request. The check never covered the lookup aiohttp makes itself when it connects.
URL_CHECK_TTL_S = 30.0


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status_code: int | None = None
    error: str | None = None


def make_session() -> aiohttp.ClientSession:
    """One session per subscription: its own keep-alive connections to its endpoint, which a
    hanging endpoint of another subscription can never take. A subscription's workers (its
    filter's and its notifications') have at most one request in flight each. Call it inside
    the running event loop (a session belongs to the loop it was made in); close it after."""
    return aiohttp.ClientSession(
        # No separate cap on idle connections (httpx had 2): two workers never leave more.
        connector=aiohttp.TCPConnector(limit=4, keepalive_timeout=30),
        headers={"user-agent": USER_AGENT},
        # Sender.send bounds each request as a whole (the answer's head included).
        timeout=aiohttp.ClientTimeout(total=None),
    )


class Sender:
    """POSTs to one subscription's URL with its secret, over the subscription's own session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: webhooks.WebhookSettings,
        url: str,
        secret: str,
    ) -> None:
        self._session = session
        self._timeout = settings.timeout_s
        self._allow_private = settings.allow_private
        self._url = url
        self._secret = secret
        self._checked_until = 0.0

    async def send(self, payload: Payload) -> Outcome:
        """POST `payload` signed with the secret; 2xx is a success, anything else a failure."""
        try:
            await self._check_url()
        except ValueError as exc:
            return Outcome(False, error=f"refused: {exc}")
        signed = webhooks.signature_headers(
            self._secret, payload.msg_id, int(time.time()), payload.body
        )
        try:
            async with asyncio.timeout(self._timeout):
                async with self._session.post(
                    self._url,
                    data=payload.body,
                    headers={**payload.headers, **signed},
                    allow_redirects=False,  # a redirect could lead where check_url would refuse
                ) as response:
                    answer = await _head(response)
        except TimeoutError:  # aiohttp's own timeouts are TimeoutErrors too
            return Outcome(False, error=f"no answer within {self._timeout:g} s")
        # ValueError: what aiohttp refuses to send (a control character in a header value).
        except (aiohttp.ClientError, ValueError) as exc:
            return Outcome(False, error=f"{type(exc).__name__}: {exc}"[:ANSWER_CHARS])
        if 200 <= response.status < 300:  # not response.ok, which takes 3xx as a success
            return Outcome(True, response.status)
        return Outcome(False, response.status, f"HTTP {response.status}: {answer}")

    async def _check_url(self) -> None:
        now = time.monotonic()
        if now < self._checked_until:
            return
        if self._allow_private:  # no lookup: the scheme and host only
            webhooks.check_url(self._url, True)
        else:  # getaddrinfo blocks
            await asyncio.to_thread(webhooks.check_url, self._url, False)
        self._checked_until = now + URL_CHECK_TTL_S


async def _head(response: aiohttp.ClientResponse) -> str:
    """The start of the answer's body: enough to say why, never a whole large body. A short
    answer is read to its end, so that its connection is kept for the next request."""
    chunk = b""
    read = 0
    async for part in response.content.iter_any():
        if len(chunk) < ANSWER_CHARS:
            chunk += part
        read += len(part)
        if read > DRAIN_BYTES:
            break  # released unread, the connection is closed rather than read any further
    return chunk[:ANSWER_CHARS].decode(errors="replace")
