"""The web UI in a real browser (Debian's chromium, driven by Playwright) on `smarthome up`:
a user signs in through the page's form, the demo shows live, and the user acts from the page:
a command, a refusal, a disconnect, a rule switched off. The page keeps its sign-in over a
reload, signs out, says why a sign-in is refused, and runs under the gateway's CSP."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import httpx
import nats
import pytest
from playwright.async_api import Browser, Page, Route, expect
from prometheus_client.parser import text_string_to_metric_families

from libs import bus, bus_grants, subjects
from libs import messages as m
from services.launcher.cli import BUS_DIR, SERVICES
from tests.e2e.conftest import (
    SHORT_TOKEN_S,
    SLOW_S,
    open_page,
    sign_in,
    signed_in_as_admin,
)
from tests.e2e.up import Up
from tests.helpers import eventually, unique_id

pytestmark = pytest.mark.e2e

SCREENSHOT = Path(__file__).resolve().parents[2] / "ops" / "ui.png"  # shown by the README
STATUS_SCREENSHOT = SCREENSHOT.with_name("status.png")  # the status page, also in the README
REFRESH_KEY = "smarthome.refresh_token"  # where the page keeps it (sessionStorage)


async def make_resident(up: Up, password: str) -> str:
    """A resident of the demo's home; its name."""
    name = unique_id("resident")
    headers = up.headers
    # The launcher defines the demo's home just after the gateway is ready.
    await eventually(
        lambda: (
            httpx.get(up.api + "/api/v1/locations/home", headers=headers, timeout=10).status_code
            == 200
        ),
        timeout=30,
    )
    created = httpx.post(
        up.api + "/api/v1/users",
        json={"username": name, "password": password, "role": "resident", "homes": ["home"]},
        headers=headers,
        timeout=10,
    )
    assert created.status_code == 201, created.text
    return name


async def stored_refresh_token(page: Page) -> str | None:
    token: str | None = await page.evaluate(f"sessionStorage.getItem({REFRESH_KEY!r})")
    return token


async def _renewed(page: Page, before: str | None) -> bool:
    return await stored_refresh_token(page) not in (before, None)


async def test_the_page_shows_the_demo_live_and_acts_on_it(
    shared_up: Up, shared_nats_port: int, browser: Browser
) -> None:
    up = shared_up
    tab = await open_page(browser, up)
    page = tab.page
    await sign_in(page)
    await signed_in_as_admin(page)

    light = page.locator('tr[data-device="demo-light"]')
    rule = page.locator('tr[data-rule="demo-light-timeout"]')
    # The demo rule turns the light off, and the page shows it without a reload.
    await expect(rule).to_contain_text("demo-meter power_w > ", timeout=SLOW_S * 1000)
    await _light_is(page, on=False)
    await expect(light.locator('[data-field="state"]')).to_have_text("off")
    await expect(light).to_contain_text("home/living-room")  # the demo's room
    await expect(rule.locator('[data-field="last-run"]')).not_to_have_text("never")
    # The audit is the recorder's record, written when it gets to it: on a busy machine it
    # yields the CPU to the live path (SMARTHOME_BACKGROUND_NICE), seconds behind.
    await expect(page.locator("#audit")).to_contain_text("rule.fired", timeout=SLOW_S * 1000)
    # The meter reads 0 W: the episode ends, and the meter's mark clears.
    meter = page.locator('tr[data-device="demo-meter"]')
    await expect(meter.locator('[data-field="attributes"]')).to_contain_text(
        "power_w=0", timeout=SLOW_S * 1000
    )
    await expect(meter.locator('[data-field="state"]')).to_have_text("off")
    # Its recorded power, drawn: up while the light was on, down since.
    await meter.locator("button[data-history]").click()
    power = page.locator('#history [data-chart="power_w (last hour)"]')
    await expect(power).to_contain_text("min 0 · max 60", timeout=SLOW_S * 1000)
    if os.environ.get("SMARTHOME_UI_SCREENSHOT"):  # refresh the README's picture
        await page.screenshot(path=SCREENSHOT, full_page=True)

    # A user turns it on again from the page and follows the command to its end.
    await light.locator('button[data-action="turn_on"]').click()
    command = page.locator("#commands li").first
    await expect(command).to_contain_text("turn_on demo-light")
    await expect(command).to_contain_text("done", timeout=SLOW_S * 1000)
    await _light_is(page, on=True)
    # The audit log names who sent it: the user signed in on this page.
    await expect(page.locator("#audit")).to_contain_text("user:admin", timeout=SLOW_S * 1000)
    # ... and the rule, still enabled, turns it off again once it held for 3 s.
    await _light_is(page, on=False)

    # A brightness out of range is refused, and the page says which field and why.
    await light.locator('input[data-param="level"]').fill("150")
    await light.locator('button[data-action="set_brightness"]').click()
    await expect(page.locator("#notice")).to_contain_text("params.level")

    # Switched off from the page, the rule no longer turns the light off; and on again (the
    # platform is shared: left as found).
    await rule.locator("button[data-toggle]").click()
    await expect(rule).to_contain_text("disabled")
    assert up.get("/api/v1/rules/demo-light-timeout").json()["enabled"] is False
    await rule.locator("button[data-toggle]").click()
    await expect(rule).not_to_contain_text("disabled")
    assert up.get("/api/v1/rules/demo-light-timeout").json()["enabled"] is True

    # The meter disconnected by an administrator, then connected again.
    await meter.locator('button[data-admin="disconnect"]').click()
    await expect(meter).to_contain_text("disabled")
    assert up.get("/api/v1/devices/demo-meter").json()["enabled"] is False
    await meter.locator('button[data-admin="connect"]').click()
    await expect(meter.locator('button[data-admin="disconnect"]')).to_be_visible()

    # A device nobody registered says hello: it waits on the page until approved.
    stranger = unique_id("porch-sensor")
    await _say_hello(up, shared_nats_port, stranger, {"name": "Porch sensor", "kind": "sensor"})
    porch = page.locator(f'tr[data-device="{stranger}"]')
    await expect(porch).to_contain_text("pending", timeout=SLOW_S * 1000)
    await porch.locator('button[data-lifecycle="active"]').click()
    await expect(porch.locator("button[data-history]")).to_be_visible()
    assert up.get(f"/api/v1/devices/{stranger}").json()["lifecycle"] == "active"
    assert tab.problems == []


async def test_the_rules_table_shows_a_run_the_recorder_has_not_written_yet(
    shared_up: Up, browser: Browser
) -> None:
    """The recorder writes a rule's runs when it gets to them (on a busy machine with
    Postgres it yields the CPU to the live path: seconds behind): the rules table takes a
    rule's last run from its live fired fact too. Here the page is kept from seeing the
    record move (its `/runs` answer stays as it was), as a recorder far behind would."""
    up = shared_up
    tab = await open_page(browser, up)
    page = tab.page
    await sign_in(page)
    await signed_in_as_admin(page)
    last_run = page.locator('tr[data-rule="demo-light-timeout"] [data-field="last-run"]')
    await expect(last_run).not_to_have_text("never", timeout=SLOW_S * 1000)
    await _light_is(page, on=False)
    # The episode ends once the meter reads 0 W: the rule fires again on the next one.
    meter = page.locator('tr[data-device="demo-meter"] [data-field="attributes"]')
    await expect(meter).to_contain_text("power_w=0", timeout=SLOW_S * 1000)
    shown = await last_run.text_content()
    recorded = _recorded_runs(up, "demo-light-timeout")

    async def as_recorded(route: Route) -> None:
        await route.fulfill(json={"items": recorded, "next_cursor": None})

    await page.route("**/api/v1/rules/demo-light-timeout/runs*", as_recorded)
    await page.locator('tr[data-device="demo-light"] button[data-action="turn_on"]').click()
    await _light_is(page, on=True)
    await _light_is(page, on=False)  # the rule held for 3 s and turned it off
    # Newer than the record: it fired (and, once the meter read 0 W, cleared) just now.
    await expect(last_run).not_to_have_text(shown or "")
    await expect(last_run).to_have_text(re.compile(r"^(fired|cleared) "))
    await page.unroute("**/api/v1/rules/demo-light-timeout/runs*")
    # ... a run the recorder writes too.
    await eventually(
        lambda: len(_recorded_runs(up, "demo-light-timeout")) > len(recorded), timeout=SLOW_S
    )
    assert tab.problems == []


def _recorded_runs(up: Up, rule_id: str) -> list[dict]:
    """Every run of the rule the recorder has written, oldest first."""
    runs: list[dict] = []
    cursor = None
    while True:
        params = {"limit": 500} | ({"cursor": cursor} if cursor else {})
        answer = up.get(f"/api/v1/rules/{rule_id}/runs", **params)
        assert answer.status_code == 200, answer.text
        runs += answer.json()["items"]
        if not (cursor := answer.json()["next_cursor"]):
            return runs


async def test_a_refused_sign_in_shows_the_reason_in_the_form(
    shared_up: Up, browser: Browser
) -> None:
    name = await make_resident(shared_up, "right-password")
    tab = await open_page(browser, shared_up)
    page, error = tab.page, tab.page.locator("#login-error")

    await sign_in(page, name, "wrong-password")
    await expect(error).to_have_text("wrong user name or password")
    await expect(page.locator("#app")).to_be_hidden()
    await expect(page.get_by_label("Password")).to_be_focused()  # ready for another try

    for _ in range(4):  # the rest of the minute's tries, spent elsewhere
        tried = httpx.post(
            shared_up.api + "/api/v1/auth/token",
            data={"username": name, "password": "wrong-password"},
            timeout=10,
        )
        assert tried.status_code == 401, tried.text
    await sign_in(page, name, "right-password")
    await expect(error).to_contain_text("too many failed sign-ins")
    await expect(error).to_contain_text("try again in")
    await expect(page.locator("#app")).to_be_hidden()
    assert tab.problems == []


async def test_the_page_keeps_its_sign_in_over_a_reload_until_signed_out(
    shared_up: Up, browser: Browser
) -> None:
    tab = await open_page(browser, shared_up)
    page = tab.page
    await sign_in(page)
    await signed_in_as_admin(page)
    assert await stored_refresh_token(page)

    await page.reload()
    await signed_in_as_admin(page)  # without the form: the tab's refresh token signed it in

    # Access tokens live a few seconds here: the page renews them before they expire ...
    # (polled from here: `wait_for_function` evaluates a string, which this CSP forbids)
    for _ in range(3):
        kept = await stored_refresh_token(page)
        await eventually(
            lambda kept=kept: _renewed(page, kept), timeout=SHORT_TOKEN_S * 2, interval=0.2
        )
    # ... so that, long after the first one expired, what the user does still works.
    light = page.locator('tr[data-device="demo-light"]')
    await light.locator('button[data-action="turn_on"]').click()
    await expect(page.locator("#commands li").first).to_contain_text("done", timeout=SLOW_S * 1000)

    last = await stored_refresh_token(page)
    await page.get_by_role("button", name="sign out").click()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await expect(page.locator("#who")).to_be_hidden()
    assert await stored_refresh_token(page) is None
    revoked = httpx.post(
        shared_up.api + "/api/v1/auth/refresh", json={"refresh_token": last}, timeout=10
    )
    assert revoked.status_code == 401, revoked.text
    await page.reload()  # and a reload asks for a sign-in again
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert tab.problems == []


async def test_a_resident_sees_only_the_controls_its_role_may_use(
    shared_up: Up, browser: Browser
) -> None:
    name = await make_resident(shared_up, "resident-password")
    tab = await open_page(browser, shared_up)
    page = tab.page

    await sign_in(page, name, "resident-password")

    await expect(page.locator("#who")).to_have_text(f"{name} · resident · home")
    light = page.locator('tr[data-device="demo-light"]')
    await expect(light.locator('button[data-action="turn_on"]')).to_be_visible(
        timeout=SLOW_S * 1000
    )
    await expect(light.locator("button[data-history]")).to_be_visible()
    await expect(light.locator("button[data-admin]")).to_have_count(0)  # an installer's
    await expect(page.get_by_role("button", name="API reference")).to_be_hidden()
    await expect(page.locator("#status")).to_have_text("live")
    assert tab.problems == []


async def test_the_page_runs_under_the_csp_without_a_violation(
    shared_up: Up, browser: Browser
) -> None:
    tab = await open_page(browser, shared_up)
    page = tab.page
    response = await page.goto(shared_up.api + "/")
    assert response is not None
    assert "default-src 'self'" in response.headers["content-security-policy"]

    await sign_in(page)
    await signed_in_as_admin(page)
    meter = page.locator('tr[data-device="demo-meter"]')
    await meter.locator("button[data-history]").click()  # the charts: SVG drawn by script
    await expect(page.locator("#history svg").first).to_be_visible(timeout=SLOW_S * 1000)
    await expect(page.locator("#audit li").first).to_be_visible(timeout=SLOW_S * 1000)
    async with page.expect_download() as download:  # fetched with the token, saved as a file
        await page.get_by_role("button", name="API reference").click()
    assert (await download.value).suggested_filename == "openapi.json"
    assert tab.problems == []

    # The watch sees a violation when there is one: an inline style, refused by this CSP.
    async with page.expect_console_message(lambda m: "Content Security Policy" in m.text):
        await page.evaluate(
            "document.body.insertAdjacentHTML('beforeend', '<p style=\"color: red\">x</p>')"
        )
    assert len(tab.problems) == 1 and "style" in tab.problems[0], tab.problems


async def _say_hello(up: Up, nats_port: int, device_id: str, data: dict) -> None:
    """A device nobody registered, holding an installer's provisioning token: the bus lets
    it say hello (and nothing else) under the id it claims."""
    token = up.post("/api/v1/provisioning-tokens", {"home": "home"}).json()["token"]
    nc = await nats.connect(
        f"nats://127.0.0.1:{nats_port}",
        user=device_id,
        password=token,
        name=secrets.token_hex(16),
        inbox_prefix=subjects.inbox_prefix("claim", device_id),  # the only one it may read
    )
    try:
        event = m.make_event(device_id, "hello", data)
        await nc.jetstream().publish(event.nats_subject, m.encode(event))
    finally:
        await nc.close()


async def _light_is(page: Page, on: bool) -> None:
    attributes = page.locator('tr[data-device="demo-light"] [data-field="attributes"]')
    await expect(attributes).to_contain_text(
        f"on={'true' if on else 'false'}", timeout=SLOW_S * 1000
    )


async def test_the_status_page_shows_the_platform_and_acts_on_dead_letters(
    shared_up: Up, shared_nats_port: int, browser: Browser
) -> None:
    up, bus_url = shared_up, f"nats://127.0.0.1:{shared_nats_port}"
    # A registered device sends an event nobody can read: the actors give up on it.
    device = unique_id("broken")
    created = _admin(up, "POST", "/api/v1/devices", {"id": device, "name": "B", "kind": "sensor"})
    assert created.status_code == 201, created.text
    credentials = created.json()["credentials"]
    malformed = subjects.device_events(device, "telemetry")
    await _publish_as_device(bus_url, device, credentials["password"], malformed, b'{"broken json')
    # ... and a good event they gave up on while something was wrong (fixed since).
    good = m.make_event(device, "telemetry", {"power_w": 42.0})
    await _dead_letter_as_actors(bus_url, up.stderr.parent, good)

    tab = await open_page(browser, up)
    page = tab.page
    await sign_in(page)
    await signed_in_as_admin(page)
    await page.get_by_role("link", name="status").click()
    await expect(page.get_by_role("heading", name="Platform status")).to_be_focused()

    # Every process of `smarthome up` is listed, ready.
    for name in SERVICES:
        row = page.locator(f'#services tr[data-service="{name}"]')
        await expect(row.locator('[data-field="state"]')).to_have_text(
            "ready", timeout=SLOW_S * 1000
        )
    await expect(page.locator('[data-tile="services"] dd')).to_have_text(
        f"{len(SERVICES)} / {len(SERVICES)}"
    )
    # Each consumer's lag, as the processes' own /metrics show it.
    await expect(page.locator("#lag tr[data-consumer]").first).to_be_visible()
    # A 503 (the bus too slow to read every status now) is asked again.
    answer = await eventually(
        lambda: (r := _admin(up, "GET", "/api/v1/system/services")).status_code == 200 and r
    )
    listed = answer.json()["items"]
    shown = {
        (await r.get_attribute("data-stream"), await r.get_attribute("data-consumer"))
        for r in await page.locator("#lag tr[data-consumer]").all()
    }
    reported = {(c["stream"], c["consumer"]) for s in listed for c in s["consumers"]}
    assert shown == reported and shown, (shown, reported)
    assert reported == await _consumers_in_metrics(up, listed)
    await expect(page.locator('[data-tile="online"] dd')).not_to_have_text("0")
    # The devices by presence, as the actors' gauge counts them.
    actors_metrics = next(s["metrics_url"] for s in listed if s["name"] == "actors")

    async def same_devices_as_the_gauge() -> bool:
        await page.get_by_role("button", name="refresh", exact=True).click()
        gauge = _devices_in_metrics(actors_metrics)
        for presence in ("online", "offline", "stale"):
            shown = await page.locator(f'[data-tile="{presence}"] dd').text_content()
            assert shown == str(gauge[presence]), (presence, shown, gauge)
        return True

    await eventually(same_devices_as_the_gauge, timeout=30)

    # Both dead letters, with their reasons.
    letters = page.locator("#deadletters tr[data-deadletter]")
    broken = letters.filter(has_text="invalid event").filter(has_text=malformed)
    fixed = letters.filter(has_text="database was down")
    await expect(broken).to_have_count(1, timeout=SLOW_S * 1000)
    await expect(fixed).to_have_count(1)
    await expect(page.locator('[data-tile="deadletters"] dd')).not_to_have_text("0")
    if os.environ.get("SMARTHOME_UI_SCREENSHOT"):  # refresh the README's picture
        await page.screenshot(path=STATUS_SCREENSHOT, full_page=True)

    # Redrive of the fixed one: applied, and gone from the list.
    await fixed.get_by_role("button", name="Redrive").click()
    await expect(fixed).to_have_count(0)
    await expect(page.locator("#notice")).to_contain_text(f"sent back to {good.nats_subject}")
    await eventually(
        lambda: (
            _admin(up, "GET", f"/api/v1/devices/{device}").json()["attributes"].get("power_w")
            == 42.0
        )
    )

    # A redrive the API refuses (someone else sent it back first): the reason, in place.
    await page.get_by_label("refresh every 5 s").uncheck()
    seq = await broken.first.get_attribute("data-deadletter")
    assert _admin(up, "POST", f"/api/v1/deadletters/{seq}/redrive").status_code == 200
    await broken.get_by_role("button", name="Redrive").click()
    problem = page.locator(f'tr[data-deadletter="{seq}"] [data-field="problem"]')
    await expect(problem).to_contain_text(f"no dead letter has sequence {seq}")
    await page.get_by_role("button", name=f"dismiss the refusal of dead letter {seq}").click()
    await expect(page.locator(f'tr[data-deadletter="{seq}"]')).to_have_count(0)

    # The audit log's chain, verified from its view.
    await page.get_by_role("link", name="home").click()
    await page.get_by_role("button", name="verify").click()
    await expect(page.locator("#audit-verdict")).to_contain_text("ok: ", timeout=SLOW_S * 1000)
    assert tab.problems == []


async def _publish_as_device(
    bus_url: str, device_id: str, password: str, subject: str, data: bytes
) -> None:
    nc = await nats.connect(
        bus_url,
        user=device_id,
        password=password,
        inbox_prefix=subjects.device_inbox(device_id),
    )
    try:
        await nc.jetstream().publish(subject, data)
    finally:
        await nc.close()


async def _dead_letter_as_actors(bus_url: str, data_dir: Path, event: m.CloudEvent) -> None:
    """What the actors do with an event they cannot apply now (as `bus.dead_letter` does),
    under their bus identity (the launcher keeps the services' passwords in the data dir)."""
    passwords = bus_grants.ensure_service_passwords(data_dir / BUS_DIR)
    nc = await bus.connect(bus_url, "ui-test", "actors", passwords["actors"].password)
    try:
        origin = ("EVENTS", 10**9 + secrets.randbelow(10**6))
        await bus.dead_letter_stored(
            nc.jetstream(),
            event.nats_subject,
            m.encode(event),
            origin,
            "database was down",
            "actors-0",
        )
    finally:
        await nc.close()


async def _consumers_in_metrics(up: Up, services: list[dict]) -> set[tuple[str, str]]:
    """The (stream, consumer) pairs of the lag gauge on every process's /metrics."""
    found: set[tuple[str, str]] = set()
    for service in services:
        headers = up.headers if service["name"] == "gateway" else {}
        page = httpx.get(service["metrics_url"], headers=headers, timeout=10)
        assert page.status_code == 200, (service["name"], page.status_code)
        for family in text_string_to_metric_families(page.text):
            if family.name == "smarthome_consumer_pending_messages":
                found |= {(s.labels["stream"], s.labels["consumer"]) for s in family.samples}
    return found


def _devices_in_metrics(url: str) -> dict[str, int]:
    """`smarthome_devices` summed over lifecycles, by presence."""
    page = httpx.get(url, timeout=10)
    assert page.status_code == 200, page.status_code
    counts = {"online": 0, "offline": 0, "stale": 0}
    for family in text_string_to_metric_families(page.text):
        if family.name == "smarthome_devices":
            for sample in family.samples:
                counts[sample.labels["connection"]] += int(sample.value)
    return counts


def _admin(up: Up, method: str, path: str, body: object = None) -> httpx.Response:
    """A call as the administrator (`Up` renews its token before the shared platform's short
    ones expire). No answer in time is an AssertionError, which `eventually` retries."""
    try:
        return httpx.request(method, up.api + path, json=body, headers=up.headers, timeout=10)
    except httpx.TransportError as exc:
        raise AssertionError(f"{method} {path}: {exc!r}") from exc
