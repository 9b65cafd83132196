"""Rule bodies: a user writes a `libs.messages.RuleSpec`; the API answers `RuleView`s and the
traces the rules service left (`RuleRunView`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from libs.messages import AttributeValue, RuleSpec


class RuleView(RuleSpec, frozen=True, kw_only=True):
    """A stored rule: what the user wrote (with its `id`), `version` (increments on every
    replacement) and when it was created and last changed."""

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
