"""Notification channels end to end: the gateway in-process, the webhooks (and rules) service as
real processes, and local receivers only: an SMTP server (aiosmtpd) and HTTP endpoints on
127.0.0.1 standing for Slack and ntfy. Deliveries, retries, failures listed, re-drives, write-only
secrets, homes and bad input."""

from __future__ import annotations

import email
import email.message
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext

from libs import bus, embedded_nats, subjects
from libs import messages as m
from libs.principals import Role
from services.gateway.app import API_PREFIX
from tests.api import bearer
from tests.helpers import eventually, unique_id
from tests.integration import webhooks_support
from tests.integration.test_rules import _reads_events_of, add_devices, add_rule, press
from tests.integration.webhooks_support import Receiver, Scripted, answer, webhooks_service
from tests.processes import Service

CHANNELS = f"{API_PREFIX}/channels"
# The refusal's own words: they must never reach a delivery record.
REFUSAL_WORDS = "SECRET-REFUSAL of the mail server"

client = webhooks_support.client


class Inbox:
    """An SMTP server's mailbox handler: keeps what it accepts; refuses every recipient with
    `refuse` (an SMTP reply code) while it is set."""

    def __init__(self) -> None:
        self.messages: list[email.message.Message] = []
        self.refuse: int | None = None

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.refuse is not None:
            return f"{self.refuse} 5.1.1 {REFUSAL_WORDS}"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        assert isinstance(content, bytes)
        self.messages.append(email.message_from_bytes(content))
        return "250 Message accepted"


@contextmanager
def smtp_server() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = embedded_nats.free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def text_of(mail: email.message.Message) -> str:
    """A received e-mail's text, with the newlines it was written with (SMTP sends CRLF)."""
    payload = mail.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode().replace("\r\n", "\n")


class Channels:
    """Creates channels through the API and deletes them when the test ends."""

    def __init__(self, client: AsyncTestClient) -> None:
        self.client = client
        self.ids: list[str] = []

    async def create(self, config: dict[str, Any], **body: Any) -> dict[str, Any]:
        response = await self.client.post(
            CHANNELS, json={"name": "Alarms", "config": config, **body}
        )
        assert response.status_code == 201, response.text
        self.ids.append(response.json()["id"])
        return response.json()

    async def deliveries(self, channel_id: str, **params: str) -> list[dict[str, Any]]:
        response = await self.client.get(f"{CHANNELS}/{channel_id}/deliveries", params=params)
        assert response.status_code == 200, response.text
        return response.json()["items"]


@pytest.fixture
async def channels(client: AsyncTestClient) -> AsyncIterator[Channels]:
    made = Channels(client)
    yield made
    for channel_id in made.ids:
        await client.delete(f"{CHANNELS}/{channel_id}")


def email_config(port: int, **more: Any) -> dict[str, Any]:
    return {
        "kind": "email",
        "host": "127.0.0.1",
        "port": port,
        "security": "none",
        "from": "smarthome@home.test",
        "to": ["alice@home.test", "bob@home.test"],
        **more,
    }


async def notify(js: JetStreamContext, channel_id: str, message: str) -> m.CloudEvent:
    """What the rules service publishes for a `notify` action naming the channel."""
    alert = m.make_event(
        unique_id(),
        "alert",
        {"rule_id": "r1", "rule_name": "Door", "message": message, "severity": "warning"},
        source="rule/r1",
        event_id=unique_id(),
    )
    await bus.publish(js, subjects.notification(channel_id), alert, msg_id=alert.id)
    return alert


# --- delivery ----------------------------------------------------------------------------------


async def test_a_rule_that_fires_sends_its_message_by_email(
    channels: Channels,
    nc: Any,
    js: JetStreamContext,
    sessions: Any,
    service_env: dict[str, str],
    data_dir: Path,
) -> None:
    button = unique_id("button")
    await add_devices(sessions, button)
    with smtp_server() as (inbox, port):
        channel = await channels.create(email_config(port))
        spec = m.RuleSpec(
            name="Front door",
            trigger=m.EventTrigger(subject=f"events.{button}.button"),
            actions=[m.NotifyAction(message="The front door opened", channel=channel["id"])],
        )
        rule_id = await add_rule(sessions, nc, spec)
        rules = Service("services.rules", service_env, data_dir).start()
        try:
            async with webhooks_service(service_env, data_dir):
                await eventually(lambda: _reads_events_of(rules, button), timeout=10)
                await press(js, button)
                await eventually(lambda: inbox.messages, timeout=20)
        finally:
            rules.stop()

    (mail,) = inbox.messages
    assert mail["Subject"] == "[smarthome] INFO: Front door"
    assert mail["From"] == "smarthome@home.test"
    assert mail["To"] == "alice@home.test, bob@home.test"
    assert text_of(mail).startswith("The front door opened\n")
    assert f"\nRule: Front door ({rule_id})\n" in text_of(mail)


async def test_slack_and_ntfy_receive_the_alert(
    channels: Channels, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    async with Receiver() as slack, Receiver() as ntfy, webhooks_service(service_env, data_dir):
        to_slack = await channels.create({"kind": "slack", "url": slack.url + "/T0/B0/tok"})
        to_ntfy = await channels.create(
            {
                "kind": "ntfy",
                "server": ntfy.url.removesuffix("/hook"),
                "topic": "home",
                "token": "tk_1",
            }
        )
        await notify(js, to_slack["id"], "Water in the cellar")
        await notify(js, to_ntfy["id"], "Water in the cellar")
        await eventually(lambda: slack.delivered and ntfy.delivered, timeout=15)

    (posted,) = slack.delivered
    assert msgspec.json.decode(posted.body) == {"text": "*WARNING: Door*\nWater in the cellar"}
    assert "webhook-signature" not in posted.headers
    (published,) = ntfy.delivered
    body = msgspec.json.decode(published.body)
    assert (body["topic"], body["title"], body["priority"]) == ("home", "WARNING: Door", 4)
    assert body["message"].startswith("Water in the cellar\n")
    assert published.headers["authorization"] == "Bearer tk_1"


async def test_a_refusing_smtp_server_is_retried_then_failed_listed_and_redriven(
    channels: Channels,
    client: AsyncTestClient,
    js: JetStreamContext,
    service_env: dict[str, str],
    data_dir: Path,
) -> None:
    service = webhooks_service(service_env, data_dir, SMARTHOME_WEBHOOK_RETRY_FOR="2")
    with smtp_server() as (inbox, port):
        inbox.refuse = 550
        async with service:
            channel = await channels.create(email_config(port))
            alert = await notify(js, channel["id"], "Smoke in the kitchen")
            failed = await eventually(
                lambda: channels.deliveries(channel["id"], status="failed"), timeout=15
            )
            inbox.refuse = None  # the mailbox is fixed
            redriven = await client.post(
                f"{CHANNELS}/{channel['id']}/deliveries/{failed[0]['id']}/redrive"
            )
            await eventually(lambda: inbox.messages, timeout=10)
            delivered = await eventually(
                lambda: channels.deliveries(channel["id"], status="delivered"), timeout=5
            )
            again = await client.post(
                f"{CHANNELS}/{channel['id']}/deliveries/{failed[0]['id']}/redrive"
            )

    (record,) = failed
    assert record["event_id"] == alert.id and record["attempts"] >= 2
    assert record["last_status_code"] == 550
    assert record["last_error"] == "5xx: SMTP 550: the recipients were refused"
    assert (redriven.status_code, redriven.json()["status"]) == (202, "pending")
    assert [d["id"] for d in delivered] == [record["id"]]
    assert text_of(inbox.messages[0]).startswith("Smoke in the kitchen\n")
    assert again.status_code == 409


async def test_a_slack_url_that_answers_404_fails_and_is_listed(
    channels: Channels, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    service = webhooks_service(service_env, data_dir, SMARTHOME_WEBHOOK_RETRY_FOR="2")
    async with Scripted([answer(404, b"no_service")] * 100) as slack, service:
        channel = await channels.create({"kind": "slack", "url": slack.url})
        alert = await notify(js, channel["id"], "Window open")
        failed = await eventually(
            lambda: channels.deliveries(channel["id"], status="failed"), timeout=15
        )

    assert [(d["event_id"], d["last_status_code"], d["last_error"]) for d in failed] == [
        (alert.id, 404, "4xx: HTTP 404")
    ]


# --- the API -----------------------------------------------------------------------------------


async def test_secrets_are_never_shown_after_creation(
    channels: Channels, client: AsyncTestClient
) -> None:
    made = [
        await channels.create(
            email_config(2525, security="starttls", username="me", password="pw-SECRET-1")
        ),
        await channels.create({"kind": "slack", "url": "http://127.0.0.1:9/T0/B0/SECRET-2"}),
        await channels.create(
            {"kind": "ntfy", "server": "http://127.0.0.1:9", "topic": "t", "token": "SECRET-3"}
        ),
    ]
    shown = [await client.get(f"{CHANNELS}/{c['id']}") for c in made]
    listed = await client.get(CHANNELS, params={"limit": "500"})

    for text in [str(made), *(r.text for r in shown), listed.text]:
        assert "SECRET" not in text
    assert [r.json()["secret_set"] for r in shown] == [True, True, True]
    assert shown[0].json()["config"] == {
        "kind": "email",
        "host": "127.0.0.1",
        "port": 2525,
        "security": "starttls",
        "username": "me",
        "from": "smarthome@home.test",
        "to": ["alice@home.test", "bob@home.test"],
    }
    assert shown[1].json()["config"] == {"kind": "slack", "host": "127.0.0.1"}


async def test_another_homes_channel_is_404(
    channels: Channels, client: AsyncTestClient, make_token: Any
) -> None:
    home_a, home_b = unique_id("home"), unique_id("home")
    theirs = await channels.create(
        {"kind": "ntfy", "server": "http://127.0.0.1:9", "topic": "b"}, home=home_b
    )
    resident = bearer(await make_token(Role.RESIDENT, [home_a]))
    url = f"{CHANNELS}/{theirs['id']}"

    got = await client.get(url, headers=resident)
    deliveries = await client.get(f"{url}/deliveries", headers=resident)
    deleted = await client.delete(url, headers=resident)
    listed = await client.get(CHANNELS, headers=resident, params={"limit": "500"})

    assert [got.status_code, deliveries.status_code, deleted.status_code] == [404, 404, 404]
    assert theirs["id"] not in listed.text
    assert (await client.get(url)).status_code == 200  # still there

    # Nor can the resident's rule send to it: as unknown as a channel that does not exist.
    rule = {
        "name": "alert the neighbours",
        "home": home_a,
        "trigger": {"type": "schedule", "cron": "0 * * * *"},
        "actions": [{"type": "notify", "message": "hello", "channel": theirs["id"]}],
    }
    refused = await client.post("/api/v1/rules", json=rule, headers=resident)
    assert refused.status_code == 422, refused.text
    assert "$.actions[0].channel" in refused.text


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (email_config(70000), "$.config.port"),
        ({"kind": "pigeon", "to": ["a@b.c"]}, "$.config.kind"),
        ({k: v for k, v in email_config(25).items() if k != "to"}, "$.config.to"),
        ({"kind": "slack", "url": "ftp://hooks.example/x"}, "$.config.url"),
    ],
)
async def test_bad_input_is_422_naming_the_field(
    client: AsyncTestClient, config: dict[str, Any], field: str
) -> None:
    response = await client.post(CHANNELS, json={"name": "Bad", "config": config})

    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == [field]
