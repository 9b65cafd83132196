"""Signed POSTs to one webhook endpoint, bounded in time; their outcome, never an exception."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx

from libs import webhooks
from services.webhooks.payload import Payload

USER_AGENT = "smarthome-webhooks/1"
# What is kept of a refusing endpoint's answer, for the delivery record.
ANSWER_CHARS = 300
# An answer up to this long is read to its end (its connection is then kept alive).
DRAIN_BYTES = 64 * 1024
# A URL found allowed is looked up again after this long (its name may resolve elsewhere by
# then), not before every request: at hundreds of requests a second the lookup would cost more
# than the request. The check never covered the lookup httpx makes itself when it connects.
URL_CHECK_TTL_S = 30.0


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status_code: int | None = None
    error: str | None = None


def make_client() -> httpx.AsyncClient:
    """One client per subscription: its own keep-alive connections to its endpoint, which a
    hanging endpoint of another subscription can never take. A subscription's workers (its
    filter's and its notifications') have at most one request in flight each."""
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=4, max_keepalive_connections=2, keepalive_expiry=30),
        follow_redirects=False,  # a redirect could lead where check_url would refuse to go
        headers={"user-agent": USER_AGENT},
    )


class Sender:
    """POSTs to one subscription's URL with its secret, over the subscription's own client."""

    def __init__(
        self, client: httpx.AsyncClient, settings: webhooks.WebhookSettings, url: str, secret: str
    ) -> None:
        self._client = client
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
                async with self._client.stream(
                    "POST", self._url, content=payload.body, headers={**payload.headers, **signed}
                ) as response:
                    answer = await _head(response)
        except TimeoutError:
            return Outcome(False, error=f"no answer within {self._timeout:g} s")
        except httpx.HTTPError as exc:
            return Outcome(False, error=f"{type(exc).__name__}: {exc}"[:ANSWER_CHARS])
        if response.is_success:
            return Outcome(True, response.status_code)
        return Outcome(False, response.status_code, f"HTTP {response.status_code}: {answer}")

    async def _check_url(self) -> None:
        now = time.monotonic()
        if now < self._checked_until:
            return
        if self._allow_private:  # no lookup: the scheme and host only
            webhooks.check_url(self._url, True)
        else:  # getaddrinfo blocks
            await asyncio.to_thread(webhooks.check_url, self._url, False)
        self._checked_until = now + URL_CHECK_TTL_S


async def _head(response: httpx.Response) -> str:
    """The start of the answer's body: enough to say why, never a whole large body. A short
    answer is read to its end, so that its connection is kept for the next request."""
    chunk = b""
    read = 0
    async for part in response.aiter_bytes():
        if len(chunk) < ANSWER_CHARS:
            chunk += part
        read += len(part)
        if read > DRAIN_BYTES:
            break  # the connection is closed rather than read any further
    return chunk[:ANSWER_CHARS].decode(errors="replace")
