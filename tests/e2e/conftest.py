"""Fixtures of the end-to-end tests, and what the browser tests share: Debian's chromium
driven by Playwright, one `smarthome up` for the whole package (the UI and CLI tests each
make their own users, devices and rules on it), a watched tab, the sign-in form."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect

from libs import embedded_nats
from tests.e2e.up import ADMIN_PASSWORD, Up


@pytest.fixture
def ports() -> tuple[int, int]:
    """Free ports for the gateway's HTTP and the bus."""
    return embedded_nats.free_port(), embedded_nats.free_port()


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
SLOW_S = 60  # the demo's rule holds for 3 s; the first start compiles and migrates
SHORT_TOKEN_S = 6  # the shared platform's access tokens: renewed while a test watches


@pytest.fixture(scope="package")
def chromium() -> Path:
    if not CHROMIUM.exists():
        if os.environ.get("SMARTHOME_REQUIRE_BROWSER"):  # CI installs it: missing is a failure
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium)")
        pytest.skip(f"no browser at {CHROMIUM}: apt-get install chromium to run the UI tests")
    return CHROMIUM


@pytest.fixture(scope="package")
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(chromium), args=FLAGS)
        yield browser
        await browser.close()


@pytest.fixture(autouse=True)
async def closes_its_tabs(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """A test's tabs are closed after it: left open on the shared platform, they would keep
    renewing tokens and holding live streams (20 a user) for the tests that follow."""
    yield
    if "browser" in request.fixturenames:
        browser: Browser = request.getfixturevalue("browser")
        for context in browser.contexts:
            await context.close()


@pytest.fixture(scope="package")
def shared_nats_port() -> int:
    return embedded_nats.free_port()


@pytest.fixture(scope="package")
async def shared_up(
    shared_nats_port: int, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Up]:
    """One platform, with the demo, for every e2e test that does not test the launcher
    itself: started by the first, stopped (cleanly, leaving no process behind) after the
    last e2e test, not at the end of the session (it would load the rest of the run). Its
    access tokens live a few seconds, so that the page has to renew them while a test
    watches. A test leaves it as it found it (the demo's rule enabled, its devices
    connected) and names what it makes with `unique_id`."""
    extra = {
        "SMARTHOME_ACCESS_TOKEN_TTL": str(SHORT_TOKEN_S),
        # The status page shows each process as it last reported: every second, not five.
        "SMARTHOME_STATUS_INTERVAL_S": "1",
    }
    data_dir = tmp_path_factory.mktemp("up")
    up = Up(data_dir, embedded_nats.free_port(), shared_nats_port, extra_env=extra)
    try:
        await up.ready()
        yield up
    finally:
        code, orphans = up.stop()
    assert code == 0, up.stderr.read_text()[-3000:]
    assert orphans == [], [p.cmdline() for p in orphans]


class Watched:
    """A tab, with what went wrong in it: uncaught errors and CSP refusals (which chromium
    reports on the console and nowhere else)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.problems: list[str] = []
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("console", self._console)

    def _console(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            self.problems.append(f"CSP: {message.text}")


async def open_page(browser: Browser, up: Up) -> Watched:
    """A fresh tab (its own sessionStorage) on the UI, showing the sign-in form."""
    context = await browser.new_context()
    tab = Watched(await context.new_page())
    await tab.page.goto(up.api + "/")
    await expect(tab.page.get_by_role("heading", name="Sign in")).to_be_visible()
    return tab


async def sign_in(page: Page, username: str = "admin", password: str = ADMIN_PASSWORD) -> None:
    """As a user does it: type into the labelled fields, press Enter."""
    await page.get_by_label("User name").fill(username)
    await page.get_by_label("Password").fill(password)
    await page.get_by_label("Password").press("Enter")


async def signed_in_as_admin(page: Page) -> None:
    await expect(page.locator("#who")).to_have_text("admin · admin · every home")
    await expect(page.locator("#login")).to_be_hidden()
    await expect(page.locator("#status")).to_have_text("live", timeout=SLOW_S * 1000)
    await expect(page.locator('tr[data-device="demo-light"]')).to_be_visible(timeout=SLOW_S * 1000)
