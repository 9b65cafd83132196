"""Helpers for tests of `libs.consumer` against a real server: a scratch stream, a JSON
decoder, and a consumer run for the length of a block."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from libs.consumer import Consumer, Delivery, Undecodable
from tests.helpers import unique_id


def decode(d: Delivery) -> dict[str, Any]:
    try:
        return json.loads(d.data)  # type: ignore[no-any-return]
    except ValueError as exc:
        raise Undecodable(f"not JSON: {exc}") from exc


@contextlib.asynccontextmanager
async def scratch_stream(js: JetStreamContext, kind: str) -> AsyncIterator[tuple[str, str]]:
    """A stream of its own, `(name, subject prefix)`, deleted after the block; `kind` keeps
    one test file's streams apart from another's."""
    name = unique_id(kind).upper().replace("-", "_")
    prefix = f"{kind.lower()}.{name.lower()}"
    await js.add_stream(StreamConfig(name=name, subjects=[f"{prefix}.>"]))
    yield name, prefix
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(name)


@contextlib.asynccontextmanager
async def running(consumer: Consumer[Any], timeout: float = 10) -> AsyncIterator[None]:
    """The consumer runs, bound to its durable, for the block; stopped after it."""
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await asyncio.wait_for(consumer.bound.wait(), timeout)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout)
