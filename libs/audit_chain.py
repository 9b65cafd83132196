"""The audit log's hash chain, pure: a row's canonical form, its link to the row before it,
the signed checkpoint that retention leaves where it cut the chain, and the walk that checks
a chain. The database side (locking, appending, cutting) is `libs.db.audit`.

Each row's `hash` is SHA-256 over the previous row's hash and the row's canonical form, in
id order; the first row follows `GENESIS`, or the checkpoint's hash once retention cut the
rows before it. An edited row no longer matches its hash; a row deleted, inserted or
re-hashed breaks the link of the row after it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import msgspec

GENESIS = "0" * 64
# Names the canonical form: a row hashed under another form says so in its own bytes.
FORM = "smarthome-audit-v1"
# The columns a row's hash covers, in this order. `hash` itself is not one of them.
FIELDS = (
    "id",
    "time",
    "recorded_at",
    "actor",
    "action",
    "device_id",
    "target",
    "result",
    "reason",
    "correlation_id",
    "cause_id",
    "detail",
    "home",
    "stream",
    "source_seq",
)
_KEY_LABEL = b"smarthome audit checkpoint v1"


class ActorKind(StrEnum):
    """Who acted, as the audit log names it (`<kind>:<id>`)."""

    USER = "user"
    API_KEY = "apikey"
    DEVICE = "device"
    RULE = "rule"
    SERVICE = "service"


def principal_of(actor: str) -> tuple[ActorKind, str]:
    """`user:alice` -> (user, alice). The platform's own processes (`platform:actors`) and a
    source no kind names (an alert's, from a service on the bus) are services."""
    kind, sep, ident = actor.partition(":")
    if sep:
        try:
            found = ActorKind(kind)
        except ValueError:
            return ActorKind.SERVICE, ident if kind == "platform" else actor
        return found, ident
    return ActorKind.SERVICE, actor


def _utc(value: datetime | None) -> datetime:
    if value is None or value.tzinfo is None:
        raise ValueError("an audit row's times must be zone-aware")
    return value.astimezone(UTC)


_ENCODER = msgspec.json.Encoder(order="sorted")
_TIMES = frozenset({"time", "recorded_at"})


def canonical(row: Mapping[str, Any]) -> bytes:
    """The bytes a row's hash covers: `FORM` and the row's `FIELDS` as a JSON array, as
    msgspec writes it (objects with sorted keys, no spaces, UTF-8; times in UTC, RFC 3339;
    an object's keys as text and tuples as arrays, as the JSON column gives them back)."""
    values: list[Any] = [FORM]
    for name in FIELDS:
        value = row.get(name)
        if name in _TIMES:
            value = _utc(value)
        elif name == "detail":
            value = value or {}
        values.append(value)
    try:
        return _ENCODER.encode(values)
    except TypeError:  # a detail with keys other than text: as JSON will store them
        at = FIELDS.index("detail") + 1
        values[at] = msgspec.json.decode(msgspec.json.encode(values[at]))
        return _ENCODER.encode(values)


def link(previous: str, row: Mapping[str, Any]) -> str:
    """The hash of `row` after the row whose hash is `previous`."""
    digest = hashlib.sha256(previous.encode("ascii"))
    digest.update(b"\n")
    digest.update(canonical(row))
    return digest.hexdigest()


# --- checkpoints ---------------------------------------------------------------------------


def checkpoint_key(secret: str) -> bytes:
    """The key that signs checkpoints, derived from the platform's secret (the key signing
    access tokens): one secret to keep, and a checkpoint's MAC is never a token's."""
    return hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()


def _checkpoint_bytes(cut_id: int, cut_hash: str, time: datetime) -> bytes:
    return _ENCODER.encode([FORM, "checkpoint", cut_id, cut_hash, _utc(time)])


def sign_checkpoint(key: bytes, cut_id: int, cut_hash: str, time: datetime) -> str:
    """The MAC of "the chain was cut after row `cut_id`, whose hash was `cut_hash`"."""
    return hmac.new(key, _checkpoint_bytes(cut_id, cut_hash, time), hashlib.sha256).hexdigest()


def checkpoint_signed(
    key: bytes, cut_id: int, cut_hash: str, time: datetime, signature: str
) -> bool:
    return hmac.compare_digest(sign_checkpoint(key, cut_id, cut_hash, time), signature)


# --- the walk ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    id: int
    reason: str


class Walk:
    """Checks rows fed in id order against the chain; stops at the first bad one."""

    def __init__(self, start: str = GENESIS, after_id: int = 0) -> None:
        self._previous = start
        self._previous_id = after_id
        self.checked = 0
        self.first_bad: Bad | None = None

    def feed(self, row: Mapping[str, Any]) -> bool:
        """Check one row; False once a bad one was found (the rest is not looked at)."""
        if self.first_bad is not None:
            return False
        self.checked += 1
        row_id = int(row["id"])
        stored = row.get("hash")
        if row_id <= self._previous_id:
            self.first_bad = Bad(row_id, "out of order: its id is not after the row before it")
        elif not stored:
            self.first_bad = Bad(row_id, "no hash: the row was not written by the recorder")
        elif link(self._previous, row) != stored:
            self.first_bad = Bad(
                row_id,
                "its hash does not match its contents and the row before it: the row was "
                "edited, or a row before it was deleted, inserted or re-hashed",
            )
        else:
            self._previous, self._previous_id = stored, row_id
            return True
        return False

    def fail(self, bad: Bad) -> None:
        """Record a failure found outside the rows (a checkpoint that is not ours)."""
        if self.first_bad is None:
            self.first_bad = bad
