"""Bus credentials: issued with a device, rotated on demand, delivered to a claimed device on
its approval; bridges and provisioning tokens. Secrets are shown once and kept as SHA-256
(`libs.passwords`); the busauth service checks them when the device connects.

A rotation is told to the bus after its commit (`system.credentials.<id>.changed`): the
busauth service then closes the connection that used the old password, and the reconnect
meets the committed row.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus_grants, outbox, subjects
from libs import messages as m
from libs.db.models import Bridge as BridgeRow
from libs.db.models import BridgeDevice, BusCredential, DeviceClaim
from libs.db.models import Device as DeviceRow
from libs.db.models import ProvisioningToken as TokenRow
from libs.errors import Conflict, Invalid, NotFound
from libs.passwords import digest, new_secret
from libs.principals import Principal, home_of
from services.gateway import scope
from services.gateway.auth.context import Context
from services.gateway.credentials.schemas import (
    Bridge,
    BridgeCreate,
    BusCredentials,
    ProvisioningToken,
    ProvisioningTokenCreate,
)
from services.gateway.resources import require_bus

log = logging.getLogger(__name__)

DEVICE_SECRET = "smd_"
BRIDGE_SECRET = "smb_"
TOKEN_SECRET = "smpt_"  # the busauth service tells a provisioning token by it
BRIDGE_IDENTITY = "bridge:"
REDELIVER_AFTER_S = 30.0


async def issue(session: AsyncSession, identity: str, actor: str, prefix: str) -> BusCredentials:
    """New credentials for `identity`, in the caller's transaction (the old ones are void
    once it commits)."""
    password = new_secret(prefix)
    row = await session.get(BusCredential, identity)
    if row is None:
        row = BusCredential(identity=identity, generation=0)
        session.add(row)
    row.secret_hash = digest(password)
    row.generation += 1
    row.issued_by = actor
    row.issued_at = m.now()
    return BusCredentials(username=identity, password=password)


async def ensure_command_consumer(js: JetStreamContext, device_id: str) -> None:
    """The device's durable consumer of its commands: the platform makes it, the device may
    only read and ack it (it could point a consumer it made anywhere)."""
    config = ConsumerConfig(
        durable_name=bus_grants.device_durable(device_id),
        filter_subject=subjects.commands(device_id),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.NEW,
    )
    # One made before (by the device itself, formerly) stays as it is.
    with contextlib.suppress(BadRequestError):
        await js.add_consumer(subjects.COMMANDS_STREAM, config)


async def enroll(
    session: AsyncSession,
    js: JetStreamContext,
    device_id: str,
    location: str | None,
    bridge_id: str | None,
    actor: str,
) -> BusCredentials | None:
    """A registered device's bus identity, in the registration's transaction: its own
    credentials, or a place among its bridge's devices (None: the bridge speaks for it)."""
    if bridge_id is not None:
        bridge = await session.get(BridgeRow, bridge_id)
        if bridge is None:
            raise Invalid(f"no bridge {bridge_id!r}", field="$.bridge")
        if home_of(location) != bridge.home:
            raise Invalid(
                f"bridge {bridge_id!r} speaks for devices of home {bridge.home!r} only",
                field="$.location",
            )
        await session.merge(BridgeDevice(device_id=device_id, bridge_id=bridge_id))
        return None
    credentials = await issue(session, device_id, actor, DEVICE_SECRET)
    await ensure_command_consumer(js, device_id)
    return credentials


async def claimed_home(session: AsyncSession, device_id: str) -> str | None:
    """The home a device claimed with a provisioning token, where it waits for approval."""
    claim = await session.get(DeviceClaim, device_id)
    return claim.home if claim is not None else None


class CredentialService:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], nc: NATS, js: JetStreamContext
    ) -> None:
        self._sessions = sessions
        self._nc = nc
        self._js = js

    async def rotate(self, device_id: str, ctx: Context) -> BusCredentials:
        """New credentials for a device; the old ones are refused from now on and a
        connection that used them is closed within seconds."""
        require_bus(self._nc)
        missing = f"device {device_id!r} is not registered"
        async with self._sessions.begin() as session:
            row = await session.get(DeviceRow, device_id)
            if row is None:
                raise NotFound(missing)
            scope.visible(ctx.principal, home_of(row.location), missing)
            if row.lifecycle != m.Lifecycle.ACTIVE:
                raise Conflict(
                    f"device {device_id!r} is {row.lifecycle}: only an active one has credentials"
                )
            if await session.get(BridgeDevice, device_id) is not None:
                raise Conflict(f"device {device_id!r} speaks through its bridge")
            credentials = await issue(session, device_id, ctx.principal.actor, DEVICE_SECRET)
            await ensure_command_consumer(self._js, device_id)
            _changed(
                session, subjects.credentials_changed(device_id), "credentials", device_id,
                "rotated", ctx, home_of(row.location),
            )  # fmt: skip
        return credentials

    async def deliver_claim(self, device_id: str, actor: str, again: bool = False) -> bool:
        """Hand an approved device that claimed its id its credentials, on the subject only
        its claiming connection may read (issued anew each time: nothing to keep). `again`
        (a hello while it still claims): only if the last ones are older than
        REDELIVER_AFTER_S, so that a hello sent before the approval does not void the
        credentials the device is taking now."""
        async with self._sessions.begin() as session:
            claim = await session.get(DeviceClaim, device_id)
            device = await session.get(DeviceRow, device_id)
            if claim is None or device is None or device.lifecycle != m.Lifecycle.ACTIVE:
                return False
            last = await session.get(BusCredential, device_id)
            recent = m.now() - timedelta(seconds=REDELIVER_AFTER_S)
            if again and last is not None and last.issued_at > recent:
                return False
            credentials = await issue(session, device_id, actor, DEVICE_SECRET)
        await ensure_command_consumer(self._js, device_id)
        subject = subjects.provision(device_id, claim.nonce)
        await self._nc.publish(subject, msgspec.json.encode(credentials))
        await self._nc.flush()
        log.info("credentials delivered to claimed device %s", device_id)
        return True

    # --- bridges -------------------------------------------------------------------------

    async def create_bridge(self, data: BridgeCreate, ctx: Context) -> Bridge:
        require_bus(self._nc)
        _own_home(ctx.principal, data.home)
        async with self._sessions.begin() as session:
            if await session.get(BridgeRow, data.id) is not None:
                raise Conflict(f"bridge {data.id!r} already exists", field="$.id")
            row = BridgeRow(
                id=data.id, name=data.name, home=data.home, created_by=ctx.principal.actor,
                created_at=m.now(),
            )  # fmt: skip
            session.add(row)
            credentials = await issue(
                session, BRIDGE_IDENTITY + data.id, ctx.principal.actor, BRIDGE_SECRET
            )
            _changed(
                session, subjects.bridge_changed(data.id), "bridge", data.id, "created", ctx,
                data.home,
            )  # fmt: skip
        return msgspec.structs.replace(_bridge(row), credentials=credentials)

    async def rotate_bridge(self, bridge_id: str, ctx: Context) -> BusCredentials:
        require_bus(self._nc)
        missing = f"no bridge {bridge_id!r}"
        async with self._sessions.begin() as session:
            row = await session.get(BridgeRow, bridge_id)
            if row is None:
                raise NotFound(missing)
            scope.visible(ctx.principal, row.home, missing)
            credentials = await issue(
                session, BRIDGE_IDENTITY + bridge_id, ctx.principal.actor, BRIDGE_SECRET
            )
            _changed(
                session, subjects.bridge_changed(bridge_id), "bridge", bridge_id, "rotated", ctx,
                row.home,
            )  # fmt: skip
        return credentials

    # --- provisioning tokens -------------------------------------------------------------

    async def create_token(self, data: ProvisioningTokenCreate, ctx: Context) -> ProvisioningToken:
        require_bus(self._nc)
        _own_home(ctx.principal, data.home)
        secret = new_secret(TOKEN_SECRET)
        now = m.now()
        row = TokenRow(
            id=f"pt-{m.new_id()[:12]}", token_hash=digest(secret), home=data.home,
            expires_at=now + timedelta(seconds=data.expires_s), max_uses=data.max_uses, uses=0,
            created_by=ctx.principal.actor, created_at=now,
        )  # fmt: skip
        async with self._sessions.begin() as session:
            session.add(row)
            _changed(
                session, subjects.provisioning_token_changed(row.id), "provisioning", row.id,
                "created", ctx, data.home,
                {"expires_at": row.expires_at.isoformat(), "max_uses": row.max_uses},
            )  # fmt: skip
        return ProvisioningToken(
            id=row.id, home=row.home, expires_at=row.expires_at, max_uses=row.max_uses, uses=0,
            created_by=row.created_by, created_at=row.created_at, token=secret,
        )  # fmt: skip


def bridge_joined(session: AsyncSession, bridge_id: str, device_id: str, ctx: Context) -> None:
    """A device joined a bridge (in the registration's transaction): after the commit the
    bridge's connection is closed and its reconnect is granted the new device too."""
    _changed(
        session, subjects.bridge_changed(bridge_id), "bridge", bridge_id, "updated", ctx, None,
        {"joined": device_id},
    )  # fmt: skip


def _changed(
    session: AsyncSession,
    subject: str,
    what: Any,
    item_id: str,
    change: Any,
    ctx: Context,
    home: str | None,
    detail: dict[str, Any] | None = None,
) -> None:
    """The change's fact, in its transaction (`libs.outbox`: published after the commit)."""
    fact = m.ChangeFact(
        what=what, id=item_id, change=change, actor=ctx.principal.actor,
        correlation_id=ctx.correlation_id, time=m.now(), detail=detail or {}, home=home,
    )  # fmt: skip
    outbox.add(session, subject, fact)


def _own_home(principal: Principal, home: str) -> None:
    if not principal.sees(home):
        raise Invalid(f"{home!r} is not one of your homes", field="$.home")


def _bridge(row: BridgeRow) -> Bridge:
    return Bridge(
        id=row.id, name=row.name, home=row.home, created_by=row.created_by,
        created_at=row.created_at,
    )  # fmt: skip
