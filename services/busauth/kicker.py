"""Close the connections of revoked identities, within seconds of the fact.

The server keeps an admitted connection until its user JWT expires; revoking credentials
must not wait that long. The facts that revoke (a device rejected, decommissioned or
deleted; credentials rotated; a bridge's devices changed) arrive on the durable consumer
`busauth`; for each identity the kicker asks every server for its connections opened
before the fact (`$SYS.REQ.SERVER.PING.CONNZ`, filtered by user) and closes them
(`$SYS.REQ.SERVER.<id>.KICK`), through the system account. A client that reconnects goes
through the callout again and meets the registry as it is now.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus, subjects
from libs import messages as m
from libs.consumer import Consumer, Delivery, Item
from libs.db.models import BridgeDevice
from services.busauth.authorizer import BRIDGE_PREFIX, Revocations

log = logging.getLogger(__name__)

REVOKING = ("rejected", "decommissioned")
# Servers answer a PING within this; one machine answers in a millisecond.
CONNZ_WAIT_S = 0.25


@dataclass(frozen=True)
class Kick:
    identity: str
    before: datetime  # connections opened before this were admitted with what is revoked
    reason: str


def kicks_of(subject: str, data: bytes, revocations: Revocations) -> list[Kick]:
    """What a fact revokes (and, for a device going away, hold it against the database)."""
    parts = subject.split(".")
    if parts[:2] == ["system", "device"] and parts[-1] == "registry":
        fact = m.registry_fact_decoder.decode(data)
        lifecycle = fact.device.lifecycle if fact.device else None
        if fact.change == "deleted" or lifecycle in REVOKING:
            revocations.add(fact.device_id, fact.time)
            why = "deleted" if fact.change == "deleted" else lifecycle
            return [Kick(fact.device_id, fact.time, f"device {why}")]
        return []
    change = m.change_fact_decoder.decode(data)
    if change.what == "credentials" and change.change in ("rotated", "revoked"):
        return [Kick(change.id, change.time, f"credentials {change.change}")]
    if change.what == "bridge" and change.change in ("rotated", "updated", "deleted"):
        return [Kick(BRIDGE_PREFIX + change.id, change.time, f"bridge {change.change}")]
    return []


class Kicker:
    def __init__(
        self,
        nc: NATS,
        system: NATS,
        revocations: Revocations,
        sessions: async_sessionmaker[AsyncSession],
    ) -> None:
        self._nc = nc
        self._system = system
        self._revocations = revocations
        self._sessions = sessions

    async def run(self, stop: asyncio.Event) -> None:
        config = next(c for _, c in bus.CONSUMERS if c.durable_name == bus.BUSAUTH_DURABLE)
        consumer: Consumer[list[Kick]] = Consumer(
            self._nc,
            subjects.SYSTEM_STREAM,
            config,
            self._kicks,
            self._handle,
            batch=256,
        )
        await consumer.run(stop)

    def _kicks(self, delivery: Delivery) -> list[Kick] | None:
        try:
            return kicks_of(delivery.subject, delivery.data, self._revocations)
        except (msgspec.DecodeError, ValueError) as exc:  # not ours to dead-letter: skipped
            log.warning("unreadable fact on %s: %s", delivery.subject, exc)
            return None

    async def _handle(self, items: list[Item[list[Kick]]]) -> None:
        kicks = {kick.identity: kick for item in items for kick in item.value}  # the latest
        kicks.update(await self._their_bridges(kicks))
        await asyncio.gather(*(self.kick(k) for k in kicks.values()))

    async def _their_bridges(self, kicks: dict[str, Kick]) -> dict[str, Kick]:
        """A revoked device that speaks through a bridge: the bridge's connection goes too
        (its reconnect is granted the devices it still has)."""
        devices = [k.identity for k in kicks.values() if not k.identity.startswith(BRIDGE_PREFIX)]
        if not devices:
            return {}
        try:
            async with self._sessions() as session:
                rows = await session.execute(
                    select(BridgeDevice.device_id, BridgeDevice.bridge_id).where(
                        BridgeDevice.device_id.in_(devices)
                    )
                )
                found = rows.all()
        except Exception as exc:  # the database is away: the devices' own kicks still go
            log.warning("could not read the bridges of revoked devices: %r", exc)
            return {}
        return {
            BRIDGE_PREFIX + bridge: Kick(
                BRIDGE_PREFIX + bridge, kicks[device].before, "its device revoked"
            )
            for device, bridge in found
        }

    async def kick(self, kick: Kick) -> int:
        """Close `kick.identity`'s connections opened before the fact; how many."""
        closed = 0
        try:
            found = await self.connections(kick.identity, kick.before)
        except Exception as exc:  # the system connection is away: the JWT's expiry bounds it
            log.warning("could not list the connections of %s: %r", kick.identity, exc)
            return 0
        for server_id, cid in found:
            try:
                await self._system.request(
                    f"$SYS.REQ.SERVER.{server_id}.KICK", json.dumps({"cid": cid}).encode(), 2.0
                )
                closed += 1
            except Exception as exc:  # gone already, or the server is away
                log.info("kick of %s (cid %s) failed: %r", kick.identity, cid, exc)
        if closed:
            log.info("closed %d connection(s) of %s: %s", closed, kick.identity, kick.reason)
        return closed

    async def connections(self, user: str, before: datetime) -> list[tuple[str, int]]:
        """(server id, cid) of `user`'s open connections opened before `before`, on every
        server that answers within CONNZ_WAIT_S."""
        inbox = self._system.new_inbox()
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_answer(msg: Msg) -> None:
            answers.put_nowait(msg.data)

        sub = await self._system.subscribe(inbox, cb=on_answer)
        try:
            await self._system.publish(
                "$SYS.REQ.SERVER.PING.CONNZ",
                json.dumps({"user": user, "limit": 1024}).encode(),
                reply=inbox,
            )
            await asyncio.sleep(CONNZ_WAIT_S)
        finally:
            await sub.unsubscribe()
        found = []
        while not answers.empty():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                answer = json.loads(answers.get_nowait())
                server_id = answer["server"]["id"]
                for conn in answer["data"].get("connections") or []:
                    if _opened(conn["start"]) <= before:
                        found.append((server_id, int(conn["cid"])))
        return found


def _opened(start: str) -> datetime:
    """connz's `start` (RFC 3339 with nanoseconds) as a datetime."""
    head, _, rest = start.partition(".")
    fraction = "".join(c for c in rest if c.isdigit())[:6]
    zone = rest[len("".join(c for c in rest if c.isdigit())) :] or "Z"
    text = f"{head}.{fraction or '0'}{'+00:00' if zone == 'Z' else zone}"
    return datetime.fromisoformat(text)
