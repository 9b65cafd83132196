"""`python -m services.actors`: the device actors worker."""

from __future__ import annotations

import asyncio

from libs import bus, commands, runtime, subjects
from libs.lease import Lease
from services.actors.presence import scan_forever
from services.actors.store import StateStore
from services.actors.worker import ActorWorker


async def work(p: runtime.Process) -> None:
    worker = ActorWorker(p.nc, StateStore(p.sessions, p.cache), Lease(p.js, "actors"))
    p.ready_when(worker)
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(worker.run(p.stop))
        tasks.create_task(scan_forever(p.js, p.sessions, p.settings.heartbeat_timeout_s, p.stop))
        tasks.create_task(commands.expire_forever(p.sessions, p.stop))


if __name__ == "__main__":
    runtime.serve("actors", work, needs=[(subjects.EVENTS_STREAM, bus.ACTORS_DURABLE)])
