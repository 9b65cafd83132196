"""The webhook sender against scripted endpoints: signatures, keep-alive, what a failure
records (never the receiver's words), timeouts, TLS, and the SSRF checks on every connection."""

from __future__ import annotations

import asyncio

import pytest

from libs import webhooks
from services.webhooks import sender as sender_mod
from services.webhooks.payload import Payload
from services.webhooks.sender import Outcome
from tests.integration.webhooks_support import (
    LOOPBACK,
    PAYLOAD,
    SECRET,
    Rebinding,
    Scripted,
    answer,
    send_all,
    verifies,
)

# --- the sender --------------------------------------------------------------------------------


async def test_sender_signs_its_posts_and_keeps_its_connection_alive() -> None:
    refusal = b"no such device " * 100
    async with Scripted([answer(204), answer(500, refusal), answer(200, b"ok")]) as endpoint:
        outcomes = await send_all(endpoint.url, PAYLOAD, PAYLOAD, PAYLOAD)

    assert outcomes == [
        Outcome(True, 204),
        Outcome(False, 500, "5xx: HTTP 500"),
        Outcome(True, 200),
    ]
    assert endpoint.connections == 1, "a short answer was not read to its end"
    first = endpoint.requests[0]
    assert first.body == PAYLOAD.body and first.headers["content-type"] == "application/json"
    assert first.headers["user-agent"] == sender_mod.USER_AGENT
    assert verifies(SECRET, first)


async def test_sender_keeps_the_class_and_status_of_a_refusal_never_its_body() -> None:
    secret_body = b"SECRET-BODY: what the private address serves"
    answers = [answer(500, secret_body), answer(404, secret_body), answer(401, secret_body)]
    async with Scripted(answers) as endpoint:
        outcomes = await send_all(endpoint.url, PAYLOAD, PAYLOAD, PAYLOAD)

    assert outcomes == [
        Outcome(False, 500, "5xx: HTTP 500"),
        Outcome(False, 404, "4xx: HTTP 404"),
        Outcome(False, 401, "4xx: HTTP 401"),
    ]


async def test_sender_drops_the_connection_of_a_huge_answer_rather_than_read_it() -> None:
    huge = b"x" * (4 * sender_mod.DRAIN_BYTES)
    async with Scripted([answer(500, huge), answer(200)]) as endpoint:
        outcomes = await send_all(endpoint.url, PAYLOAD, PAYLOAD)

    assert outcomes == [Outcome(False, 500, "5xx: HTTP 500"), Outcome(True, 200)]
    assert endpoint.connections == 2


async def test_sender_does_not_follow_a_redirect() -> None:
    moved = answer(302, b"", "location: http://169.254.169.254/latest")
    async with Scripted([moved]) as endpoint:
        (outcome,) = await send_all(endpoint.url, PAYLOAD)

    assert outcome == Outcome(False, 302, "3xx: HTTP 302")
    assert len(endpoint.requests) == 1


async def test_sender_gives_up_on_a_silent_endpoint_after_its_timeout() -> None:
    async with Scripted([None]) as endpoint:
        (outcome,) = await send_all(endpoint.url, PAYLOAD, timeout_s=0.3)

    assert outcome == Outcome(False, None, "timeout: no answer within 0.3 s")


async def test_sender_reports_what_went_wrong_in_its_own_words_instead_of_raising() -> None:
    async with Scripted([]) as endpoint:
        closed = endpoint.url
    bad_header = Payload("msg_2", b"{}", {"x-note": "one\r\ntwo"})
    async with Scripted([]) as endpoint:
        outcomes = await send_all(closed, PAYLOAD) + await send_all(endpoint.url, bad_header)

    assert outcomes == [
        Outcome(False, None, "refused: the connection was refused"),
        Outcome(False, None, "invalid: the request could not be sent"),
    ]
    assert endpoint.requests == []


async def test_sender_says_tls_when_the_handshake_fails() -> None:
    async def not_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer(200))  # plain HTTP where a TLS server hello belongs
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_tls, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        (outcome,) = await send_all(f"https://127.0.0.1:{port}/hook", PAYLOAD)

    assert outcome == Outcome(False, None, "tls: the TLS handshake failed")


@pytest.mark.parametrize(
    ("allow_nets", "admin"), [((), True), (LOOPBACK, False)], ids=["no-allow-net", "not-admin"]
)
async def test_sender_never_connects_to_a_refused_address(
    allow_nets: tuple[webhooks.IPNetwork, ...], admin: bool
) -> None:
    async with Scripted([answer(204)]) as endpoint:
        mapped = endpoint.url.replace("127.0.0.1", "[::ffff:127.0.0.1]")
        outcomes = [
            *await send_all(endpoint.url, PAYLOAD, allow_nets=allow_nets, admin=admin),
            *await send_all(mapped, PAYLOAD, allow_nets=allow_nets, admin=admin),
        ]

    assert all(not o.ok and o.error and o.error.startswith("blocked: ") for o in outcomes)
    assert "127.0.0.1 is a loopback address" in (outcomes[0].error or "")
    assert endpoint.connections == 0


async def test_a_name_that_resolves_elsewhere_after_the_check_is_not_connected_to() -> None:
    # 93.184.215.14 only ever reaches the check: nothing connects to a public address here.
    rebinding = Rebinding("93.184.215.14", "127.0.0.1")
    allowed = Rebinding("127.0.0.1")
    async with Scripted([answer(204)]) as endpoint:
        port = endpoint.port
        url = f"http://hooks.rebind.test:{port}/hook"
        webhooks.check_url(url, (), allow_private_targets=False, resolve=rebinding.lookup)
        (refused,) = await send_all(url, PAYLOAD, allow_nets=(), resolver=rebinding)
        (delivered,) = await send_all(url, PAYLOAD, allow_nets=LOOPBACK, resolver=allowed)

    assert rebinding.lookups == ["hooks.rebind.test", "hooks.rebind.test"]
    assert refused == Outcome(
        False,
        None,
        "blocked: hooks.rebind.test resolves to a loopback address outside "
        "SMARTHOME_WEBHOOK_ALLOW_NETS",
    )
    assert delivered == Outcome(True, 204)  # an allowed answer is connected to, by its name
    assert len(endpoint.requests) == 1
    assert endpoint.requests[0].headers["host"] == f"hooks.rebind.test:{port}"
