"""The web UI's files: served without a token, with their media types, and a page the CSP
lets run (nothing inline: no script body, no style element or attribute, no `on…=` handler)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
from litestar.testing import AsyncTestClient

from libs.settings import Settings
from services.gateway.app import create_app


@pytest.fixture(scope="module")
async def anonymous(settings: Settings) -> AsyncIterator[AsyncTestClient]:
    async with AsyncTestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize(
    ("path", "media_type"),
    [
        ("/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/session.js", "text/javascript"),
        ("/ui/dom.js", "text/javascript"),
        ("/ui/status.js", "text/javascript"),
        ("/ui/deadletters.js", "text/javascript"),
        ("/ui/forms.js", "text/javascript"),
        ("/ui/rules.js", "text/javascript"),
        ("/ui/locations.js", "text/javascript"),
        ("/ui/devices.js", "text/javascript"),
        ("/ui/admin.js", "text/javascript"),
        ("/ui/hooks.js", "text/javascript"),
        ("/ui/channels.js", "text/javascript"),
        ("/ui/deliveries.js", "text/javascript"),
        ("/ui/notifications.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
        ("/ui/icon.svg", "image/svg+xml"),
    ],
)
async def test_the_ui_is_served_without_signing_in(
    anonymous: AsyncTestClient, path: str, media_type: str
) -> None:
    answer = await anonymous.get(path)

    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].split(";")[0] == media_type
    policy = answer.headers["content-security-policy"]
    assert "default-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert answer.headers["x-content-type-options"] == "nosniff"


async def test_nothing_else_is_served_from_the_ui_directory(anonymous: AsyncTestClient) -> None:
    for name in ("controllers.py", "__init__.py", "index.html", "..%2Fapp.py"):
        assert (await anonymous.get(f"/ui/{name}")).status_code == 404, name


async def test_the_page_has_nothing_inline_the_csp_would_block(
    anonymous: AsyncTestClient,
) -> None:
    page = (await anonymous.get("/")).text

    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", page, re.S | re.I)
    assert scripts, "the page loads its script"
    assert all("src=" in attrs and not body.strip() for attrs, body in scripts), scripts
    assert not re.search(r"<style\b", page, re.I)
    assert " style=" not in page.lower()
    assert not re.search(r"\son[a-z]+\s*=", page, re.I), "inline event handler"
    assert not re.search(r"javascript:", page, re.I)
