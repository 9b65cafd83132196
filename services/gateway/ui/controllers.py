"""`GET /`: the web UI, one self-contained page (no build step, no external CDN)."""

from __future__ import annotations

from pathlib import Path

from litestar import Controller, get
from litestar.response import File

PAGE = Path(__file__).parent / "index.html"


class UIController(Controller):
    path = "/"
    include_in_schema = False

    @get("/", operation_id="ui", summary="The web UI")
    async def index(self) -> File:
        return File(PAGE, content_disposition_type="inline", media_type="text/html")
