"""Resilience: kill -9 the actors mid-stream; nothing lost, nothing applied twice.

Its own module: one actors process at a time shares the durable consumer.
"""

from __future__ import annotations

import msgspec

from libs import bus
from libs import messages as m
from tests.helpers import eventually, unique_id
from tests.integration.test_actors import register, states
from tests.processes import Service


async def test_killed_actor_applies_every_event_once(service_env, data_dir, js, sessions) -> None:  # type: ignore[no-untyped-def]
    devices = [unique_id("kill") for _ in range(20)]
    per_device = 100
    await register(sessions, *devices)
    worker = Service("services.actors", service_env, data_dir).start()
    try:
        futures = []
        for n in range(per_device):
            for device in devices:
                event = m.make_event(device, "telemetry", {"n": n})
                futures.append(
                    await js.publish_async(
                        event.nats_subject,
                        msgspec.json.encode(event),
                        headers={bus.MSG_ID: event.id},
                    )
                )
        for f in futures:
            await f

        async def applied_some() -> int:
            total = sum(s.version for s in (await states(sessions, devices)).values())
            return total if total >= 200 else 0

        await eventually(applied_some, timeout=30)
        worker.kill9()
        worker.start()

        async def all_applied():  # type: ignore[no-untyped-def]
            found = await states(sessions, devices)
            done = len(found) == 20 and all(s.version >= per_device for s in found.values())
            return found if done else None

        final = await eventually(all_applied, timeout=60)
    finally:
        code = worker.stop()
    assert code == 0, worker.tail()
    assert {d: s.version for d, s in final.items()} == dict.fromkeys(devices, per_device)
    assert all(s.attributes == {"n": per_device - 1} for s in final.values())
