"""Notification channels end to end: the gateway in-process, the webhooks (and rules) service as
real processes, and local receivers only: an SMTP server (aiosmtpd) and HTTP endpoints on
127.0.0.1 standing for Slack and ntfy. Deliveries, retries, failures listed, re-drives, write-only
secrets, homes and bad input."""

from __future__ import annotations

import email
import email.message
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext

from libs import bus, embedded_nats, homes, subjects, webhooks
from libs import messages as m
from libs.homes import HomeIndex
from libs.principals import Role
from services.gateway.app import API_PREFIX
from services.webhooks.channels import ChannelSender
from services.webhooks.payload import Payload
from services.webhooks.sender import Outcome, make_session
from tests.api import bearer
from tests.helpers import eventually, unique_id
from tests.integration import webhooks_support
from tests.integration.test_bus_tls import make_ca_and_server_cert
from tests.integration.test_rules import _reads_events_of, add_devices, add_rule, press
from tests.integration.webhooks_support import (
    LOOPBACK,
    Rebinding,
    Receiver,
    Scripted,
    answer,
    webhooks_service,
)
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


class Account:
    """The one login an SMTP server that requires authentication accepts (an aiosmtpd
    authenticator); its password may change. Counts the logins it refused."""

    def __init__(self, login: str, password: str) -> None:
        self.login = login
        self.password = password
        self.refused = 0

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        given = (data.login, data.password) if isinstance(data, LoginPassword) else None
        if given == (self.login.encode(), self.password.encode()):
            return AuthResult(success=True)
        self.refused += 1
        return AuthResult(success=False, handled=False, message=f"535 5.7.8 {REFUSAL_WORDS}")


@contextmanager
def smtp_server(
    account: Account | None = None, tls: tuple[Path, Path] | None = None
) -> Iterator[tuple[Inbox, int]]:
    """An SMTP server on 127.0.0.1; with an `account`, one that offers STARTTLS with the
    certificate and key `tls` and takes mail only after that account logged in over it."""
    inbox = Inbox()
    port = embedded_nats.free_port()
    options: dict[str, Any] = {}
    if account is not None:
        assert tls is not None, "a password goes over TLS only"
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)
        options = {
            "tls_context": context,
            "require_starttls": True,
            "auth_required": True,
            "authenticator": account,
        }
    controller = Controller(inbox, hostname="127.0.0.1", port=port, **options)
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
                await eventually(lambda: _reads_events_of(js, button), timeout=10)
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


async def test_smtp_credentials_refused_are_retried_then_failed_listed_and_redriven(
    channels: Channels,
    client: AsyncTestClient,
    js: JetStreamContext,
    service_env: dict[str, str],
    data_dir: Path,
    tmp_path: Path,
) -> None:
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    account = Account("alarms", "the-right-password")
    # The webhooks service trusts the test CA (aiosmtplib verifies the STARTTLS certificate).
    service = webhooks_service(
        service_env, data_dir, SMARTHOME_WEBHOOK_RETRY_FOR="2", SSL_CERT_FILE=str(ca)
    )
    with smtp_server(account, tls=(cert, key)) as (inbox, port):
        async with service:
            channel = await channels.create(
                email_config(
                    port, security="starttls", username="alarms", password="a-wrong-password"
                )
            )
            alert = await notify(js, channel["id"], "Gas in the boiler room")
            failed = await eventually(
                lambda: channels.deliveries(channel["id"], status="failed"), timeout=15
            )
            refused_logins = account.refused
            account.password = "a-wrong-password"  # the mailbox takes the channel's password
            redriven = await client.post(
                f"{CHANNELS}/{channel['id']}/deliveries/{failed[0]['id']}/redrive"
            )
            await eventually(lambda: inbox.messages, timeout=10)
            delivered = await eventually(
                lambda: channels.deliveries(channel["id"], status="delivered"), timeout=5
            )

    (record,) = failed
    assert record["event_id"] == alert.id and record["attempts"] >= 2
    assert refused_logins >= record["attempts"]  # each attempt logged in, and was refused
    assert (record["last_status_code"], record["last_error"]) == (
        535,
        "5xx: SMTP 535: authentication failed",
    )
    assert (redriven.status_code, redriven.json()["status"]) == (202, "pending")
    assert [d["id"] for d in delivered] == [record["id"]]
    assert text_of(inbox.messages[0]).startswith("Gas in the boiler room\n")


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


# --- the SMTP host's address ---------------------------------------------------------------


def issue_cert(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """(ca.crt, tls.crt, tls.key): a private CA and a server certificate for the DNS name
    `name` only, so that a TLS client verifying another name (or an address) refuses it."""
    ca, _, _ = make_ca_and_server_cert(directory)
    openssl = shutil.which("openssl")
    assert openssl is not None
    (directory / f"{name}.ext").write_text(f"subjectAltName=DNS:{name}\n")
    for args in (
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
         "-keyout", f"{name}.key", "-out", f"{name}.csr"],
        ["x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.crt"],
    ):  # fmt: skip
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)
    return ca, directory / f"{name}.crt", directory / f"{name}.key"


async def mail_to(
    host: str, port: int, resolver: Rebinding, *, admin: bool = True, **more: Any
) -> Outcome:
    """One alert sent in-process by a channel's sender to the SMTP `host`, whose name
    `resolver` looks up; loopback addresses are allowed (SMARTHOME_WEBHOOK_ALLOW_NETS)."""
    config = msgspec.convert(email_config(port, host=host, **more), m.EmailChannel)
    settings = webhooks.WebhookSettings(allow_nets=LOOPBACK, timeout_s=5.0)
    alert = m.make_event(
        "d1", "alert", {"message": "Door open"}, source="rule/r1", event_id=unique_id()
    )
    async with make_session(settings, allow_private_targets=admin) as session:
        sender = ChannelSender(
            config, session, settings, allow_private_targets=admin, resolver=resolver
        )
        return await sender.send(Payload(alert.id, msgspec.json.encode(alert), {}))


async def test_an_smtp_host_is_connected_to_at_the_address_that_was_checked() -> None:
    # The second answer would be a public address: nothing may ever ask for it.
    rebinding = Rebinding("127.0.0.1", "93.184.215.14")
    with smtp_server() as (inbox, port):
        sent = await mail_to("mail.rebind.test", port, rebinding)

    assert sent == Outcome(True, 250)
    assert rebinding.lookups == ["mail.rebind.test"]  # looked up once, by the check
    assert [text_of(mail).split("\n")[0] for mail in inbox.messages] == ["Door open"]


async def test_an_smtp_host_resolving_to_a_refused_address_is_never_connected_to() -> None:
    with smtp_server() as (inbox, port):
        refused = await mail_to("mail.rebind.test", port, Rebinding("127.0.0.1"), admin=False)

    assert refused == Outcome(
        False,
        None,
        "blocked: mail.rebind.test resolves to a loopback address, which only an "
        "administrator may target",
    )
    assert inbox.messages == []


async def test_starttls_verifies_the_smtp_hosts_name_not_its_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = issue_cert(tmp_path, "mail.home.test")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # aiosmtplib's default context trusts the CA
    account = Account("alarms", "pw")
    tls = {"security": "starttls", "username": "alarms", "password": "pw"}
    with smtp_server(account, tls=(cert, key)) as (inbox, port):
        by_name = await mail_to("mail.home.test", port, Rebinding("127.0.0.1"), **tls)
        other_name = await mail_to("smtp.home.test", port, Rebinding("127.0.0.1"), **tls)

    assert by_name == Outcome(True, 250)
    assert other_name == Outcome(False, None, "tls: the TLS handshake failed")
    assert len(inbox.messages) == 1


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


async def test_a_channels_notifications_are_of_the_channels_home(
    channels: Channels, nc: Any, sessions: Any
) -> None:
    home = unique_id("home")
    channel = await channels.create(
        {"kind": "ntfy", "server": "http://127.0.0.1:9", "topic": "t"}, home=home
    )
    notification = subjects.notification(channel["id"])
    index = HomeIndex()

    await index.start(nc, sessions)  # reads every object's home from the database
    try:
        read = index.home(notification)
    finally:
        await index.stop()
    asked = await homes.read_home(sessions, *(homes.about(notification) or ("", "")))

    assert read == home
    assert asked == (True, home)


async def test_a_dry_run_names_the_channel_a_notify_action_sends_to(
    channels: Channels, client: AsyncTestClient
) -> None:
    channel = await channels.create({"kind": "ntfy", "server": "http://127.0.0.1:9", "topic": "t"})
    spec = {
        "name": "hourly",
        "trigger": {"type": "schedule", "cron": "0 * * * *"},
        "actions": [{"type": "notify", "message": "tick", "channel": channel["id"]}],
    }
    since = datetime(2025, 3, 1, 6, 30, tzinfo=UTC)
    window = {"since": since.isoformat(), "until": (since + timedelta(hours=1)).isoformat()}

    response = await client.post(f"{API_PREFIX}/rules/test", json={"rule": spec, **window})

    assert response.status_code == 200, response.text
    ((sent,),) = [firing["would_send"] for firing in response.json()["firings"]]
    assert (sent["type"], sent["subject"], sent["message"]) == (
        "notify",
        subjects.notification(channel["id"]),
        "tick",
    )


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
