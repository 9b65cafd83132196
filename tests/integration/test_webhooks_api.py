"""The subscriptions API: round trip without the secret, validation, who may target private
networks, problems, and the audited facts of creating and deleting."""

from __future__ import annotations

import pytest
from litestar.testing import AsyncTestClient
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy
from nats.js.errors import NotFoundError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import messages as m
from libs import subjects, webhooks
from libs.errors import Invalid
from libs.settings import Settings
from services.gateway.auth.context import Context
from services.gateway.subscriptions.schemas import SubscriptionCreate
from services.gateway.subscriptions.service import SubscriptionService
from tests.api import bearer
from tests.helpers import eventually
from tests.integration import webhooks_support
from tests.integration.test_rules import collected
from tests.integration.webhooks_support import (
    LOOPBACK,
    RESIDENT,
    SUBS,
    Scripted,
    gateway_app,
    with_webhooks,
)

# The shared fixtures, under their names: pytest finds them in this module.
client = webhooks_support.client


# --- the API -----------------------------------------------------------------------------------


async def test_subscription_round_trip_never_shows_the_secret_again(
    client: AsyncTestClient, js: JetStreamContext
) -> None:
    body = {"filter": "system.alert.>", "url": "http://127.0.0.1:9/hook"}

    created = await client.post(SUBS, json=body)
    sub = created.json()
    consumer = await js.consumer_info(subjects.SYSTEM_STREAM, subjects.webhook_consumer(sub["id"]))
    notify = await js.consumer_info(
        subjects.SYSTEM_STREAM, subjects.webhook_notify_consumer(sub["id"])
    )
    fetched = await client.get(f"{SUBS}/{sub['id']}")
    listed = await client.get(SUBS, params={"limit": "500"})
    deleted = await client.delete(f"{SUBS}/{sub['id']}")
    gone = await client.get(f"{SUBS}/{sub['id']}")

    assert created.status_code == 201
    assert sub["secret"].startswith("whsec_") and sub["mode"] == "structured"
    assert sub["batch_size"] is None and sub["delivered"] == 0
    assert consumer.config.filter_subject == "system.alert.>"
    assert consumer.config.ack_policy == AckPolicy.ALL
    assert consumer.config.max_ack_pending == 2 * webhooks.FETCH_BATCH  # bounded in flight
    assert notify.config.filter_subject == subjects.notification(sub["id"])
    assert fetched.json() == {k: v for k, v in sub.items() if k != "secret"}
    assert sub["id"] in [s["id"] for s in listed.json()["items"]]
    assert all("secret" not in s for s in listed.json()["items"])
    assert deleted.status_code == 204 and gone.status_code == 404
    with pytest.raises(NotFoundError):
        await js.consumer_info(subjects.SYSTEM_STREAM, subjects.webhook_consumer(sub["id"]))
    with pytest.raises(NotFoundError):
        await js.consumer_info(subjects.SYSTEM_STREAM, subjects.webhook_notify_consumer(sub["id"]))


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"filter": "events..x"}, "$.filter", "not a subject filter"),
        ({"filter": "weather.>"}, "$.filter", "must start with events."),
        ({"url": "ftp://x/hook"}, "$.url", "http:// or https://"),
        ({"url": "not a url"}, "$.url", "http:// or https://"),
        ({"secret": "hunter2"}, "$.secret", "whsec_"),
        ({"mode": "smoke-signals"}, "$.mode", "Invalid enum value"),
        ({"mode": "batched", "batch_size": 0}, "$.batch_size", ">= 1"),
        ({"mode": "batched", "batch_size": 5000}, "$.batch_size", "<= 1000"),
        ({"mode": "binary", "batch_size": 10}, "$.batch_size", "mode `batched` only"),
    ],
)
async def test_bad_input_is_refused_naming_the_field(
    client: AsyncTestClient, body: dict[str, str], field: str, says: str
) -> None:
    valid = {"filter": "events.x.>", "url": "http://127.0.0.1:9/hook"}

    response = await client.post(SUBS, json=valid | body)

    assert response.status_code == 422, response.text
    problem = response.json()
    assert [e["field"] for e in problem["errors"]] == [field]
    assert field in problem["detail"] and says in problem["detail"]


PRIVATE_URLS = (
    "http://127.0.0.1:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",
    "http://[64:ff9b::7f00:1]:{port}/",
    "http://10.0.0.1/",
)


async def test_a_webhook_into_a_private_network_is_refused_without_an_allow_net(
    settings: Settings, admin_token: str
) -> None:
    strict = gateway_app(with_webhooks(settings, allow_nets=()))
    async with Scripted([]) as endpoint, AsyncTestClient(strict) as client:
        client.headers.update(bearer(admin_token))
        responses = [
            await client.post(SUBS, json={"filter": "events.x.>", "url": url.format(port=port)})
            for url in (*PRIVATE_URLS, "http://169.254.169.254/latest")
            for port in [endpoint.port]
        ]

    for response in responses:
        assert response.status_code == 422, response.text
        problem = response.json()
        assert [e["field"] for e in problem["errors"]] == ["$.url"]
        assert "outside SMARTHOME_WEBHOOK_ALLOW_NETS" in problem["detail"]
    assert "loopback" in responses[1].json()["detail"]
    assert "(that is 127.0.0.1)" in responses[2].json()["detail"]
    assert "private" in responses[3].json()["detail"]
    assert "metadata" in responses[4].json()["detail"]
    assert endpoint.connections == 0


async def test_an_admin_may_subscribe_a_loopback_url_inside_the_allow_nets(
    client: AsyncTestClient,
) -> None:
    created = [
        await client.post(SUBS, json={"filter": "events.x.>", "url": url.format(port=9)})
        for url in PRIVATE_URLS
    ]
    for response in created:
        if response.status_code == 201:
            await client.delete(f"{SUBS}/{response.json()['id']}")

    assert [r.status_code for r in created] == [201, 201, 201, 422]
    assert "10.0.0.1 is a private address outside" in created[3].json()["detail"]


async def test_a_non_admin_may_not_reach_a_private_address_even_inside_the_allow_nets(
    sessions: async_sessionmaker[AsyncSession], nc: NATS
) -> None:
    hooks = webhooks.WebhookSettings(allow_nets=LOOPBACK)
    service = SubscriptionService(sessions, nc, hooks)
    body = SubscriptionCreate(filter="events.x.>", url="http://127.0.0.1:9/")

    with pytest.raises(Invalid) as refused:
        await service.create(body, Context(RESIDENT, "c-1"), admin=False)

    assert refused.value.field == "$.url"
    assert "only an administrator" in str(refused.value)


async def test_unknown_subscription_and_bad_status_answer_problems(
    client: AsyncTestClient,
) -> None:
    missing = await client.get(f"{SUBS}/nope/deliveries")
    redeliver = await client.post(f"{SUBS}/nope/redeliver")
    sub = (
        await client.post(SUBS, json={"filter": "events.x.>", "url": "http://127.0.0.1:9/"})
    ).json()
    bad_status = await client.get(f"{SUBS}/{sub['id']}/deliveries", params={"status": "lost"})
    await client.delete(f"{SUBS}/{sub['id']}")

    assert missing.status_code == 404 and redeliver.status_code == 404
    assert bad_status.status_code == 422
    assert bad_status.json()["errors"][0]["field"] == "status"


async def test_creating_and_deleting_a_subscription_are_facts_for_the_audit_without_secrets(
    client: AsyncTestClient, js: JetStreamContext
) -> None:
    url = "http://bob:hunter2@127.0.0.1:9/hook?token=abc#frag"
    created = await client.post(SUBS, json={"filter": "events.x.>", "url": url})
    assert created.status_code == 201, created.text
    sub_id = created.json()["id"]
    shown = created.json()["url"], (await client.get(f"{SUBS}/{sub_id}")).json()["url"]
    await client.delete(f"{SUBS}/{sub_id}")

    async def both_facts() -> list[m.ChangeFact]:
        # Published by the outbox's relay after each commit: a moment after the answer.
        facts = await collected(js, subjects.subscription_changed(sub_id), m.change_fact_decoder)
        assert len(facts) == 2, facts
        return facts

    facts = await eventually(both_facts, timeout=5)
    assert [(f.what, f.id, f.change) for f in facts] == [
        ("subscription", sub_id, "created"),
        ("subscription", sub_id, "deleted"),
    ]
    assert {f.detail["url"] for f in facts} == {"http://127.0.0.1:9/hook"}
    assert shown == ("http://127.0.0.1:9/hook", "http://127.0.0.1:9/hook")
    assert facts[0].correlation_id == created.headers["X-Correlation-Id"]
