"""The simulator's `--api-url`: the gateway's root or the API's base name the same gateway, and
a URL that is not a gateway's is an error at once, not an endless wait."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from devices.simulator.__main__ import NotAGateway, _gateway_ready, api_root


@pytest.mark.parametrize(
    "given",
    [
        "http://127.0.0.1:8000",
        "http://127.0.0.1:8000/",
        "http://127.0.0.1:8000/api/v1",
        "http://127.0.0.1:8000/api/v1/",
        " http://127.0.0.1:8000/api/v1 ",
    ],
)
def test_the_api_base_and_the_root_name_the_same_gateway(given: str) -> None:
    assert api_root(given) == "http://127.0.0.1:8000"


def test_a_gateway_behind_a_path_keeps_its_path() -> None:
    assert api_root("https://example.org/smarthome/api/v1") == "https://example.org/smarthome"
    assert api_root("https://example.org/smarthome") == "https://example.org/smarthome"


async def test_a_url_whose_readiness_is_a_404_fails_at_once_with_the_hint() -> None:
    asked: list[str] = []

    def not_a_gateway(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(404)

    transport = httpx.MockTransport(not_a_gateway)
    began = time.monotonic()
    async with httpx.AsyncClient(transport=transport, base_url="http://h:1/x") as http:
        with pytest.raises(NotAGateway, match=r"root URL, e\.g\. http://127\.0\.0\.1:8000"):
            await _gateway_ready(http, asyncio.Event())
    assert asked == ["/x/health/ready"]
    assert time.monotonic() - began < 1


async def test_a_gateway_that_is_starting_is_waited_for() -> None:
    answers = iter([503, 503, 200])

    def starting(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(answers))

    async with httpx.AsyncClient(
        transport=httpx.MockTransport(starting), base_url="http://h:1"
    ) as http:
        assert await _gateway_ready(http, asyncio.Event()) is True
