"""nats-server's auth callout, the platform's side: the issuer key, the request the server
sends for a connecting client, and the signed answer that carries the client's identity,
permissions and expiry (NATS ADR-26; `$SYS.REQ.USER.AUTH`).

The server asks only for clients that are not its own static users (the services). The
platform answers with a user JWT signed by the issuer key whose public half is in the
server's configuration (`auth_callout.issuer`), so the server enforces what we grant: a
device's permissions are the server's, not a check our code makes on each message.

JWTs here are NATS JWTs (v2): `base64url(header).base64url(claims).base64url(ed25519 sig)`,
header `{"typ":"JWT","alg":"ed25519-nkey"}`, signed with an nkey.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nkeys

from libs import bus_grants
from libs.bus_grants import Grant, write_secret_file

GLOBAL_ACCOUNT = "$G"  # the server's default account: every stream of the platform is in it
CALLOUT_SUBJECT = "$SYS.REQ.USER.AUTH"
CALLOUT_QUEUE = "busauth"
ISSUER_FILE = "issuer.nk"
_HEADER = base64.urlsafe_b64encode(b'{"typ":"JWT","alg":"ed25519-nkey"}').rstrip(b"=")


class ServerId(msgspec.Struct):
    id: str
    name: str = ""


class ClientInfo(msgspec.Struct):
    host: str = ""
    id: int = 0  # the connection's id on its server (cid): what a kick names
    kind: str = ""
    type: str = ""  # "nats", "mqtt", "websocket", "leafnode"
    mqtt_id: str = ""  # an MQTT client's client id


class ConnectOptions(msgspec.Struct):
    user: str = ""
    # nats-server calls it `pass` on the wire.
    password: str = msgspec.field(default="", name="pass")
    name: str = ""


class RequestBody(msgspec.Struct):
    server_id: ServerId
    user_nkey: str
    client_info: ClientInfo = msgspec.field(default_factory=ClientInfo)
    connect_opts: ConnectOptions = msgspec.field(default_factory=ConnectOptions)


class RequestClaims(msgspec.Struct):
    nats: RequestBody


@dataclass(frozen=True)
class AuthRequest:
    """What the server tells about a connecting client."""

    server_id: str
    user_nkey: str  # the public key the answer must be for (a fresh one per connection)
    cid: int
    client_type: str
    mqtt_client_id: str
    username: str
    password: str
    name: str  # the client's connection name


_request_decoder = msgspec.json.Decoder(RequestClaims)


def decode_request(token: bytes) -> AuthRequest:
    """Read the server's request (a JWT the server signed). Only the server can send it:
    no identity the platform grants may publish on `$SYS.REQ.USER.AUTH`."""
    parts = token.split(b".")
    if len(parts) != 3:
        raise ValueError("an auth callout request is a JWT of three parts")
    claims = _request_decoder.decode(_b64decode(parts[1])).nats
    return AuthRequest(
        server_id=claims.server_id.id,
        user_nkey=claims.user_nkey,
        cid=claims.client_info.id,
        client_type=claims.client_info.type,
        mqtt_client_id=claims.client_info.mqtt_id,
        username=claims.connect_opts.user,
        password=claims.connect_opts.password,
        name=claims.connect_opts.name,
    )


def new_issuer_seed() -> bytes:
    """A fresh account nkey seed (`SA...`): its public key (`A...`) is the callout issuer."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT))


def issuer(seed: bytes) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(seed))


def issuer_public_key(seed: bytes) -> str:
    return str(issuer(seed).public_key.decode())


def ensure_issuer_seed(directory: Path) -> bytes:
    """The issuer seed kept in `directory` (made on first start, mode 0600)."""
    path = directory / ISSUER_FILE
    if not path.exists():
        write_secret_file(path, new_issuer_seed())
    return path.read_bytes().strip()


def user_jwt(
    signer: nkeys.KeyPair, request: AuthRequest, name: str, grant: Grant, expires_s: float
) -> str:
    """The identity the server gives the connection: `name` (what connz and the logs show),
    its permissions, and an expiry after which the server closes the connection."""
    now = int(time.time())
    permissions: dict[str, Any] = {
        "pub": {"allow": list(grant.publish)},
        "sub": {"allow": list(grant.subscribe)},
        "subs": -1,
        "data": -1,
        "payload": -1,
        "type": "user",
        "version": 2,
    }
    claims = {
        "iat": now,
        "exp": now + int(expires_s),
        "iss": signer.public_key.decode(),
        "name": name,
        "sub": request.user_nkey,
        # Outside operator mode the audience names the account the user is placed in.
        "aud": GLOBAL_ACCOUNT,
        "nats": permissions,
    }
    return _encode(claims, signer)


def allow(signer: nkeys.KeyPair, request: AuthRequest, user: str) -> bytes:
    """The answer that admits the client as the user JWT `user`."""
    return _answer(signer, request, {"jwt": user})


def deny(signer: nkeys.KeyPair, request: AuthRequest, reason: str) -> bytes:
    """The answer that refuses the client; the server logs `reason` (the client sees an
    authorization violation, nothing more)."""
    return _answer(signer, request, {"error": reason})


def _answer(signer: nkeys.KeyPair, request: AuthRequest, body: dict[str, Any]) -> bytes:
    claims = {
        "iat": int(time.time()),
        "iss": signer.public_key.decode(),
        "sub": request.user_nkey,
        "aud": request.server_id,
        "nats": {**body, "type": "authorization_response", "version": 2},
    }
    return _encode(claims, signer).encode()


def _encode(claims: dict[str, Any], signer: nkeys.KeyPair) -> str:
    # The JWT id is a digest of the claims, as the Go library makes it.
    unsigned = msgspec.json.encode({"jti": "", **claims})
    jti = base64.b32encode(hashlib.sha256(unsigned).digest()).rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(msgspec.json.encode({"jti": jti, **claims})).rstrip(b"=")
    signing_input = _HEADER + b"." + body
    signature = base64.urlsafe_b64encode(signer.sign(signing_input)).rstrip(b"=")
    return (signing_input + b"." + signature).decode()


def _b64decode(part: bytes) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))
    except binascii.Error as exc:
        raise ValueError(f"not base64url: {exc}") from None


def embedded_authorization(directory: Path) -> str:
    """The `authorization` block of a server the platform runs itself (`smarthome up`,
    the tests): the issuer key and the services' passwords kept in `directory` (made on
    first start), their bcrypt hashes in the configuration."""
    seed = ensure_issuer_seed(directory)
    passwords = bus_grants.ensure_service_passwords(directory)
    return bus_grants.authorization_config(
        {user: p.bcrypt for user, p in passwords.items()}, issuer_public_key(seed)
    )
