"""Rule bodies: a user writes a `libs.messages.RuleSpec`; the API answers `RuleView`s, the
traces the rules service left (`RuleRunView`) and dry runs over history (`DryRunResult`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from libs.messages import (
    AttributeValue,
    Condition,
    DurationValue,
    RuleMode,
    RuleSpec,
    ZonedTime,
)


class RuleView(RuleSpec, frozen=True, kw_only=True):
    """A stored rule: what the user wrote (with its `id`), `version` (increments on every
    replacement) and when it was created and last changed."""

    # Optional in what a user writes, always in what the API answers (so required here).
    id: str
    conditions: list[Condition]
    mode: RuleMode
    enabled: bool
    home: str | None
    version: int
    created_at: datetime
    updated_at: datetime


class RuleRunView(msgspec.Struct, frozen=True):
    """One firing, clearing or error of a rule: why, with which values, what it sent."""

    id: int
    rule_id: str
    episode_id: str
    kind: str
    time: datetime
    device_id: str
    reason: str
    values: dict[str, AttributeValue]
    outcomes: list[dict[str, Any]]
    correlation_id: str


class RulePage(msgspec.Struct, frozen=True):
    """A page of rules; `next_cursor` continues it."""

    items: list[RuleView]
    next_cursor: str | None


class RuleRunPage(msgspec.Struct, frozen=True):
    """A page of a rule's runs, newest last; `next_cursor` continues it."""

    items: list[RuleRunView]
    next_cursor: str | None


# --- dry runs ---------------------------------------------------------------------------


class DryRunWindow(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The stretch of recorded history to replay: `since` inclusive, `until` exclusive,
    at most 31 days."""

    since: ZonedTime
    until: ZonedTime


class DryRunRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A rule that is not saved (or not yet), and the history to replay it over."""

    rule: RuleSpec
    since: ZonedTime
    until: ZonedTime

    @property
    def window(self) -> DryRunWindow:
        return DryRunWindow(since=self.since, until=self.until)


class _Send(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    at: datetime
    subject: str | None
    skipped: str | None = None


class WouldCommand(_Send, frozen=True, kw_only=True, tag="command"):
    """A command on `commands.<device_id>`; `skipped` says why the rules service would
    refuse to send it (device not registered or disconnected)."""

    device_id: str
    action: str
    params: dict[str, Any]
    expires_s: float


class WouldSetState(_Send, frozen=True, kw_only=True, tag="set_state"):
    """A `mark` event marking the device `triggered` while the episode lasts."""

    device_id: str
    state: Literal["triggered"]


class WouldNotify(_Send, frozen=True, kw_only=True, tag="notify"):
    """An alert: on `system.notify.<id>` to the webhook subscription or notification channel
    the action names (`subject` says which), else on `system.alert.<rule_id>`."""

    message: str
    severity: str


class WouldPublish(_Send, frozen=True, kw_only=True, tag="publish"):
    """A custom event on `events.<device_id>.<event_type>`."""

    device_id: str
    event_type: str
    data: dict[str, Any]


class WouldDelay(_Send, frozen=True, kw_only=True, tag="delay"):
    """A wait: the actions after it are sent `seconds` later (their `at` says when)."""

    for_: DurationValue = msgspec.field(name="for")
    seconds: float


WouldSend = WouldCommand | WouldSetState | WouldNotify | WouldPublish | WouldDelay


class DryRunFiring(msgspec.Struct, frozen=True):
    """One time the rule would have fired: why, and what it would have sent, in order."""

    at: datetime
    episode_id: str
    device_id: str
    reason: str
    would_send: list[WouldSend]


class DryRunResult(msgspec.Struct, frozen=True):
    """When the rule would have fired over the window; nothing was sent. `evaluated_rows`
    counts the history rows replayed; `truncated` says that only the first firings are
    listed."""

    rule_id: str | None
    since: datetime
    until: datetime
    firings: list[DryRunFiring]
    evaluated_rows: int
    truncated: bool = False
