"""The one place where configuration is read: the environment, once, at start-up."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path


class SettingsError(ValueError):
    """A setting has a value the platform cannot use."""


def _port(name: str, default: int) -> tuple[int, bool]:
    """Return (port, explicit): explicit ports must be honoured or refused."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default, False
    try:
        port = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise SettingsError(f"{name}={port} is outside 0-65535")
    return port, True


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None


@dataclass(frozen=True)
class Settings:
    """Typed settings with the embedded defaults of DESIGN.md."""

    data_dir: Path = Path(".smarthome")
    nats_url: str | None = None
    # This process's own identity on the bus (SMARTHOME_NATS_USER / _PASSWORD): the
    # launcher or a Kubernetes Secret gives each service its own; nats-server has no
    # anonymous user.
    nats_user: str | None = None
    nats_password: str | None = None
    # The busauth service's: the system account's password (it closes revoked devices'
    # connections) and the seed of the key that signs what the callout grants (None: the
    # one kept in the data directory's `bus/`, made on first start).
    nats_system_password: str | None = None
    bus_issuer_seed: str | None = None
    # TLS of the embedded nats-server's NATS and MQTT listeners (both files or neither; off
    # by default: it listens on loopback). Clients then use `tls://`.
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    # The CA the services verify the bus's certificate against (a private CA's, such as
    # cert-manager's `ca.crt`); None: the system trust store.
    nats_tls_ca: Path | None = None
    database_url: str | None = None
    redis_url: str | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    http_port_explicit: bool = False
    nats_port: int = 4222
    nats_port_explicit: bool = False
    # The embedded server's MQTT listener for devices; 0 turns it off (with NATS_URL set
    # there is no embedded server: MQTT is that server's business).
    mqtt_port: int = 1883
    mqtt_port_explicit: bool = False
    health_port: int = 0
    log_level: str = "INFO"
    admin_password: str | None = None
    heartbeat_timeout_s: float = 30.0
    # How often each process rewrites its status (`libs.service_status`); a reader sees it
    # gone after three missed writes.
    status_interval_s: float = 5.0
    demo_rule_for_s: float = 10.0
    stream_replicas: int = 1
    nats_sync: str = "1s"
    # JetStream's storage limit on each server in bytes (`max_file_store`), which the
    # streams' byte budgets share; None: the embedded server's is chosen at start from the
    # free disk (`libs.embedded_nats.max_store`) and the launcher passes the result on;
    # an external bus's is unknown (no budgets).
    nats_max_store: int | None = None
    rules_partitions: int = 1
    # Device events are spread over this many partitions by device id (the EVENTS stream's
    # subject transform), fixed at install; and how many actors processes `smarthome up`
    # runs to share them.
    actor_partitions: int = 16
    actor_processes: int = 1
    # The CPU priority (nice) `smarthome up` gives the work that can wait (`services.launcher.
    # cli.BACKGROUND`): on a busy machine the live path runs first.
    background_nice: int = 19
    rule_traces_keep: int = 100
    rule_traces_days: float = 30.0
    # The recorder's retention, in days (Home Assistant's purge_keep_days): raw history,
    # its hourly statistics, the audit log.
    history_keep_days: float = 10.0
    statistics_keep_days: float = 730.0
    audit_keep_days: float = 365.0
    # CIDRs where webhooks of administrators may reach private, loopback or link-local
    # addresses (a home's Node-RED, a NAS); empty: nowhere but public addresses.
    webhook_allow_nets: tuple[str, ...] = ()
    webhook_timeout_s: float = 10.0
    webhook_retry_base_s: float = 1.0
    webhook_retry_for_s: float = 86400.0
    max_streams_per_client: int = 20
    # HTTP authentication: the key that signs access tokens (None: the gateway keeps one in
    # the data dir), their lifetimes, and the per-principal write limit.
    jwt_secret: str | None = None
    access_token_ttl_s: float = 900.0
    refresh_token_ttl_s: float = 30 * 86400.0
    writes_per_minute: int = 600
    logins_per_minute_per_address: int = 30
    # The browser's side: origins whose pages may write and open WebSockets (empty: the
    # gateway's own), the Host names it answers to (empty: the addresses it listens on).
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    # Proxies whose X-Forwarded-For is believed (CIDRs); none by default.
    trusted_proxies: tuple[str, ...] = ()

    @property
    def effective_database_url(self) -> str:
        """DATABASE_URL, or SQLite in the data dir; always with an async driver."""
        if self.database_url:
            return async_database_url(self.database_url)
        return f"sqlite+aiosqlite:///{(self.data_dir / 'smarthome.db').resolve()}"

    @property
    def effective_nats_url(self) -> str:
        return self.nats_url or f"nats://127.0.0.1:{self.nats_port}"


def async_database_url(url: str) -> str:
    """Accept the usual `postgresql://` spelling and pick the async driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    if url.startswith("sqlite://") and "+aiosqlite" not in url:
        return url.replace("sqlite://", "sqlite+aiosqlite://", 1)
    return url


def load() -> Settings:
    """Read the environment once; raise SettingsError naming the bad variable."""
    http_port, http_explicit = _port("SMARTHOME_HTTP_PORT", 8000)
    nats_port, nats_explicit = _port("SMARTHOME_NATS_PORT", 4222)
    mqtt_port, mqtt_explicit = _port("SMARTHOME_MQTT_PORT", 1883)
    health_port, _ = _port("SMARTHOME_HEALTH_PORT", 0)
    level = os.environ.get("SMARTHOME_LOG_LEVEL", "INFO").upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise SettingsError(f"SMARTHOME_LOG_LEVEL={level!r} is not a log level")
    return Settings(
        data_dir=Path(os.environ.get("SMARTHOME_DATA_DIR") or ".smarthome"),
        nats_url=os.environ.get("NATS_URL") or None,
        nats_user=os.environ.get("SMARTHOME_NATS_USER") or None,
        nats_password=os.environ.get("SMARTHOME_NATS_PASSWORD") or None,
        nats_system_password=os.environ.get("SMARTHOME_NATS_SYSTEM_PASSWORD") or None,
        bus_issuer_seed=os.environ.get("SMARTHOME_BUS_ISSUER_SEED") or None,
        **_nats_tls(),
        nats_tls_ca=_nats_tls_ca(),
        database_url=os.environ.get("DATABASE_URL") or None,
        redis_url=os.environ.get("REDIS_URL") or None,
        http_host=os.environ.get("SMARTHOME_HTTP_HOST") or "127.0.0.1",
        http_port=http_port,
        http_port_explicit=http_explicit,
        nats_port=nats_port,
        nats_port_explicit=nats_explicit,
        mqtt_port=mqtt_port,
        mqtt_port_explicit=mqtt_explicit,
        health_port=health_port,
        log_level=level,
        admin_password=os.environ.get("SMARTHOME_ADMIN_PASSWORD") or None,
        heartbeat_timeout_s=_float("SMARTHOME_HEARTBEAT_TIMEOUT", 30.0),
        status_interval_s=_positive("SMARTHOME_STATUS_INTERVAL_S", 5.0),
        demo_rule_for_s=_float("SMARTHOME_DEMO_RULE_FOR", 10.0),
        stream_replicas=_replicas(),
        nats_sync=_sync(),
        nats_max_store=_max_store(),
        rules_partitions=_rules_partitions(),
        actor_partitions=_at_most("SMARTHOME_ACTOR_PARTITIONS", 16, 1024),
        actor_processes=_at_most("SMARTHOME_ACTOR_PROCESSES", 1, 64),
        background_nice=_nice("SMARTHOME_BACKGROUND_NICE", 19),
        rule_traces_keep=int(_float("SMARTHOME_RULE_TRACES_KEEP", 100)),
        rule_traces_days=_float("SMARTHOME_RULE_TRACES_DAYS", 30.0),
        history_keep_days=_positive("SMARTHOME_HISTORY_KEEP_DAYS", 10.0),
        statistics_keep_days=_positive("SMARTHOME_STATISTICS_KEEP_DAYS", 730.0),
        audit_keep_days=_positive("SMARTHOME_AUDIT_KEEP_DAYS", 365.0),
        webhook_allow_nets=_networks("SMARTHOME_WEBHOOK_ALLOW_NETS"),
        webhook_timeout_s=_positive("SMARTHOME_WEBHOOK_TIMEOUT", 10.0),
        webhook_retry_base_s=_positive("SMARTHOME_WEBHOOK_RETRY_BASE", 1.0),
        webhook_retry_for_s=_positive("SMARTHOME_WEBHOOK_RETRY_FOR", 86400.0),
        max_streams_per_client=_at_least_one("SMARTHOME_MAX_STREAMS_PER_CLIENT", 20),
        jwt_secret=_jwt_secret(),
        access_token_ttl_s=_positive("SMARTHOME_ACCESS_TOKEN_TTL", 900.0),
        refresh_token_ttl_s=_positive("SMARTHOME_REFRESH_TOKEN_TTL", 30 * 86400.0),
        writes_per_minute=int(_non_negative("SMARTHOME_WRITES_PER_MINUTE", 600)),
        logins_per_minute_per_address=_at_least_one("SMARTHOME_LOGINS_PER_MINUTE", 30),
        allowed_origins=_list("SMARTHOME_ALLOWED_ORIGINS"),
        allowed_hosts=_list("SMARTHOME_ALLOWED_HOSTS"),
        trusted_proxies=_networks("SMARTHOME_TRUSTED_PROXIES"),
    )


def _list(name: str) -> tuple[str, ...]:
    """A comma-separated list; blanks dropped."""
    return tuple(item.strip() for item in (os.environ.get(name) or "").split(",") if item.strip())


def _networks(name: str) -> tuple[str, ...]:
    """A comma-separated list of CIDRs (a bare address is a /32 or /128)."""
    values = _list(name)
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise SettingsError(f"{name}: {value!r} is not an address or a CIDR") from None
    return values


def _jwt_secret() -> str | None:
    raw = os.environ.get("SMARTHOME_JWT_SECRET") or None
    if raw is not None and len(raw) < 32:
        raise SettingsError("SMARTHOME_JWT_SECRET must be at least 32 characters")
    return raw


def _nats_tls() -> dict[str, Path | None]:
    cert = os.environ.get("SMARTHOME_NATS_TLS_CERT") or None
    key = os.environ.get("SMARTHOME_NATS_TLS_KEY") or None
    if bool(cert) != bool(key):
        raise SettingsError("SMARTHOME_NATS_TLS_CERT and SMARTHOME_NATS_TLS_KEY go together")
    for name, value in (("SMARTHOME_NATS_TLS_CERT", cert), ("SMARTHOME_NATS_TLS_KEY", key)):
        if value and not Path(value).is_file():
            raise SettingsError(f"{name}={value!r} is not a file")
    return {
        "nats_tls_cert": Path(cert).resolve() if cert else None,
        "nats_tls_key": Path(key).resolve() if key else None,
    }


def _nats_tls_ca() -> Path | None:
    ca = os.environ.get("SMARTHOME_NATS_TLS_CA") or None
    if ca and not Path(ca).is_file():
        raise SettingsError(f"SMARTHOME_NATS_TLS_CA={ca!r} is not a file")
    return Path(ca).resolve() if ca else None


def _at_least_one(name: str, default: int) -> int:
    raw = os.environ.get(name) or str(default)
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise SettingsError(f"{name}={raw!r} must be a whole number of at least 1")
    return value


def _rules_partitions() -> int:
    """Rules are split by id into this many partitions, each evaluated by one rules process
    at a time: set it to the number of rules processes that should work side by side."""
    value = _at_least_one("SMARTHOME_RULES_PARTITIONS", 1)
    if value > 64:
        raise SettingsError(f"SMARTHOME_RULES_PARTITIONS={value} must be at most 64")
    return value


def _at_most(name: str, default: int, most: int) -> int:
    value = _at_least_one(name, default)
    if value > most:
        raise SettingsError(f"{name}={value} must be at most {most}")
    return value


def _nice(name: str, default: int) -> int:
    """A niceness to add, 0 (as the launcher) to 19 (the lowest priority)."""
    value = _float(name, default)
    if value != int(value) or not 0 <= value <= 19:
        raise SettingsError(f"{name}={value:g} must be a whole number from 0 to 19")
    return int(value)


def _non_negative(name: str, default: float) -> float:
    value = _float(name, default)
    if value < 0:
        raise SettingsError(f"{name}={value!r} must be 0 or more")
    return value


def _positive(name: str, default: float) -> float:
    value = _float(name, default)
    if value <= 0:
        raise SettingsError(f"{name}={value!r} must be greater than 0")
    return value


def _sync() -> str:
    """How often the embedded nats-server flushes JetStream to disk.

    Default `1s`, like Redis's `appendfsync everysec`: a kill -9 of any process (the bus
    included) loses nothing, since written messages sit in the OS page cache; a power cut
    loses at most the last second. `always` fsyncs each message before its ack (survives a
    power cut, but costs a disk flush per message: latency under load, SD-card wear);
    `2m` is the NATS default. On a cluster, replication (R3) is what makes writes durable."""
    raw = (os.environ.get("SMARTHOME_NATS_SYNC") or Settings.nats_sync).strip()
    if raw != "always" and not re.fullmatch(r"\d+(ms|s|m|h)", raw):
        raise SettingsError(f"SMARTHOME_NATS_SYNC={raw!r} must be 'always' or like 30s, 2m")
    return raw


_SIZE = re.compile(
    r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]?)(?P<binary>iB|i|B)?", re.IGNORECASE
)


def _max_store() -> int | None:
    """SMARTHOME_NATS_MAX_STORE: how much JetStream may store on each server, in bytes or
    with a unit as nats-server and Kubernetes read it (`9Gi`, `10GB`, `512MiB`: binary;
    `10G`, `500M`: decimal), or `auto` (the default): half of what the embedded server
    could have on its volume at start (`libs.embedded_nats.max_store`), the rest left to the
    database and logs. Each stream gets its share as a byte budget (`libs.bus.STREAM_STORE_SHARES`).
    Past the whole limit publishing is refused (HTTP 507) before the disk is full, and goes
    on once space is freed."""
    raw = (os.environ.get("SMARTHOME_NATS_MAX_STORE") or "auto").strip()
    if raw.lower() == "auto":
        return None
    match = _SIZE.fullmatch(raw)
    if match is None:
        raise SettingsError(
            f"SMARTHOME_NATS_MAX_STORE={raw!r} must be 'auto' or a size like 10GB, 9Gi, 512MB"
        )
    base = 1024 if match["binary"] or not match["unit"] else 1000
    size = int(float(match["number"]) * base ** " KMGT".index(match["unit"].upper() or " "))
    if size < 1024 * 1024:
        raise SettingsError(f"SMARTHOME_NATS_MAX_STORE={raw!r} must be at least 1MB")
    return size


def _replicas() -> int:
    """JetStream replicas of each stream: 1 on one machine, 3 on a 3-node cluster."""
    raw = os.environ.get("SMARTHOME_STREAM_REPLICAS") or "1"
    if raw not in ("1", "3", "5"):
        raise SettingsError(f"SMARTHOME_STREAM_REPLICAS={raw!r} must be 1, 3 or 5")
    return int(raw)
