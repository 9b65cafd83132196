"""`python -m services.actors`: the device actors worker (a share of the partitions)."""

from __future__ import annotations

import asyncio

from libs import bus, commands, runtime, subjects
from libs.settings import Settings
from services.actors.partitions import ActorPartitions
from services.actors.presence import scan_forever


async def work(p: runtime.Process) -> None:
    timeout_s = p.settings.heartbeat_timeout_s
    partitions = ActorPartitions(
        p.nc, p.sessions, p.cache, p.settings.actor_partitions, heartbeat_timeout_s=timeout_s
    )
    p.ready_when(partitions)
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(partitions.run(p.stop))
        tasks.create_task(scan_forever(p.js, p.sessions, partitions, timeout_s, p.stop))
        tasks.create_task(commands.expire_forever(p.sessions, p.stop))


def needs(settings: Settings) -> list[tuple[str, str | None]]:
    """Every partition's consumer: the gateway provisions them all at once."""
    durables = (bus.actors_durable(i) for i in range(settings.actor_partitions))
    return [(subjects.EVENTS_STREAM, d) for d in durables]


if __name__ == "__main__":
    runtime.serve("actors", work, needs=needs)
