"""One signed POST to a webhook endpoint, bounded in time; its outcome, never an exception."""

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


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status_code: int | None = None
    error: str | None = None


def make_client() -> httpx.AsyncClient:
    """One client for every subscription. No connection limit: each subscription has at most
    one request in flight, so a pool shared with hanging endpoints must never run dry."""
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
        follow_redirects=False,  # a redirect could lead where check_url would refuse to go
        headers={"user-agent": USER_AGENT},
    )


class Sender:
    def __init__(self, client: httpx.AsyncClient, settings: webhooks.WebhookSettings) -> None:
        self._client = client
        self._timeout = settings.timeout_s
        self._allow_private = settings.allow_private

    async def send(self, url: str, secret: str, payload: Payload) -> Outcome:
        """POST `payload` signed with `secret`; 2xx is a success, anything else a failure."""
        try:
            # Checked again on each attempt: the name may resolve elsewhere by now.
            await asyncio.to_thread(webhooks.check_url, url, self._allow_private)
        except ValueError as exc:
            return Outcome(False, error=f"refused: {exc}")
        signed = webhooks.signature_headers(secret, payload.msg_id, int(time.time()), payload.body)
        try:
            async with asyncio.timeout(self._timeout):
                async with self._client.stream(
                    "POST", url, content=payload.body, headers={**payload.headers, **signed}
                ) as response:
                    answer = await _head(response)
        except TimeoutError:
            return Outcome(False, error=f"no answer within {self._timeout:g} s")
        except httpx.HTTPError as exc:
            return Outcome(False, error=f"{type(exc).__name__}: {exc}"[:ANSWER_CHARS])
        if response.is_success:
            return Outcome(True, response.status_code)
        return Outcome(False, response.status_code, f"HTTP {response.status_code}: {answer}")


async def _head(response: httpx.Response) -> str:
    """The start of the answer's body: enough to say why, never a whole large body."""
    chunk = b""
    async for part in response.aiter_bytes():
        chunk += part
        if len(chunk) >= ANSWER_CHARS:
            break
    return chunk[:ANSWER_CHARS].decode(errors="replace")
