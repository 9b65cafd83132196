"""Signed webhooks, shared by the gateway (which creates subscriptions) and the webhooks service
(which delivers them): secrets and signatures after the Standard Webhooks spec, the check that
refuses URLs into the platform's own network (SSRF), the retry schedule, and the durable
consumer each subscription reads from. Pure apart from the DNS lookup in `check_url`.
"""

from __future__ import annotations

import base64
import binascii
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
from urllib.parse import urlsplit

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

ALLOW_PRIVATE_ENV = "SMARTHOME_WEBHOOK_ALLOW_PRIVATE"
_HOW_TO_ALLOW = f"set {ALLOW_PRIVATE_ENV}=1 to allow it"
# Cloud instance metadata endpoints (AWS/GCP/Azure/Oracle, ECS tasks, Alibaba, AWS over IPv6).
METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")

Resolver = Callable[[str, int], Iterable[str]]


def _resolve(host: str, port: int) -> list[str]:
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def refused_range(address: str) -> str | None:
    """Why a webhook may not go to `address` (`loopback`, ...), or None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone (`fe80::1%eth0`)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA:
        return "cloud metadata"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_unspecified or (ip.version == 4 and ip in _THIS_NETWORK):
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    return None


def check_url(url: str, allow_private: bool, resolve: Resolver = _resolve) -> None:
    """Refuse a URL that is not http(s), or whose host resolves to a loopback, link-local,
    metadata or unspecified address (unless `allow_private`); ValueError says why.

    Private LAN ranges (192.168/16, 10/8, ...) stay allowed: a home's webhook receivers
    (Node-RED, a NAS) usually live there.
    """
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
    if allow_private:
        return
    try:
        addresses = list(resolve(host, port))
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"host {host!r} does not resolve ({exc})") from None
    for address in addresses:
        reason = refused_range(address)
        if reason:
            shown = host if host == address else f"{host} ({address})"
            article = "an" if reason[0] in "aeiou" else "a"
            raise ValueError(
                f"{shown} is {article} {reason} address, which webhooks may not reach "
                f"(SSRF protection); {_HOW_TO_ALLOW}"
            )


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


def check_filter(filter_subject: str) -> str:
    """The stream a subscription's filter reads from; ValueError when it is not a filter under
    one of the platform's streams (`events.*.telemetry`, `system.alert.>`)."""
    if not subjects.is_filter(filter_subject):
        raise ValueError(
            f"{filter_subject!r} is not a subject filter: tokens of A-Z a-z 0-9 _ - separated "
            "by dots, `*` for one token, `>` for the rest"
        )
    stream = subjects.stream_of(filter_subject)
    if stream is None or "." not in filter_subject:
        raise ValueError(
            f"{filter_subject!r} must start with events., commands., system. or deadletter."
        )
    return stream


def consumer_name(subscription_id: str) -> str:
    return f"webhook-{subscription_id}"


def notify_consumer_name(subscription_id: str) -> str:
    """The consumer of the notifications rules address to the subscription (SYSTEM stream)."""
    return f"webhook-{subscription_id}-notify"


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
    start_seq: int | None = None,
) -> ConsumerConfig:
    """Created with the subscription, so events published after it are kept for it even while
    the webhooks service is down (`start_seq`: made again by the service, from where it was).

    The worker acks a prefix (AckPolicy.ALL) of what it delivered in order: one ack per batch.
    `max_ack_pending` bounds what is in flight per subscription: two fetches' worth, so that
    the next fetch is never refused while the previous batch's ack is still on its way. A
    failing event holds back the ones behind it (the worker retries it and fetches nothing
    else), and no other subscription's."""
    window = fetch_size(batch_size)
    return ConsumerConfig(
        durable_name=durable or consumer_name(subscription_id),
        filter_subject=filter_subject,
        deliver_policy=DeliverPolicy.NEW if start_seq is None else DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start_seq,
        ack_policy=AckPolicy.ALL,
        ack_wait=ack_wait_s,
        max_ack_pending=2 * window,
        max_deliver=-1,
    )


def notify_consumer_config(
    subscription_id: str,
    ack_wait_s: float,
    batch_size: int | None = None,
    *,
    start_seq: int | None = None,
) -> ConsumerConfig:
    """The notifications addressed to the subscription (`system.notify.<id>`), whatever its
    filter: delivered the same way, by a worker of their own."""
    return consumer_config(
        subscription_id,
        subjects.notification(subscription_id),
        ack_wait_s,
        batch_size,
        durable=notify_consumer_name(subscription_id),
        start_seq=start_seq,
    )


# --- subjects (to move into libs.subjects) -----------------------------------------------------

SUBSCRIPTIONS_CHANGED_ALL = "system.subscription.*.changed"


def subscription_changed(subscription_id: str) -> str:
    """A subscription was created, deleted or re-driven: the webhooks service reloads it."""
    return f"system.subscription.{subscription_id}.changed"


def parse_subscription_changed(subject: str) -> str:
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["system", "subscription"] or parts[3] != "changed":
        raise ValueError(f"{subject!r} is not system.subscription.<id>.changed")
    return parts[2]


def parse_notification(subject: str) -> str:
    """The subscription id of `system.notify.<id>`; ValueError if it is not one."""
    parts = subject.split(".")
    if len(parts) != 3 or parts[:2] != ["system", "notify"] or not subjects.is_token(parts[2]):
        raise ValueError(f"{subject!r} is not system.notify.<subscription_id>")
    return parts[2]


# --- settings (read in libs.settings) ---------------------------------------------------


@dataclass(frozen=True)
class WebhookSettings:
    allow_private: bool = False
    timeout_s: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @property
    def ack_wait_s(self) -> float:
        """Long enough for one POST and its bookkeeping (the worker marks what it holds as in
        progress before each POST and while it waits to retry)."""
        return self.timeout_s + 10.0

    @classmethod
    def of(cls, settings: Settings) -> WebhookSettings:
        """From the platform settings (SMARTHOME_WEBHOOK_ALLOW_PRIVATE, _TIMEOUT, _RETRY_*)."""
        return cls(
            allow_private=settings.webhook_allow_private,
            timeout_s=settings.webhook_timeout_s,
            retry=RetryPolicy(
                base_s=settings.webhook_retry_base_s, retry_for_s=settings.webhook_retry_for_s
            ),
        )
