"""The web UI in a real browser (Debian's chromium, driven by Playwright) on `smarthome up`:
the demo shows live, and a user acts from the page: a command, a refusal, a disconnect, a
rule switched off."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from libs import messages as m
from tests.e2e.up import Up

pytestmark = pytest.mark.e2e

CHROMIUM = Path(os.environ.get("SMARTHOME_CHROMIUM", "/usr/bin/chromium"))
# The flags this machine's chromium needs as root and without a network beyond loopback.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HAVE_CHROMIUM = CHROMIUM.exists()
SLOW_S = 60  # the demo's rule holds for 3 s; the first start compiles and migrates


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        if os.environ.get("SMARTHOME_REQUIRE_BROWSER"):  # CI installs it: missing is a failure
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium)")
        pytest.skip(f"no browser at {CHROMIUM}: apt-get install chromium to run the UI tests")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield browser
        await browser.close()


async def test_the_page_shows_the_demo_live_and_acts_on_it(tmp_path, ports, browser) -> None:  # type: ignore[no-untyped-def]
    up = Up(tmp_path, *ports)
    try:
        await up.ready()
        page = await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(up.api + "/")
        await expect(page.locator("#status")).to_have_text("live", timeout=SLOW_S * 1000)

        light = page.locator('tr[data-device="demo-light"]')
        rule = page.locator('tr[data-rule="demo-light-timeout"]')
        # The demo rule turns the light off, and the page shows it without a reload.
        await expect(rule).to_contain_text("demo-meter power_w > ", timeout=SLOW_S * 1000)
        await _light_is(page, on=False)
        await expect(light.locator('[data-field="state"]')).to_have_text("off")
        await expect(light).to_contain_text("home/living-room")  # the demo's room
        await expect(rule.locator('[data-field="last-run"]')).not_to_have_text("never")
        await expect(page.locator("#audit")).to_contain_text("rule.fired")
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

        # A user turns it on again from the page and follows the command to its end.
        await light.locator('button[data-action="turn_on"]').click()
        command = page.locator("#commands li").first
        await expect(command).to_contain_text("turn_on demo-light")
        await expect(command).to_contain_text("done", timeout=SLOW_S * 1000)
        await _light_is(page, on=True)
        # ... and the rule, still enabled, turns it off again once it held for 3 s.
        await _light_is(page, on=False)

        # A brightness out of range is refused, and the page says which field and why.
        await light.locator('input[data-param="level"]').fill("150")
        await light.locator('button[data-action="set_brightness"]').click()
        await expect(page.locator("#notice")).to_contain_text("params.level")

        # Switched off from the page, the rule no longer turns the light off.
        await rule.locator("button[data-toggle]").click()
        await expect(rule).to_contain_text("disabled")
        assert up.get("/api/v1/rules/demo-light-timeout").json()["enabled"] is False

        # The meter disconnected by an administrator, then connected again.
        await meter.locator('button[data-admin="disconnect"]').click()
        await expect(meter).to_contain_text("disabled")
        assert up.get("/api/v1/devices/demo-meter").json()["enabled"] is False
        await meter.locator('button[data-admin="connect"]').click()
        await expect(meter.locator('button[data-admin="disconnect"]')).to_be_visible()

        # A device nobody registered says hello: it waits on the page until approved.
        await _say_hello(ports[1], "porch-sensor", {"name": "Porch sensor", "kind": "sensor"})
        porch = page.locator('tr[data-device="porch-sensor"]')
        await expect(porch).to_contain_text("pending", timeout=SLOW_S * 1000)
        await porch.locator('button[data-lifecycle="active"]').click()
        await expect(porch.locator("button[data-history]")).to_be_visible()
        assert up.get("/api/v1/devices/porch-sensor").json()["lifecycle"] == "active"
        assert errors == []
    finally:
        code, orphans = up.stop()
    assert code == 0, up.stderr.read_text()[-3000:]
    assert orphans == []


async def _say_hello(nats_port: int, device_id: str, data: dict) -> None:
    nc = await nats.connect(f"nats://127.0.0.1:{nats_port}")
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
