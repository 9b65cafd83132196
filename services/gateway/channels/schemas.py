"""Notification channel bodies: a user writes a `ChannelCreate` (its secret included); what
the API answers afterwards says only that a secret is set."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from libs import messages as m
from services.gateway.deliveries import DeliveryStatus


class ChannelCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A channel: where the alerts of rules whose `notify` action names it go."""

    name: m.Name
    config: Annotated[
        m.ChannelConfig,
        msgspec.Meta(
            description="by `kind`: `email` (SMTP: `host`, `port`, `security` starttls, tls "
            "or none, `username` and `password`, `from`, `to`), `slack` (a Slack-compatible "
            "incoming-webhook `url`) or `ntfy` (`server`, `topic`, `token`). The password, "
            "the webhook URL and the token are write-only."
        ),
    ]
    home: Annotated[
        m.Token | None,
        msgspec.Meta(
            description="the home whose rules may notify it; a resident's channel always has "
            "one (its only home when omitted)"
        ),
    ] = None


class EmailSettings(msgspec.Struct, tag="email", tag_field="kind", frozen=True):
    host: str
    port: int
    security: str
    username: str | None
    from_: str = msgspec.field(name="from")
    to: list[str] = []


class SlackSettings(msgspec.Struct, tag="slack", tag_field="kind", frozen=True):
    """Only the webhook's host: its path carries the token."""

    host: str


class NtfySettings(msgspec.Struct, tag="ntfy", tag_field="kind", frozen=True):
    server: str
    topic: str


class Channel(msgspec.Struct, frozen=True):
    """A notification channel, without its secret: `secret_set` says whether one is stored
    (an SMTP password, a webhook URL, an ntfy token). `delivered` counts the notifications
    delivered (written about once a second)."""

    id: str
    name: str
    kind: str
    config: EmailSettings | SlackSettings | NtfySettings
    secret_set: bool
    enabled: bool
    home: str | None
    created_by: str
    created_at: datetime
    delivered: int
    last_delivered_at: datetime | None


class ChannelPage(msgspec.Struct, frozen=True):
    """A page of channels; `next_cursor` continues it."""

    items: list[Channel]
    next_cursor: str | None


class ChannelDelivery(msgspec.Struct, frozen=True):
    """One notification to a channel that did not succeed on its first attempt: `pending`
    while retried, then `delivered` or `failed` (re-drivable). `last_error` says why the last
    attempt failed (`5xx: SMTP 550: the recipients were refused`, `4xx: HTTP 404`), never in
    the server's words; `last_status_code` is the HTTP status or the SMTP reply code."""

    id: int
    channel_id: str
    event_id: str
    subject: str
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None


class ChannelDeliveryPage(msgspec.Struct, frozen=True):
    """A page of deliveries, oldest first; `next_cursor` continues it."""

    items: list[ChannelDelivery]
    next_cursor: str | None
