"""Signed webhooks, shared by the gateway (which creates subscriptions) and the webhooks service
(which delivers them): secrets and signatures after the Standard Webhooks spec, the check that
refuses URLs into the platform's own network (SSRF), the retry schedule, and the durable
consumer each subscription reads from. Pure apart from the DNS lookup in `check_url`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import ipaddress
import random
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from urllib.parse import urlsplit, urlunsplit

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from libs import subjects
from libs.settings import Settings

# --- Standard Webhooks: headers, secrets, signatures -----------------------------------------

HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
# A receiver refuses a timestamp further than this from its clock (replays).
TOLERANCE_S = 300

# Delivery statuses (`deliveries.status`). An event delivered on its first attempt leaves no
# row (it is counted on the subscription). A `pending` row with a `next_attempt_at` is being
# retried by the subscription's worker; a `pending` row without one was re-driven by a user
# from the dead-letter list (`failed`) and is sent again from the stream by its sequence.
PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
# Where a delivery's event came from (`deliveries.source`): the subscription's filter, or a
# rule's notification addressed to it.
FROM_FILTER = "filter"
FROM_NOTIFY = "notify"


class Failure(StrEnum):
    """Why an attempt failed, as a delivery record shows it (`last_error` starts with it).
    Never the receiver's own words: a record that showed an answer's body (or an error that
    quotes an address) would make webhooks a way to read what a private address serves."""

    TIMEOUT = "timeout"
    REFUSED = "refused"  # the connection was refused: nothing listens there
    TLS = "tls"
    DNS = "dns"
    BLOCKED = "blocked"  # an address webhooks may not reach (SSRF)
    CONNECTION = "connection"  # reset, unreachable, closed early, not HTTP
    INVALID = "invalid"  # a request that could not be sent (a header the event made)
    GONE = "gone"  # a re-driven event no longer in the stream
    REDIRECT = "3xx"  # not followed: it could lead where webhooks may not go
    CLIENT_ERROR = "4xx"
    SERVER_ERROR = "5xx"

    @classmethod
    def of_status(cls, status: int) -> Failure:
        """The class of an HTTP status that is no success."""
        if 300 <= status < 400:
            return cls.REDIRECT
        return cls.CLIENT_ERROR if 400 <= status < 500 else cls.SERVER_ERROR


def new_secret() -> str:
    """A fresh `whsec_<base64>` secret: 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key in `whsec_<base64>`; ValueError saying what a valid secret looks like."""
    expected = "a secret is `whsec_` followed by the base64 of 24 to 64 random bytes"
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(expected)
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{expected} (not valid base64)") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"{expected} (got {len(key)} bytes)")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "{msg_id}.{timestamp}.{body}">`."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        HEADER_ID: msg_id,
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_SIGNATURE: sign(secret, msg_id, timestamp, body),
    }


def verify(
    secret: str,
    msg_id: str,
    timestamp: str | int,
    body: bytes,
    signature_header: str,
    *,
    now: float | None = None,
    tolerance_s: float = TOLERANCE_S,
) -> bool:
    """What a receiver checks: a fresh timestamp and one matching `v1` signature among the
    space-separated ones in `webhook-signature` (several during a secret rotation)."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    expected = sign(secret, msg_id, ts, body).encode()
    return any(
        hmac.compare_digest(candidate.encode(), expected)
        for candidate in signature_header.split()
        if candidate.startswith("v1,")
    )


# --- where a webhook may go (SSRF) -----------------------------------------------------------

ALLOW_NETS_ENV = "SMARTHOME_WEBHOOK_ALLOW_NETS"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud instance metadata endpoints (AWS/GCP/Azure/Oracle, ECS tasks, Alibaba, AWS over IPv6).
METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# A home network's: RFC 1918, IPv6 unique local and (deprecated) site-local addresses.
_LANS = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fec0::/10")
)

Resolver = Callable[[str, int], Iterable[str]]


def _resolve(host: str, port: int) -> list[str]:
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (`::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4
    `2002:AABB:CCDD::/48`, `::a.b.c.d`), which is where a packet to it ends up; else `ip`."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    # `::` and `::1` are IPv6's own unspecified and loopback addresses, not IPv4 ones.
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


@dataclass(frozen=True)
class Destination:
    """What an address is to a webhook: `range` names a non-public one (None: public);
    `never` marks the ranges no webhook reaches, whoever asks."""

    address: IPAddress  # unwrapped
    range: str | None
    never: bool = False


def classify(address: str) -> Destination:
    """Where `address` (IPv4 or IPv6, an IPv6 zone allowed) leads; ValueError if it is none."""
    ip = unwrap(ipaddress.ip_address(address.split("%", 1)[0]))  # drop a zone (`fe80::1%eth0`)
    if ip.is_unspecified or ip in _THIS_NETWORK:
        return Destination(ip, "unspecified", never=True)
    if ip.is_multicast:
        return Destination(ip, "multicast", never=True)
    if ip in METADATA:
        return Destination(ip, "cloud metadata")
    if ip.is_loopback:
        return Destination(ip, "loopback")
    if ip.is_link_local:
        return Destination(ip, "link-local")
    # After loopback: IPv6's reserved ::/8 holds ::1. IPv4's holds 240/4 and the broadcast.
    if ip.is_reserved:
        return Destination(ip, "reserved", never=True)
    if ip in _SHARED:
        return Destination(ip, "shared (carrier-grade NAT)")
    if any(ip in net for net in _LANS):
        return Destination(ip, "private")
    if ip.is_global:
        return Destination(ip, None)
    return Destination(ip, "non-public")  # documentation, benchmarking, IETF protocol ranges


def allow_nets(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """The networks of SMARTHOME_WEBHOOK_ALLOW_NETS (checked when the settings were read;
    a bare address is a /32 or /128, host bits are ignored)."""
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def refused_range(
    address: str, nets: Iterable[IPNetwork] = (), *, allow_private_targets: bool = False
) -> str | None:
    """Why a webhook may not go to `address` (`a loopback address outside ...`), or None when
    it may: a public address always; a private, loopback, link-local, shared or metadata one
    only with `allow_private_targets` (its creator is an administrator) and inside one of
    `nets`; a multicast, unspecified or reserved one never."""
    where = classify(address)
    if where.range is None:
        return None
    article = "an" if where.range[0] in "aeiou" else "a"
    what = f"{article} {where.range} address"
    if where.never:
        return f"{what}, which webhooks never reach"
    if not allow_private_targets:
        return f"{what}, which only an administrator may target"
    if not any(where.address in net for net in nets):
        return f"{what} outside {ALLOW_NETS_ENV}"
    return None


def parse_url(url: str) -> tuple[str, int]:
    """The host and port of an http(s) URL; ValueError says what is wrong with it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        given = f"not `{parts.scheme}`" if parts.scheme else "it has no scheme"
        raise ValueError(f"must be an http:// or https:// URL ({given})")
    host = parts.hostname
    if not host:
        raise ValueError("must name a host (`https://host/path`)")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError("has a port that is not a number between 0 and 65535") from None
    return host, port


def is_address(host: str) -> bool:
    """Whether a URL's host (without its `[...]`) is an IP address rather than a name."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def check_url(
    url: str,
    nets: Iterable[IPNetwork] = (),
    *,
    allow_private_targets: bool,
    resolve: Resolver = _resolve,
) -> None:
    """Refuse a URL that is not http(s), or whose host is or resolves to an address a webhook
    may not reach (`refused_range`); ValueError says why. The sender checks the addresses
    again on every connection: a name may resolve elsewhere by then."""
    host, port = parse_url(url)
    if is_address(host):
        reason = refused_range(host, nets, allow_private_targets=allow_private_targets)
        if reason:
            unwrapped = str(classify(host).address)
            that_is = "" if unwrapped == host.split("%", 1)[0] else f" (that is {unwrapped})"
            raise ValueError(f"{host}{that_is} is {reason} (SSRF protection)")
        return
    try:
        addresses = list(resolve(host, port))
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"host {host!r} does not resolve ({exc})") from None
    if not addresses:
        raise ValueError(f"host {host!r} does not resolve")
    nets = tuple(nets)
    for address in addresses:
        reason = refused_range(address, nets, allow_private_targets=allow_private_targets)
        if reason:  # not the address: the platform's DNS answers are not the caller's to read
            raise ValueError(f"{host} resolves to {reason} (SSRF protection)")


def shown_url(url: str, *, path: bool = True) -> str:
    """What answers, errors and the audit show of a URL: its scheme, host and port, and its
    path unless `path` is false (a Slack-compatible webhook's path is its token); never its
    user info, query or fragment (tokens hide there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    with contextlib.suppress(ValueError):  # a port that is no number is left out
        if parts.port is not None:
            netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path if path else "", "", ""))


# --- retries ---------------------------------------------------------------------------------


def backoff(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Exponential back-off with full jitter: uniform in [0, min(cap, base * 2^(attempt-1))]
    for the `attempt`-th failure (from 1). Jitter spreads the retries of many subscriptions
    that failed together (an endpoint that came back) over the window."""
    ceiling = min(cap_s, base_s * 2.0 ** min(max(attempt, 1) - 1, 60))
    return rng.uniform(0.0, ceiling)


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 1.0
    cap_s: float = 3600.0
    retry_for_s: float = 86400.0


def retry_delay(
    policy: RetryPolicy,
    attempts: int,
    first_attempt_at: datetime,
    now: datetime,
    rng: random.Random,
) -> float | None:
    """After `attempts` failed attempts: seconds until the next one, or None when the retry
    window is over (the delivery is dead-lettered). The last attempt falls on the window's
    end, so an endpoint is tried for at least `retry_for_s`."""
    remaining = policy.retry_for_s - (now - first_attempt_at).total_seconds()
    if remaining <= 0:
        return None
    return min(backoff(attempts, policy.base_s, policy.cap_s, rng), remaining)


# --- the durable consumer of a subscription ----------------------------------------------------


# How many events a subscription's worker fetches at once in the one-event-per-request modes
# (then POSTs one after the other, in order).
FETCH_BATCH = 100
# Batched mode: at most this many events in one request (the subscription's `batch_size`).
DEFAULT_BATCH_SIZE = 100
MAX_BATCH_SIZE = 1000


def fetch_size(batch_size: int | None) -> int:
    """Events fetched at once: enough for one full request in batched mode."""
    return max(FETCH_BATCH, batch_size or 0)


def consumer_config(
    subscription_id: str,
    filter_subject: str,
    ack_wait_s: float,
    batch_size: int | None = None,
    *,
    durable: str | None = None,
    partition_first: bool = True,
) -> ConsumerConfig:
    """Created with the subscription, so events published after it are kept for it even while
    the webhooks service is down. `partition_first`: the EVENTS stream's layout
    (`libs.bus.partition_first`), which its filter on stored subjects follows.

    The worker acks a prefix (AckPolicy.ALL) of what it delivered in order: one ack per batch.
    `max_ack_pending` bounds what is in flight per subscription: two fetches' worth, so that
    the next fetch is never refused while the previous batch's ack is still on its way. A
    failing event holds back the ones behind it (the worker retries it and fetches nothing
    else), and no other subscription's."""
    window = fetch_size(batch_size)
    return ConsumerConfig(
        durable_name=durable or subjects.webhook_consumer(subscription_id),
        filter_subject=subjects.stored_filter(filter_subject, partition_first),
        deliver_policy=DeliverPolicy.NEW,
        ack_policy=AckPolicy.ALL,
        ack_wait=ack_wait_s,
        max_ack_pending=2 * window,
        max_deliver=-1,
    )


def notify_consumer_config(
    subscription_id: str,
    ack_wait_s: float,
    batch_size: int | None = None,
) -> ConsumerConfig:
    """The notifications addressed to the subscription (`system.notify.<id>`), whatever its
    filter: delivered the same way, by a worker of their own."""
    return consumer_config(
        subscription_id,
        subjects.notification(subscription_id),
        ack_wait_s,
        batch_size,
        durable=subjects.webhook_notify_consumer(subscription_id),
    )


# --- settings (read in libs.settings) ---------------------------------------------------


@dataclass(frozen=True)
class WebhookSettings:
    allow_nets: tuple[IPNetwork, ...] = ()
    timeout_s: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @property
    def ack_wait_s(self) -> float:
        """Long enough for one POST and its bookkeeping (the worker marks what it holds as in
        progress before each POST and while it waits to retry)."""
        return self.timeout_s + 10.0

    @classmethod
    def of(cls, settings: Settings) -> WebhookSettings:
        """From the platform settings (SMARTHOME_WEBHOOK_ALLOW_NETS, _TIMEOUT, _RETRY_*)."""
        return cls(
            allow_nets=allow_nets(settings.webhook_allow_nets),
            timeout_s=settings.webhook_timeout_s,
            retry=RetryPolicy(
                base_s=settings.webhook_retry_base_s, retry_for_s=settings.webhook_retry_for_s
            ),
        )
