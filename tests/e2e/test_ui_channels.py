"""The web UI's webhooks and channels view, and the rest of what the API manages, in a real
browser on `smarthome up`: a webhook subscribed from the page (its secret shown once), its
failed deliveries listed and re-driven, then deleted after a confirm step; notification
channels added from the page (their secrets never shown again), a failed Slack notification
re-driven from its row; a rule deleted, a device edited, a platform API key revoked. Local
receivers only: HTTP endpoints this test starts on 127.0.0.1."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from playwright.async_api import Browser, Page, expect

from libs import embedded_nats
from tests.e2e.conftest import SLOW_S, Watched, open_page, sign_in, signed_in_as_admin
from tests.e2e.up import Up
from tests.helpers import eventually, unique_id
from tests.integration.webhooks_support import Receiver

pytestmark = pytest.mark.e2e

SCREENSHOT = Path(__file__).resolve().parents[2] / "ops" / "channels.png"  # in the README
FAILING = 10**6  # a Receiver's `fail_first`: it answers 500 until told otherwise
# The receivers listen on 127.0.0.1, which only an administrator inside the allowed networks
# may target; a failed first attempt is retried for 2 s, then listed as failed.
WEBHOOK_ENV = {
    "SMARTHOME_WEBHOOK_ALLOW_NETS": "127.0.0.0/8",
    "SMARTHOME_WEBHOOK_RETRY_BASE": "0.2",
    "SMARTHOME_WEBHOOK_RETRY_FOR": "2",
}


@pytest.fixture(scope="module")
async def hooks_up(chromium: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Up]:
    """A platform of this module's: its webhooks may reach this test's receivers, and its
    platform API key may be revoked (the shared platform's stays as it is)."""
    data_dir = tmp_path_factory.mktemp("up")
    up = Up(data_dir, embedded_nats.free_port(), embedded_nats.free_port(), extra_env=WEBHOOK_ENV)
    try:
        await up.ready()
        yield up
    finally:
        code, orphans = up.stop()
    assert code == 0, up.stderr.read_text()[-3000:]
    assert orphans == [], [p.cmdline() for p in orphans]


async def api(up: Up, method: str, path: str, body: object = None) -> httpx.Response:
    """A call as the administrator, without blocking the loop the receivers answer from."""
    async with httpx.AsyncClient(base_url=up.api, headers=up.headers, timeout=10) as client:
        return await client.request(method, "/api/v1" + path, json=body)


async def items(up: Up, path: str) -> list[dict[str, Any]]:
    answer = await api(up, "GET", path)
    assert answer.status_code == 200, answer.text
    listed: list[dict[str, Any]] = answer.json()["items"]
    return listed


async def signed_in(browser: Browser, up: Up) -> Watched:
    """An administrator's tab, once the demo's home is defined (the launcher defines it just
    after the gateway is ready)."""

    async def home_defined() -> bool:
        try:
            return (await api(up, "GET", "/locations/home")).status_code == 200
        except httpx.TransportError as exc:
            raise AssertionError(repr(exc)) from exc

    await eventually(home_defined, timeout=SLOW_S)
    tab = await open_page(browser, up)
    await sign_in(tab.page)
    await signed_in_as_admin(tab.page)
    return tab


async def notifications_view(page: Page) -> None:
    await page.get_by_role("link", name="webhooks and channels").click()
    await expect(page.get_by_role("heading", name="Webhook subscriptions")).to_be_focused()
    await expect(page.locator("#app")).to_be_hidden()


async def open_details(page: Page, details: str) -> None:
    """Open a collapsed part of the page from the keyboard."""
    summary = page.locator(f"#{details} > summary")
    await summary.focus()
    await summary.press("Enter")
    await expect(page.locator(f"#{details}")).to_have_attribute("open", "")


async def register_device(up: Up, prefix: str) -> str:
    device = unique_id(prefix)
    created = await api(up, "POST", "/devices", {"id": device, "name": "D", "kind": "sensor"})
    assert created.status_code == 201, created.text
    return device


async def publish(up: Up, device: str, kind: str = "telemetry") -> None:
    event = {
        "id": unique_id("e"),
        "source": "test",
        "type": kind,
        "subject": device,
        "specversion": "1.0",
        "data": {"pressed": True},
    }
    answer = await api(up, "POST", "/events", event)
    assert answer.status_code == 202, answer.text


async def test_a_webhook_subscribed_on_the_page_its_failures_redriven_then_deleted(
    hooks_up: Up, browser: Browser
) -> None:
    up = hooks_up
    device = await register_device(up, "door")
    tab = await signed_in(browser, up)
    page, form = tab.page, tab.page.locator("#subscription-form")
    async with Receiver(fail_first=FAILING) as receiver:
        await notifications_view(page)
        await open_details(page, "subscription-add")

        # A filter outside the platform's subjects: refused, the field the API named marked.
        await form.get_by_label("subject filter").fill("nowhere.>")
        await form.get_by_label("URL").fill(receiver.url)
        await form.get_by_label("URL").press("Enter")
        refused = form.get_by_label("subject filter")
        await expect(refused).to_have_attribute("aria-invalid", "true")
        await expect(refused).to_be_focused()
        await expect(page.locator("#subscription-filter-error")).to_contain_text("$.filter")

        await refused.fill(f"events.{device}.>")
        await refused.press("Enter")
        shown = page.locator('#subscription-secret [data-secret="secret"]')
        await expect(shown).to_have_text(re.compile(r"^whsec_"))
        secret = await shown.text_content()
        [made] = [s for s in await items(up, "/subscriptions") if s["url"] == receiver.url]
        row = page.locator(f'#subscriptions tr[data-subscription="{made["id"]}"]')
        await expect(row).to_contain_text(f"events.{device}.>")
        await page.locator("#subscription-secret").get_by_role("button", name="hide").click()
        await expect(page.locator("#subscription-secret")).to_be_hidden()
        assert secret and secret not in await page.content()

        # An event the receiver refuses: retried, then failed; listed, re-driven from the page.
        await publish(up, device)
        deliveries = f"/subscriptions/{made['id']}/deliveries?status=failed"
        await eventually(lambda: items(up, deliveries), timeout=30, interval=0.3)
        await row.get_by_role("button", name=f"deliveries of subscription {made['id']}").click()
        box = page.locator("#subscription-deliveries")
        failed = box.locator('tr[data-status="failed"]')
        await expect(failed).to_have_count(1)
        await expect(failed.locator('[data-field="error"]')).to_contain_text("5xx")
        receiver.fail_first = 0  # the receiver is fixed
        await box.get_by_role("button", name="redrive the 1 failed").click()
        await expect(page.locator("#notice")).to_contain_text("1 failed delivery sent again")
        await expect(box.locator('tr[data-status="delivered"]')).to_have_count(1, timeout=20_000)
        assert len(receiver.delivered) == 1

        # Deleted after a confirm step; Escape takes the question back.
        delete = row.get_by_role("button", name=f"delete subscription {made['id']}")
        await delete.click()
        yes = row.get_by_role("button", name=f"yes, delete subscription {made['id']}")
        await expect(yes).to_be_focused()
        await yes.press("Escape")
        await expect(delete).to_be_focused()
        assert (await api(up, "GET", f"/subscriptions/{made['id']}")).status_code == 200
        await delete.press("Enter")
        await yes.press("Enter")
        await expect(row).to_have_count(0)
        assert (await api(up, "GET", f"/subscriptions/{made['id']}")).status_code == 404
    assert tab.problems == []


async def test_channels_added_on_the_page_keep_their_secrets_and_a_failure_is_redriven(
    hooks_up: Up, browser: Browser
) -> None:
    up = hooks_up
    device = await register_device(up, "button")
    tab = await signed_in(browser, up)
    page, form = tab.page, tab.page.locator("#channel-form")
    async with Receiver(fail_first=FAILING) as slack, Receiver() as hook:
        # A webhook too, so that the view shows both (and the README's picture does).
        made = await api(up, "POST", "/subscriptions", {"filter": "system.>", "url": hook.url})
        assert made.status_code == 201, made.text
        await notifications_view(page)
        await open_details(page, "channel-add")

        # An e-mail channel with a port out of range: the API names the field, shown there.
        name = unique_id("Mail")
        await form.get_by_label("channel name").fill(name)
        await form.get_by_label("kind").select_option("email")
        await form.get_by_label("SMTP host").fill("127.0.0.1")
        await form.get_by_label("SMTP port").fill("70000")
        await form.get_by_label("from").fill("smarthome@home.test")
        await form.get_by_label("to (comma separated)").fill("alice@home.test, bob@home.test")
        await form.get_by_label("SMTP password").fill("pw-SECRET-1")
        await form.get_by_label("SMTP password").press("Enter")
        await expect(page.locator("#email-port-error")).to_contain_text("$.config.port")
        await form.get_by_label("SMTP port").fill("2525")
        await form.get_by_label("SMTP user").fill("me")
        await form.get_by_label("security").select_option("starttls")
        await form.get_by_role("button", name="add channel").click()
        mail = page.locator("#channels tr[data-channel]", has_text=name)
        await expect(mail).to_contain_text("me@127.0.0.1:2525 (starttls) from smarthome@home.test")
        await expect(mail.locator('[data-field="secret"]')).to_have_text("set")
        await expect(form.get_by_label("SMTP password")).to_have_value("")  # gone with the form

        # A Slack-compatible webhook (its URL is the secret) and an ntfy topic with a token.
        alarms = unique_id("Alarms")
        await form.get_by_label("channel name").fill(alarms)
        await form.get_by_label("kind").select_option("slack")
        await expect(form.get_by_label("SMTP host")).to_be_hidden()
        await form.get_by_label("webhook URL").fill(slack.url + "/T0/B0/SECRET-2")
        await form.get_by_label("webhook URL").press("Enter")
        to_slack = page.locator("#channels tr[data-channel]", has_text=alarms)
        await expect(to_slack).to_contain_text("webhook on 127.0.0.1")
        phone = unique_id("Phone")
        await form.get_by_label("channel name").fill(phone)
        await form.get_by_label("kind").select_option("ntfy")
        await form.get_by_label("ntfy server").fill("http://127.0.0.1:9")
        await form.get_by_label("topic").fill("home")
        await form.get_by_label("access token").fill("SECRET-3")
        await form.get_by_label("access token").press("Enter")
        to_phone = page.locator("#channels tr[data-channel]", has_text=phone)
        await expect(to_phone).to_contain_text("http://127.0.0.1:9/home")
        await expect(to_phone.locator('[data-field="secret"]')).to_have_text("set")
        assert "SECRET" not in await page.content()

        # A rule notifies the Slack channel; the receiver refuses: failed, listed, re-driven.
        [channel] = [c for c in await items(up, "/channels") if c["name"] == alarms]
        rule = {
            "name": unique_id("pressed"),
            "trigger": {"type": "event", "subject": f"events.{device}.button"},
            "actions": [{"type": "notify", "message": "Doorbell", "channel": channel["id"]}],
        }
        stored = await api(up, "POST", "/rules", rule)
        assert stored.status_code == 201, stored.text

        async def notified() -> bool:  # once the rules service has the rule, the event fires it
            await publish(up, device, "button")
            return bool(slack.requests)

        await eventually(notified, timeout=30, interval=1)
        path = f"/channels/{channel['id']}/deliveries"
        await eventually(lambda: _all_failed(items(up, path)), timeout=30, interval=0.3)
        await to_slack.get_by_role("button", name=f"deliveries of channel {alarms}").click()
        box = page.locator("#channel-deliveries")
        failed = box.locator('tr[data-status="failed"]')
        await expect(failed.first).to_be_visible()
        await expect(failed.first.locator('[data-field="error"]')).to_contain_text("5xx: HTTP 500")
        if os.environ.get("SMARTHOME_UI_SCREENSHOT"):  # refresh the README's picture
            await page.screenshot(path=SCREENSHOT, full_page=True)
        slack.fail_first = 0
        first = failed.first
        delivery = await first.get_attribute("data-delivery")
        await first.get_by_role("button", name=f"redrive delivery {delivery}").click()
        await expect(box.locator(f'tr[data-delivery="{delivery}"]')).to_have_attribute(
            "data-status", "delivered", timeout=20_000
        )
        assert msgspec.json.decode(slack.delivered[0].body)["text"].endswith("Doorbell")

        # Deleted after a confirm step.
        await to_phone.get_by_role("button", name=f"delete channel {phone}").click()
        await to_phone.get_by_role("button", name=f"yes, delete channel {phone}").click()
        await expect(to_phone).to_have_count(0)
        assert phone not in [c["name"] for c in await items(up, "/channels")]
    assert tab.problems == []


async def _all_failed(listed: Any) -> bool:
    deliveries = await listed
    return bool(deliveries) and all(d["status"] == "failed" for d in deliveries)


async def test_a_rule_deleted_a_device_edited_and_a_platform_key_revoked(
    hooks_up: Up, browser: Browser
) -> None:
    up = hooks_up
    device = await register_device(up, "lamp")
    rule = {
        "name": unique_id("bright"),
        "trigger": {"type": "threshold", "device_id": device, "attribute": "lux", "above": 10},
        "actions": [{"type": "command", "device_id": "demo-light", "action": "turn_off"}],
    }
    stored = await api(up, "POST", "/rules", rule)
    assert stored.status_code == 201, stored.text
    rule_id = stored.json()["id"]
    tab = await signed_in(browser, up)
    page = tab.page

    # The rule: asked first; cancel keeps it; yes deletes it.
    row = page.locator(f'#rules tr[data-rule="{rule_id}"]')
    await row.get_by_role("button", name=f"delete rule {rule['name']}").click()
    await expect(row.get_by_role("group")).to_contain_text(f"delete rule {rule['name']}?")
    await row.get_by_role("button", name=f"cancel: do not delete rule {rule['name']}").click()
    await expect(row.get_by_role("button", name=f"delete rule {rule['name']}")).to_be_focused()
    await row.get_by_role("button", name=f"delete rule {rule['name']}").click()
    await row.get_by_role("button", name=f"yes, delete rule {rule['name']}").click()
    await expect(row).to_have_count(0)
    assert (await api(up, "GET", f"/rules/{rule_id}")).status_code == 404

    # The device: renamed, moved, its report interval and metadata set; refusals in place.
    await (
        page.locator(f'tr[data-device="{device}"]')
        .get_by_role("button", name=f"edit device {device}")
        .click()
    )
    form = page.locator("#device-edit")
    await expect(form.get_by_label("name")).to_be_focused()
    await expect(form.get_by_label("kind")).to_have_value("sensor")
    await form.get_by_label("name").fill("Reading lamp")
    await form.get_by_label("location").select_option("home/living-room")
    await form.get_by_label("report intervals").fill('{"lux": 60}')
    await form.get_by_label("metadata").fill("[1, 2]")
    await form.get_by_label("metadata").press("Enter")
    await expect(page.locator("#edit-metadata-error")).to_contain_text("a JSON object")
    await form.get_by_label("metadata").fill('{"vendor": "acme"}')
    await form.get_by_label("kind").fill("not a kind!")
    await form.get_by_label("kind").press("Enter")
    await expect(page.locator("#edit-kind-error")).to_contain_text("$.kind")
    await expect(form.get_by_label("kind")).to_be_focused()
    await form.get_by_label("kind").fill("sensor")
    await form.get_by_role("button", name="save device").click()
    await expect(form).to_be_hidden()
    await expect(page.locator(f'tr[data-device="{device}"]')).to_contain_text("home/living-room")
    edited = (await api(up, "GET", f"/devices/{device}")).json()
    assert (edited["name"], edited["location"]) == ("Reading lamp", "home/living-room")
    assert (edited["metadata"], edited["report_intervals"]) == ({"vendor": "acme"}, {"lux": 60})

    # A key the platform made for itself: listed as such, revoked after the question.
    key = page.locator("#api-keys tr[data-key]", has_text="demo-devices")
    await expect(key.locator('[data-field="created-by"]')).to_contain_text("platform:launcher")
    await key.get_by_role("button", name="revoke API key demo-devices").click()
    await expect(key.get_by_role("group")).to_contain_text("What uses it stops working")
    await key.get_by_role("button", name="yes, revoke API key demo-devices").click()
    await expect(key).to_have_count(0)
    [revoked] = [k for k in await items(up, "/api-keys") if k["name"] == "demo-devices"]
    assert revoked["revoked_at"] is not None
    assert tab.problems == []
