"""SQLAlchemy 2 models. Postgres is the truth; SQLite is the embedded default."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from libs.messages import Connection, DeviceSnapshot, DeviceStateName, Rule, RuleSpec

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Location(Base):
    """A home, a floor or a room; `path` is `home/floor/room` for filtering."""

    __tablename__ = "locations"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("locations.id"), nullable=True)
    path: Mapped[str] = mapped_column(String(512), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)


class Device(Base):
    """The registry entry: written by the gateway only."""

    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(64), index=True)
    location: Mapped[str | None] = mapped_column(String(512), index=True, nullable=True)
    lifecycle: Mapped[str] = mapped_column(String(16), default="active")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    # Seconds each attribute may go unreported before it is stale, over the kind's defaults
    # (`libs.capabilities.report_intervals`); null turns a default off.
    report_intervals: Mapped[dict[str, float | None]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now, onupdate=_now)
    # When it came to the home it is in: its registration, or its last move to another home
    # (or out of any). Who sees it for that home sees nothing recorded about it before
    # (`services.gateway.scope.since_home`); null: always (registered before the column).
    home_since: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class DeviceState(Base):
    """The runtime state: written by the actors only, with the stream sequence it reflects."""

    __tablename__ = "device_states"
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    # Typed as the snapshot's vocabularies: the columns hold nothing else.
    state: Mapped[DeviceStateName] = mapped_column(String(16), default="off")
    mark: Mapped[Literal["triggered"] | None] = mapped_column(String(16), nullable=True)
    connection: Mapped[Connection] = mapped_column(String(16), default="offline")
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    # The highest EVENTS stream sequence applied: a redelivery at or below it is skipped.
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    # When each attribute was last reported (ISO 8601 times: the actors' datetimes as the
    # JSON serializer writes them)
    # and the attributes overdue: written with the rest of the state, read by presence.
    reported: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    stale: Mapped[list[str]] = mapped_column(JSON, default=list)

    def snapshot(self) -> DeviceSnapshot:
        return DeviceSnapshot(
            device_id=self.device_id,
            state=self.state,
            mark=self.mark,
            connection=self.connection,
            attributes=self.attributes or {},
            last_seen=self.last_seen,
            version=self.version,
            last_seq=self.last_seq,
            reported={k: datetime.fromisoformat(v) for k, v in (self.reported or {}).items()},
            stale=list(self.stale or []),
        )


class CommandRecord(Base):
    __tablename__ = "commands"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    action: Mapped[str] = mapped_column(String(128))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    issued_by: Mapped[str] = mapped_column(String(200))
    correlation_id: Mapped[str] = mapped_column(String(128), index=True)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)


class RuleRecord(Base):
    __tablename__ = "rules"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    # The home whose devices it may read and command; None: platform-wide (admins only).
    home: Mapped[str | None] = mapped_column(String(128), index=True, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now, onupdate=_now)

    def to_rule(self) -> Rule:
        """The rule as the engine, the actions and a dry run read it (one reading for all)."""
        spec = msgspec.convert(self.spec, RuleSpec)
        return Rule(
            id=self.id,
            name=self.name,
            trigger=spec.trigger,
            actions=spec.actions,
            enabled=self.enabled and spec.enabled,
            version=self.version,
            conditions=spec.conditions,
            mode=spec.mode,
            home=self.home,
        )


class RuleRun(Base):
    """A rule's trace: one row per firing, clearing or error (from `system.rule.*.fired`)."""

    __tablename__ = "rule_runs"
    __table_args__ = (UniqueConstraint("source_seq", name="uq_rule_runs_source_seq"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    rule_id: Mapped[str] = mapped_column(String(128), index=True)
    episode_id: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    device_id: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)
    values: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    outcomes: Mapped[list[Any]] = mapped_column(JSON, default=list)
    correlation_id: Mapped[str] = mapped_column(String(128))
    source_seq: Mapped[int] = mapped_column(BigInteger)


class HistoryEntry(Base):
    """Telemetry and state history, one row per bus message (`source_seq` makes it idempotent)."""

    __tablename__ = "history"
    __table_args__ = (
        UniqueConstraint("stream", "source_seq", name="uq_history_stream_seq"),
        Index("ix_history_device_time", "device_id", "time"),
        Index("ix_history_time", "time"),  # roll-ups and retention go by time across devices
    )
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128))
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    type: Mapped[str] = mapped_column(String(128))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    stream: Mapped[str] = mapped_column(String(32))
    source_seq: Mapped[int] = mapped_column(BigInteger)


class HourlyStatistic(Base):
    """One numeric attribute of one device over one UTC hour, rolled up from its history by
    the recorder (`last` is what matters for counters such as `energy_wh`)."""

    __tablename__ = "statistics"
    __table_args__ = (
        UniqueConstraint("device_id", "hour", "attribute", name="uq_statistics_device_hour_attr"),
        Index("ix_statistics_hour", "hour"),
    )
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128))
    hour: Mapped[datetime] = mapped_column(UTCDateTime)  # its start
    attribute: Mapped[str] = mapped_column(String(128))
    count: Mapped[int] = mapped_column(Integer)
    mean: Mapped[float] = mapped_column(Float)
    min: Mapped[float] = mapped_column(Float)
    max: Mapped[float] = mapped_column(Float)
    last: Mapped[float] = mapped_column(Float)
    last_time: Mapped[datetime] = mapped_column(UTCDateTime)


class RollupPending(Base):
    """An hour whose history changed since its statistics were rolled up: the recorder marks
    it with each history write (`changes` counts them) and clears it with the roll-up."""

    __tablename__ = "rollup_pending"
    hour: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    changes: Mapped[int] = mapped_column(BigInteger, default=1)


class AuditEntry(Base):
    """Who did what, when, to which device, with what result, under which correlation id."""

    __tablename__ = "audit"
    __table_args__ = (
        UniqueConstraint("stream", "source_seq", name="uq_audit_stream_seq"),
        Index("ix_audit_time", "time"),
    )
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(128))
    device_id: Mapped[str | None] = mapped_column(String(128), index=True, nullable=True)
    result: Mapped[str] = mapped_column(String(200))
    correlation_id: Mapped[str | None] = mapped_column(String(128), index=True, nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    stream: Mapped[str] = mapped_column(String(32))
    source_seq: Mapped[int] = mapped_column(BigInteger)
    # The home the row is about, for rows about no device (a rule's, a location's change).
    home: Mapped[str | None] = mapped_column(String(128), index=True, nullable=True)
    # What it acted on (`device:lamp`, `rule:r1`, `command:<id>`), why, and the event that
    # caused it (a state change's event, a rule's trigger).
    target: Mapped[str | None] = mapped_column(String(200), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    cause_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # When the recorder wrote it (retention goes by it: ids follow it, `time` need not).
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    # The hash chain (`libs.audit_chain`): set as the row is inserted (`libs.db.audit`);
    # the database refuses UPDATE and DELETE but retention's (migration 0008).
    hash: Mapped[str] = mapped_column(String(64))


class AuditCheckpoint(Base):
    """Where retention cut the audit chain: the last row deleted and its hash, signed
    (HMAC) with a key the database does not hold; the rows after it chain from `cut_hash`."""

    __tablename__ = "audit_checkpoints"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    cut_id: Mapped[int] = mapped_column(BigInteger, unique=True)
    cut_hash: Mapped[str] = mapped_column(String(64))
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    signature: Mapped[str] = mapped_column(String(64))


class Subscription(Base):
    """A webhook: events matching `filter` are POSTed to `url`, signed with `secret`."""

    __tablename__ = "subscriptions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    filter: Mapped[str] = mapped_column(String(512))
    url: Mapped[str] = mapped_column(String(2048))
    mode: Mapped[str] = mapped_column(String(16), default="structured")
    # Batched mode: at most this many events per request (None in the other modes).
    batch_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    secret: Mapped[str] = mapped_column(String(128))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[str] = mapped_column(String(200))
    # The home whose messages it receives; None: the whole bus (admins only).
    home: Mapped[str | None] = mapped_column(String(128), index=True, nullable=True)
    # May it reach private, loopback or link-local addresses inside the allow-nets? Only when
    # an administrator created it: a name that resolves there later is refused otherwise.
    private_targets: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    # Events delivered, counted by the webhooks service about once a second (a first-attempt
    # success leaves no `deliveries` row).
    delivered_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    last_delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Delivery(Base):
    """One event's delivery to one subscription that needed more than one attempt (or has not
    succeeded yet): its attempts, and how it ended."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint(
            "subscription_id", "source", "event_seq", name="uq_deliveries_sub_source_seq"
        ),
        Index("ix_deliveries_sub_status", "subscription_id", "status"),
    )
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    subscription_id: Mapped[str] = mapped_column(String(64))
    # `filter` (the subscription's filter, its stream) or `notify` (system.notify.<id>, SYSTEM).
    source: Mapped[str] = mapped_column(String(16), default="filter", server_default="filter")
    event_seq: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[str] = mapped_column(String(128))
    # The `webhook-id` of the request that carried it: a batch's id in batched mode.
    webhook_id: Mapped[str | None] = mapped_column(String(160), nullable=True)
    subject: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(16), default="pending")  # delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Channel(Base):
    """A notification channel: where a rule's `notify` action sends people its alert (e-mail,
    Slack-compatible webhook, ntfy). `config` is a `libs.messages.ChannelConfig`, its secret
    (SMTP password, webhook URL, ntfy token) included: never shown after creation."""

    __tablename__ = "channels"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[str] = mapped_column(String(200))
    home: Mapped[str | None] = mapped_column(String(128), index=True, nullable=True)
    # As a subscription's: may it reach private addresses inside the allow-nets?
    private_targets: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    delivered_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    last_delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class User(Base):
    """A person who signs in: an Argon2id password hash, a role and the homes it may see."""

    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16))
    homes: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now, onupdate=_now)


class RefreshToken(Base):
    """One refresh token of a sign-in (`family`): stored as its SHA-256, used once; a used
    one shown again revokes the whole family (reuse detection)."""

    __tablename__ = "refresh_tokens"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    family: Mapped[str] = mapped_column(String(64), index=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)


class ApiKey(Base):
    """An integration's bearer key, stored as its SHA-256; shown once at creation."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    homes: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_by: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)


class BusCredential(Base):
    """A device's or a bridge's password on the bus, stored only as its SHA-256 (256 random
    bits: a fast digest is as safe, and the callout checks it on every connection)."""

    __tablename__ = "bus_credentials"
    # A device id, or `bridge:<id>`.
    identity: Mapped[str] = mapped_column(String(160), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    # Counts rotations: a connection admitted with an older one is closed.
    generation: Mapped[int] = mapped_column(Integer, default=1)
    issued_by: Mapped[str] = mapped_column(String(200))
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)


class Bridge(Base):
    """A hub that speaks for many devices of one home on one connection."""

    __tablename__ = "bridges"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    home: Mapped[str] = mapped_column(String(128), index=True)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)


class BridgeDevice(Base):
    """A device that speaks through a bridge (and has no credentials of its own)."""

    __tablename__ = "bridge_devices"
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    bridge_id: Mapped[str] = mapped_column(ForeignKey("bridges.id", ondelete="CASCADE"), index=True)


class ProvisioningToken(Base):
    """A claim token for discovery in one home: stored as its SHA-256, shown once."""

    __tablename__ = "provisioning_tokens"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    home: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    max_uses: Mapped[int] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)


class DeviceClaim(Base):
    """A device id claimed with a provisioning token, until the device first connects with
    its own credentials. `nonce` is the claiming connection's name: only a connection that
    presents it may read the credentials delivered on approval."""

    __tablename__ = "device_claims"
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    token_id: Mapped[str] = mapped_column(
        ForeignKey("provisioning_tokens.id", ondelete="CASCADE"), index=True
    )
    home: Mapped[str] = mapped_column(String(128))
    nonce: Mapped[str] = mapped_column(String(64))
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)


class OutboxMessage(Base):
    """A fact written in the transaction of the change it announces; `libs.outbox`'s relay
    publishes it after commit with `id` as its `Nats-Msg-Id`, in `seq` order."""

    __tablename__ = "outbox"
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    # Unique beyond this database (a restored one numbers `seq` again): the bus dedups by it.
    id: Mapped[str] = mapped_column(String(32), unique=True)
    subject: Mapped[str] = mapped_column(String(512))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    headers: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)


class ActorPartitionFence(Base):
    """Who works a partition of the device events now: its lease's KV revision when taken.
    Every state commit of the actors checks it in the same transaction, so a late write of
    a holder whose lease was taken over is refused (`services.actors.fence`)."""

    __tablename__ = "actor_partitions"
    partition: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    revision: Mapped[int] = mapped_column(BigInteger)
    holder: Mapped[str] = mapped_column(String(256))
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)


# Registers the hook that chains every AuditEntry as it is inserted (it imports the models).
from libs.db import audit as _audit_chain  # noqa: E402, F401
