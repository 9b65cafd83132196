"""`/health/live`, `/health/ready` and `/metrics` for the worker services (not the gateway,
which serves them from Litestar). A small asyncio HTTP/1.0 responder: probes need no framework."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

ReadyCheck = Callable[[], Awaitable[str | None]]  # None when ready, else the reason


async def serve(host: str, port: int, ready: ReadyCheck) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            path = line.split(b" ")[1].decode() if line.count(b" ") >= 2 else ""
            status, ctype, body = await _route(path, ready)
            head = (
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


async def _route(path: str, ready: ReadyCheck) -> tuple[str, str, bytes]:
    if path == "/health/live":
        return "200 OK", "application/json", b'{"status":"ok"}'
    if path == "/health/ready":
        reason = await ready()
        if reason is None:
            return "200 OK", "application/json", b'{"status":"ready"}'
        body = {"status": "not ready", "reason": reason}
        return "503 Service Unavailable", "application/json", json.dumps(body).encode()
    if path == "/metrics":
        return "200 OK", CONTENT_TYPE_LATEST, generate_latest()
    return "404 Not Found", "text/plain", b"not found"
