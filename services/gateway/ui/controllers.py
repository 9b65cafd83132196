"""`GET /` and `/ui/*`: the web UI, a page with its script and style beside it (no build
step, no external CDN; nothing inline, so that the CSP can forbid inline script and style)."""

from __future__ import annotations

from pathlib import Path

from litestar import Controller, get
from litestar.params import FromPath
from litestar.response import File

from libs.errors import NotFound

HERE = Path(__file__).parent
PAGE = HERE / "index.html"
# What /ui/ serves, by name: nothing else in this directory is reachable.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "session.js": "text/javascript; charset=utf-8",
    "dom.js": "text/javascript; charset=utf-8",
    "status.js": "text/javascript; charset=utf-8",
    "deadletters.js": "text/javascript; charset=utf-8",
    "forms.js": "text/javascript; charset=utf-8",
    "rules.js": "text/javascript; charset=utf-8",
    "locations.js": "text/javascript; charset=utf-8",
    "devices.js": "text/javascript; charset=utf-8",
    "admin.js": "text/javascript; charset=utf-8",
    "deliveries.js": "text/javascript; charset=utf-8",
    "hooks.js": "text/javascript; charset=utf-8",
    "channels.js": "text/javascript; charset=utf-8",
    "notifications.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
# Revalidated on every load: an upgraded gateway's page never runs with a stale script.
NO_CACHE = {"cache-control": "no-cache"}


class UIController(Controller):
    path = "/"
    include_in_schema = False

    @get("/", operation_id="ui", summary="The web UI")
    async def index(self) -> File:
        return File(
            PAGE,
            content_disposition_type="inline",
            media_type="text/html; charset=utf-8",
            headers=NO_CACHE,
        )

    @get("/ui/{name:str}", operation_id="uiAsset", summary="The web UI's script and style")
    async def asset(self, name: FromPath[str]) -> File:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise NotFound(f"no UI file named {name!r}")
        return File(
            HERE / name, content_disposition_type="inline", media_type=media_type, headers=NO_CACHE
        )
