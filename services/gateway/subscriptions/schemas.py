"""Webhook subscription bodies: a user writes a `SubscriptionCreate`; the secret is answered
once, in `SubscriptionCreated`, and never again."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from libs.messages import Token
from services.gateway.deliveries import DeliveryStatus

Mode = Literal["structured", "binary", "batched"]
DeliverySource = Literal["filter", "notify"]


class SubscriptionCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Events on subjects matching `filter` are POSTed to `url`, signed with `secret`."""

    filter: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=512,
            description="a subject filter under events., commands., system. or deadletter.; "
            "`*` matches one token, `>` the rest (`events.*.telemetry`)",
        ),
    ]
    url: Annotated[str, msgspec.Meta(min_length=1, max_length=2048, description="http(s) URL")]
    mode: Annotated[
        Mode,
        msgspec.Meta(
            description="CloudEvents HTTP binding: `structured` (the event as the JSON body), "
            "`binary` (`data` as the body, attributes in `ce-*` headers), one event per "
            "request; or `batched` (`application/cloudevents-batch+json`: a JSON array of "
            "structured events, in order, up to `batch_size` per request: whatever "
            "accumulated since the previous request goes in the next one)"
        ),
    ] = "structured"
    batch_size: (
        Annotated[
            int,
            msgspec.Meta(
                ge=1,
                le=1000,
                description="`batched` mode only: at most this many events per request "
                "(100 when absent)",
            ),
        ]
        | None
    ) = None
    secret: (
        Annotated[
            str,
            msgspec.Meta(
                max_length=128,
                description="`whsec_<base64 of 24-64 bytes>`; generated when absent",
            ),
        ]
        | None
    ) = None
    home: Annotated[
        Token | None,
        msgspec.Meta(
            description="deliver only the messages about this home (its devices, rules, "
            "locations); a resident's subscription always has one (its only home when "
            "omitted); an administrator's without one gets every message of its filter"
        ),
    ] = None


class Subscription(msgspec.Struct, frozen=True):
    """A webhook subscription (its secret is shown once, when it is created). `delivered`
    counts the events delivered so far (written by the webhooks service about once a second;
    an event sent again after a crash of that service may count twice)."""

    id: str
    filter: str
    url: str
    mode: Mode
    batch_size: int | None
    enabled: bool
    created_by: str
    created_at: datetime
    delivered: int
    last_delivered_at: datetime | None
    home: str | None


class SubscriptionCreated(Subscription, frozen=True):
    """The new subscription with its signing secret: keep it, it is not shown again."""

    secret: str


class SubscriptionPage(msgspec.Struct, frozen=True):
    """A page of subscriptions; `next_cursor` continues it."""

    items: list[Subscription]
    next_cursor: str | None


class DeliveryView(msgspec.Struct, frozen=True):
    """One event's delivery to a subscription that did not succeed on its first attempt:
    `pending` while retried, then `delivered` or `failed` (the dead-letter list,
    re-drivable). An event delivered on its first attempt has no record: it is counted in
    the subscription's `delivered`."""

    id: int
    subscription_id: str
    source: DeliverySource
    event_seq: int
    event_id: str
    webhook_id: str | None
    subject: str
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None


class DeliveryPage(msgspec.Struct, frozen=True):
    """A page of deliveries, oldest first; `next_cursor` continues it."""

    items: list[DeliveryView]
    next_cursor: str | None


class Redelivery(msgspec.Struct, frozen=True):
    """How many failed deliveries were queued to be sent again."""

    redelivered: int
