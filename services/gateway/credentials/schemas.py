"""Bus credentials, bridges and provisioning tokens as the HTTP API shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import UNSET, UnsetType

from libs.messages import Name, Token


class BusCredentials(msgspec.Struct, frozen=True):
    """A device's (or a bridge's) username and password on the bus, NATS and MQTT alike.
    Shown this once: the platform keeps only a hash."""

    username: str
    password: str


class BridgeCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A hub that speaks for many devices of one home on one connection; its devices are
    those registered with `"bridge": "<its id>"` in its home."""

    id: Token
    name: Name
    home: Token


class Bridge(msgspec.Struct, frozen=True):
    id: str
    name: str
    home: str
    created_by: str
    created_at: datetime
    credentials: BusCredentials | UnsetType = UNSET


class ProvisioningTokenCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A claim token for discovery in one home: a device presenting it as its bus password
    (its id as username) may only say hello and wait for an installer's approval."""

    home: Token
    expires_s: Annotated[float, msgspec.Meta(gt=0, le=30 * 86400)] = 3600.0
    max_uses: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1


class ProvisioningToken(msgspec.Struct, frozen=True):
    id: str
    home: str
    expires_at: datetime
    max_uses: int
    uses: int
    created_by: str
    created_at: datetime
    token: str | UnsetType = UNSET  # shown at creation only
