"""Who a connecting client is, from the registry: a device (its password, its lifecycle),
a bridge (its devices), or a device claiming its id with a provisioning token.

Passwords and tokens are 256 random bits stored as SHA-256 (`libs.passwords.digest`): a
fast digest is as safe as Argon2 for them, and a reconnect storm of thousands of devices is
checked in milliseconds instead of queueing behind a memory-hard hash per connection.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus_grants, subjects
from libs.bus_auth import AuthRequest
from libs.bus_grants import Grant
from libs.db.models import (
    Bridge,
    BridgeDevice,
    BusCredential,
    Device,
    DeviceClaim,
    ProvisioningToken,
)
from libs.passwords import digest
from libs.principals import home_of

# A user JWT's life: the server closes the connection then and the client reconnects
# through the callout. Revocation does not wait for it (the connection is closed within
# seconds, see `kicker`); it bounds what a missed revocation could cost.
DEVICE_TTL_S = 24 * 3600.0
BRIDGE_PREFIX = "bridge:"
TOKEN_PREFIX = "smpt_"  # a provisioning token, as the password of a claiming device
MIN_NONCE = 16
# How long a revocation read on the bus outweighs a registry row that does not show it yet
# (the gateway publishes registry facts inside its transaction, before the commit).
REVOCATION_HOLD_S = 30.0
ADMITTED = ("active",)


class Refused(Exception):
    """The client may not connect; the reason goes to the server's log, not the client."""


@dataclass(frozen=True)
class Admission:
    name: str  # what the server calls the connection (connz `user`)
    grant: Grant
    expires_s: float


@dataclass
class Revocations:
    """Devices revoked by a fact the database may not show yet: identity → until when."""

    until: dict[str, float] = field(default_factory=dict)

    def add(self, identity: str, at: datetime) -> None:
        self.until[identity] = at.timestamp() + REVOCATION_HOLD_S

    def holds(self, identity: str) -> bool:
        until = self.until.get(identity)
        if until is None:
            return False
        if until < time.time():
            del self.until[identity]
            return False
        return True


class Authorizer:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], revocations: Revocations
    ) -> None:
        self._sessions = sessions
        self._revocations = revocations

    async def admit(self, request: AuthRequest) -> Admission:
        """The identity to give the connection, or Refused with why."""
        user, password = request.username, request.password
        if not user or not password:
            raise Refused("no username or password: anonymous connections are refused")
        if user.startswith(BRIDGE_PREFIX):
            return await self._bridge(user[len(BRIDGE_PREFIX) :], password)
        if not subjects.is_token(user):
            raise Refused(f"{user!r} is not a device id")
        if request.client_type == "mqtt" and request.mqtt_client_id != user:
            raise Refused(f"MQTT client id {request.mqtt_client_id!r} is not the device id {user}")
        if password.startswith(TOKEN_PREFIX):
            return await self._claim(user, password, request.name)
        return await self._device(user, password)

    async def _device(self, device_id: str, password: str) -> Admission:
        # One read per connection: a reconnect storm is thousands of them at once.
        query = (
            select(BusCredential.secret_hash, Device.lifecycle, DeviceClaim.device_id)
            .outerjoin(Device, Device.id == BusCredential.identity)
            .outerjoin(DeviceClaim, DeviceClaim.device_id == BusCredential.identity)
            .where(BusCredential.identity == device_id)
        )
        async with self._sessions() as session:
            found = (await session.execute(query)).first()
        if found is None or not _same(found[0], password):
            raise Refused(f"wrong password for device {device_id}")
        _, lifecycle, claimed = found
        if lifecycle is None:
            raise Refused(f"device {device_id} is not registered")
        if self._revocations.holds(device_id):
            raise Refused(f"device {device_id} was revoked")
        if lifecycle not in ADMITTED:
            raise Refused(f"device {device_id} is {lifecycle}: its credentials are void")
        if claimed is not None:  # connected with its own credentials: its claim is done
            async with self._sessions.begin() as session:
                await session.execute(delete(DeviceClaim).where(DeviceClaim.device_id == device_id))
        return Admission(device_id, bus_grants.device_grant(device_id), DEVICE_TTL_S)

    async def _bridge(self, bridge_id: str, password: str) -> Admission:
        identity = BRIDGE_PREFIX + bridge_id
        async with self._sessions() as session:
            credential = await session.get(BusCredential, identity)
            if credential is None or not _same(credential.secret_hash, password):
                raise Refused(f"wrong password for bridge {bridge_id}")
            bridge = await session.get(Bridge, bridge_id)
            if bridge is None:
                raise Refused(f"bridge {bridge_id} does not exist")
            rows = await session.execute(
                select(Device.id, Device.location)
                .join(BridgeDevice, BridgeDevice.device_id == Device.id)
                .where(BridgeDevice.bridge_id == bridge_id, Device.lifecycle.in_(ADMITTED))
            )
            # Its home's devices only, whatever a registry edit attached to it.
            devices = [
                d
                for d, location in rows.all()
                if home_of(location) == bridge.home and not self._revocations.holds(d)
            ]
        return Admission(identity, bus_grants.bridge_grant(bridge_id, devices), DEVICE_TTL_S)

    async def _claim(self, device_id: str, token: str, nonce: str) -> Admission:
        """A device presenting a provisioning token: the first connection to claim an id
        binds it to its nonce (its connection name); a use of the token is counted then."""
        if len(nonce) < MIN_NONCE or not subjects.is_token(nonce):
            raise Refused(
                f"a claiming connection is named with a nonce of {MIN_NONCE}+ characters "
                "A-Z a-z 0-9 _ -"
            )
        now = datetime.now(UTC)
        try:
            async with self._sessions.begin() as session:
                row = await session.scalar(
                    select(ProvisioningToken).where(ProvisioningToken.token_hash == digest(token))
                )
                if row is None:
                    raise Refused("unknown provisioning token")
                if row.expires_at <= now:
                    raise Refused(f"provisioning token {row.id} expired")
                claim = await session.get(DeviceClaim, device_id)
                if claim is None:
                    await self._first_claim(session, row, device_id, nonce, now)
                elif claim.token_id != row.id or not hmac.compare_digest(claim.nonce, nonce):
                    raise Refused(f"device id {device_id} is claimed by another connection")
                else:
                    device = await session.get(Device, device_id)
                    if device is not None and device.lifecycle not in ("pending", "active"):
                        raise Refused(f"device {device_id} is {device.lifecycle}")
        except IntegrityError:
            raise Refused(f"device id {device_id} is claimed by another connection") from None
        left = (row.expires_at - now).total_seconds()
        return Admission(
            device_id, bus_grants.claimant_grant(device_id, nonce), min(left, DEVICE_TTL_S)
        )

    async def _first_claim(
        self,
        session: AsyncSession,
        token: ProvisioningToken,
        device_id: str,
        nonce: str,
        now: datetime,
    ) -> None:
        if await session.get(Device, device_id) is not None:
            raise Refused(f"device {device_id} is registered: it connects with its credentials")
        counted = await session.execute(
            update(ProvisioningToken)
            .where(ProvisioningToken.id == token.id, ProvisioningToken.uses < token.max_uses)
            .values(uses=ProvisioningToken.uses + 1)
        )
        # An UPDATE's result is a CursorResult, which execute()'s type (Result) does not say.
        if counted.rowcount != 1:  # type: ignore[attr-defined]
            raise Refused(f"provisioning token {token.id} is used up ({token.max_uses} uses)")
        session.add(
            DeviceClaim(
                device_id=device_id, token_id=token.id, home=token.home, nonce=nonce, claimed_at=now
            )
        )
        await session.flush()


def _same(stored_hash: str, secret: str) -> bool:
    return hmac.compare_digest(stored_hash, digest(secret))
