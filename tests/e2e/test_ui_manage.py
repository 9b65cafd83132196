"""The web UI manages what the API manages, in a real browser on `smarthome up`: a rule made
and changed with the form (its dry run and runs shown), a refused rule with the API's field
error next to the field (the form and the JSON editor), a location added under the demo's
home, a device registered and another approved, users added and removed, an API key whose
secret is shown once."""

from __future__ import annotations

import json
import re
import secrets

import httpx
import nats
import pytest
from playwright.async_api import Browser, Page, expect

from libs import messages as m
from libs import subjects
from tests.e2e.conftest import SLOW_S, Watched, open_page, sign_in, signed_in_as_admin
from tests.e2e.up import Up
from tests.helpers import eventually, unique_id

pytestmark = pytest.mark.e2e


def _admin(up: Up, method: str, path: str, body: object = None) -> httpx.Response:
    """A call as the administrator with a token of its own (the shared platform's expire in
    seconds); no answer in time is an AssertionError, which `eventually` retries."""
    headers = {"Authorization": f"Bearer {up.login()}"}
    try:
        return httpx.request(method, up.api + path, json=body, headers=headers, timeout=10)
    except httpx.TransportError as exc:
        raise AssertionError(f"{method} {path}: {exc!r}") from exc


async def _signed_in(browser: Browser, up: Up) -> Watched:
    """An administrator's tab, once the demo's home is defined (the launcher defines it just
    after the gateway is ready)."""
    await eventually(
        lambda: _admin(up, "GET", "/api/v1/locations/home").status_code == 200, timeout=30
    )
    tab = await open_page(browser, up)
    await sign_in(tab.page)
    await signed_in_as_admin(tab.page)
    return tab


async def _open(page: Page, details: str) -> None:
    """Open a collapsed part of the page from the keyboard."""
    summary = page.locator(f"#{details} > summary")
    await summary.focus()
    await summary.press("Enter")
    await expect(page.locator(f"#{details}")).to_have_attribute("open", "")


async def test_a_rule_made_with_the_form_is_listed_changed_and_tried(
    shared_up: Up, browser: Browser
) -> None:
    tab = await _signed_in(browser, shared_up)
    page, form = tab.page, tab.page.locator("#rule-form")
    name = unique_id("too-much-power")

    await _open(page, "rule-editor")
    await expect(form.get_by_label("name", exact=True)).to_be_focused()
    await form.get_by_label("name", exact=True).fill(name)
    await form.get_by_label("device", exact=True).fill("demo-meter")
    await form.get_by_label("attribute").fill("power_w")
    await form.get_by_label("is", exact=True).select_option("above")
    await form.get_by_label("value").fill("100000")
    await form.get_by_label("for (seconds)").fill("30")
    await form.get_by_label("target device").fill("demo-light")
    await form.get_by_label("action").fill("turn_off")
    await form.get_by_label("action").press("Enter")  # submits, as a form does

    row = page.locator("#rules tr[data-rule]", has_text=name)
    await expect(row).to_contain_text("demo-meter power_w > 100000 for 30s")
    stored = next(
        r for r in _admin(shared_up, "GET", "/api/v1/rules").json()["items"] if r["name"] == name
    )
    assert stored["trigger"]["above"] == 100000 and stored["trigger"]["for"] == 30
    [action] = stored["actions"]
    assert (action["device_id"], action["action"]) == ("demo-light", "turn_off")

    # Edited with the same form: the change is stored as a new version.
    await row.get_by_role("button", name=f"edit rule {name}").click()
    await expect(page.locator("#rule-editor-title")).to_have_text(f"edit rule {name}")
    await expect(form.get_by_label("value")).to_have_value("100000")
    await form.get_by_label("value").fill("200000")
    await form.get_by_role("button", name="save changes").click()
    await expect(row).to_contain_text("demo-meter power_w > 200000 for 30s")
    changed = _admin(shared_up, "GET", f"/api/v1/rules/{stored['id']}").json()
    assert changed["version"] == stored["version"] + 1

    # Disabled, then enabled again.
    await row.get_by_role("button", name=f"disable rule {name}").click()
    await expect(row).to_contain_text("disabled")
    await row.get_by_role("button", name=f"enable rule {name}").click()
    await expect(row.get_by_role("button", name=f"disable rule {name}")).to_be_visible()

    # Its dry run over the last day: it never held; nothing is sent.
    await row.get_by_role("button", name=f"dry-run rule {name}").click()
    await expect(page.locator('#rule-detail [data-field="dry-run-summary"]')).to_have_text(
        re.compile(r"^0 firings over \d+ history rows; nothing was sent\.$")
    )

    # The demo's rule fired: its dry run finds that in the history, and its runs list it.
    await eventually(
        lambda: _admin(shared_up, "GET", "/api/v1/rules/demo-light-timeout/runs").json()["items"],
        timeout=SLOW_S,
    )
    demo = page.locator('#rules tr[data-rule="demo-light-timeout"]')

    async def the_dry_run_fires() -> bool:
        await demo.get_by_role("button", name="dry-run rule").click()
        summary = page.locator('#rule-detail [data-field="dry-run-summary"]')
        await expect(summary).to_contain_text("nothing was sent")
        return not (await summary.text_content() or "").startswith("0 firings")

    await eventually(the_dry_run_fires, timeout=SLOW_S)
    await expect(page.locator("#rule-detail .firings li").first).to_contain_text(
        "command turn_off → demo-light"
    )
    await demo.get_by_role("button", name="runs of rule").click()
    runs = page.locator("#rule-detail li[data-run]")
    await expect(runs.filter(has_text="fired").first).to_contain_text("turn_off")
    assert tab.problems == []


async def test_a_refused_rule_shows_the_field_the_api_named_next_to_it(
    shared_up: Up, browser: Browser
) -> None:
    tab = await _signed_in(browser, shared_up)
    page, form = tab.page, tab.page.locator("#rule-form")
    name = unique_id("refused")
    before = len(_admin(shared_up, "GET", "/api/v1/rules").json()["items"])

    await _open(page, "rule-editor")
    await form.get_by_label("name", exact=True).fill(name)
    await form.get_by_label("device", exact=True).fill("demo-meter")
    await form.get_by_label("attribute").fill("power_w")
    await form.get_by_label("value").fill("10")
    await form.get_by_label("target device").fill("demo-light")
    await form.get_by_label("action").fill("explode")  # a light does not
    await form.get_by_role("button", name="save rule").click()

    action = form.get_by_label("action")
    await expect(action).to_have_attribute("aria-invalid", "true")
    await expect(action).to_be_focused()
    await expect(page.locator("#rule-action-error")).to_contain_text("$.actions[0].action")
    await expect(action).to_have_accessible_description(re.compile(r"\$\.actions\[0\]\.action"))
    await expect(form.get_by_label("value")).not_to_have_attribute("aria-invalid", "true")

    # The JSON editor takes over what the form holds; its refusals are shown beside it.
    await form.get_by_label("JSON", exact=True).check()
    editor = form.get_by_label("the rule (JSON")
    assert '"action": "explode"' in await editor.input_value()
    rule = {
        "name": name,
        "trigger": {
            "type": "threshold",
            "device_id": "demo-meter",
            "attribute": "power_w",
            "between": [100000, 200000],
        },
        "actions": [{"type": "command", "device_id": "demo-light", "action": "turn_off"}],
        "mode": "sometimes",
    }
    await editor.fill(_json(rule))
    await form.get_by_role("button", name="save rule").click()
    await expect(page.locator("#rule-json-error")).to_contain_text("$.mode")
    await expect(editor).to_have_attribute("aria-invalid", "true")
    assert len(_admin(shared_up, "GET", "/api/v1/rules").json()["items"]) == before

    # Corrected, a rule the form cannot show (`between`) is stored from the JSON.
    del rule["mode"]
    await editor.fill(_json(rule))
    await form.get_by_role("button", name="save rule").click()
    row = page.locator("#rules tr[data-rule]", has_text=name)
    await expect(row).to_be_visible()
    await row.get_by_role("button", name=f"edit rule {name}").click()
    await expect(form.get_by_label("JSON", exact=True)).to_be_checked()  # reopened where it fits
    assert '"between"' in await editor.input_value()
    assert tab.problems == []


async def test_a_location_added_under_the_demo_home_shows_in_the_tree(
    shared_up: Up, browser: Browser
) -> None:
    tab = await _signed_in(browser, shared_up)
    page, form = tab.page, tab.page.locator("#location-form")
    home = page.locator('#locations [data-location="home"]')
    await expect(home).to_be_visible()
    room = unique_id("attic")

    await _open(page, "location-add")
    await form.get_by_label("in", exact=True).select_option("home")
    await form.get_by_label("kind").select_option("room")
    await form.get_by_label("name").fill("Attic")
    await form.get_by_label("id", exact=True).fill(room)
    await form.get_by_label("id", exact=True).press("Enter")

    added = home.locator(f'ul [data-location="{room}"]')
    await expect(added).to_contain_text("Attic")
    await expect(added).to_have_attribute("data-path", f"home/{room}")
    assert _admin(shared_up, "GET", f"/api/v1/locations/{room}").json()["parent_id"] == "home"

    # A home inside a home is refused: the page says so at the field the API named.
    await form.get_by_label("kind").select_option("home")
    await form.get_by_label("name").fill("Nested home")
    await form.get_by_role("button", name="add").click()
    await expect(page.locator("#location-parent-error")).to_contain_text("$.parent_id")
    assert tab.problems == []


async def test_a_device_registered_on_the_page_and_one_approved(
    shared_up: Up, shared_nats_port: int, browser: Browser
) -> None:
    tab = await _signed_in(browser, shared_up)
    page, form = tab.page, tab.page.locator("#device-form")
    device = unique_id("window")

    await _open(page, "device-register")
    await form.get_by_label("id", exact=True).fill(device)
    await form.get_by_label("name").fill("Window contact")
    await form.get_by_label("kind").fill("sensor")
    await form.get_by_label("location").select_option("home/living-room")
    await form.get_by_role("button", name="register").click()

    # Its bus credentials, shown once.
    credentials = page.locator("#device-credentials")
    await expect(credentials.locator('[data-secret="username"]')).not_to_be_empty()
    secret = await credentials.locator('[data-secret="password"]').text_content()
    assert secret
    row = page.locator(f'tr[data-device="{device}"]')
    await expect(row).to_contain_text("home/living-room", timeout=SLOW_S * 1000)
    await credentials.get_by_role("button", name="hide").click()
    await expect(credentials).to_be_hidden()
    assert secret not in await page.content()

    # Decommissioned from its row.
    await row.get_by_role("button", name=f"decommission {device}").click()
    await expect(row).to_contain_text("decommissioned")
    assert _admin(shared_up, "GET", f"/api/v1/devices/{device}").json()["lifecycle"] == (
        "decommissioned"
    )

    # A device nobody registered says hello: approved from the page.
    stranger = unique_id("porch")
    await _say_hello(shared_up, shared_nats_port, stranger)
    waiting = page.locator(f'tr[data-device="{stranger}"]')
    await expect(waiting).to_contain_text("pending", timeout=SLOW_S * 1000)
    await waiting.get_by_role("button", name=f"approve {stranger}").click()
    await expect(waiting.locator("button[data-history]")).to_be_visible()
    assert _admin(shared_up, "GET", f"/api/v1/devices/{stranger}").json()["lifecycle"] == "active"
    assert tab.problems == []


async def test_an_admin_adds_and_removes_a_user(shared_up: Up, browser: Browser) -> None:
    tab = await _signed_in(browser, shared_up)
    page, form = tab.page, tab.page.locator("#user-form")
    name = unique_id("guest")

    await form.get_by_label("new user's login").fill(name)
    await form.get_by_label("initial sign-in secret").fill("short")
    await form.get_by_label("homes").fill("home")
    await form.get_by_role("button", name="add user").click()
    await expect(page.locator("#user-secret-error")).to_contain_text("$.password")

    await form.get_by_label("initial sign-in secret").fill("a-long-enough-secret")
    await form.get_by_role("button", name="add user").click()
    row = page.locator(f'#users tr[data-user="{name}"]')
    await expect(row).to_contain_text("resident")
    shared_up.login(name, "a-long-enough-secret")  # signs in

    await row.get_by_role("button", name=f"remove user {name}").click()
    await expect(row).to_have_count(0)
    refused = httpx.post(
        shared_up.api + "/api/v1/auth/token",
        data={"username": name, "password": "a-long-enough-secret"},
        timeout=10,
    )
    assert refused.status_code == 401, refused.text
    assert tab.problems == []


async def test_an_api_key_made_on_the_page_shows_its_secret_once(
    shared_up: Up, browser: Browser
) -> None:
    tab = await _signed_in(browser, shared_up)
    page, form = tab.page, tab.page.locator("#key-form")
    name = unique_id("dashboard")

    await form.get_by_label("key name").fill(name)
    await form.get_by_label("key role").select_option("resident")
    await form.get_by_label("key homes").fill("home")
    await form.get_by_label("key homes").press("Enter")

    shown = page.locator('#key-secret [data-secret="key"]')
    await expect(shown).not_to_be_empty()
    key = await shown.text_content()
    assert key
    me = httpx.get(
        shared_up.api + "/api/v1/me", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert me.status_code == 200 and me.json()["role"] == "resident", me.text
    row = page.locator("#api-keys tr", has_text=name)
    await expect(row).to_contain_text("resident")

    # Once: hidden, or after a reload, the secret is nowhere on the page.
    await page.locator("#key-secret").get_by_role("button", name="hide").click()
    await expect(page.locator("#key-secret")).to_be_hidden()
    await page.reload()
    await signed_in_as_admin(page)
    await expect(row).to_be_visible()
    assert key not in await page.content()

    await row.get_by_role("button", name=f"revoke API key {name}").click()
    await expect(row).to_have_count(0)

    async def refused() -> bool:
        answer = httpx.get(
            shared_up.api + "/api/v1/me", headers={"Authorization": f"Bearer {key}"}, timeout=10
        )
        return answer.status_code == 401

    await eventually(refused, timeout=10)
    assert tab.problems == []


def _json(value: object) -> str:
    return json.dumps(value, indent=2)


async def _say_hello(up: Up, nats_port: int, device_id: str) -> None:
    """A device nobody registered, holding an installer's provisioning token: the bus lets
    it say hello (and nothing else) under the id it claims."""
    token = _admin(up, "POST", "/api/v1/provisioning-tokens", {"home": "home"}).json()["token"]
    nc = await nats.connect(
        f"nats://127.0.0.1:{nats_port}",
        user=device_id,
        password=token,
        name=secrets.token_hex(16),
        inbox_prefix=subjects.inbox_prefix("claim", device_id),
    )
    try:
        event = m.make_event(device_id, "hello", {"name": "Porch sensor", "kind": "sensor"})
        await nc.jetstream().publish(event.nats_subject, m.encode(event))
    finally:
        await nc.close()
