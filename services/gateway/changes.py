"""A user's change to a location, a rule or a webhook subscription, told to the bus as a
`ChangeFact`: the service that acts on it reloads, the recorder audits it.

The fact goes into the outbox in the transaction of the change (`libs.outbox`): it is
published after the commit, and never for a change that rolled back."""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession

from libs import messages as m
from libs import outbox

What = Literal["location", "rule", "subscription", "user", "apikey", "channel"]
Change = Literal["created", "updated", "deleted", "redelivered", "revoked"]


def record_change(
    session: AsyncSession,
    subject: str,
    what: What,
    item_id: str,
    change: Change,
    *,
    actor: str,
    correlation_id: str,
    detail: dict[str, Any],
    home: str | None = None,
) -> None:
    """Write the fact in `session`'s transaction. `home`: what changed belongs to it (its
    residents see the fact and its audit row)."""
    fact = m.ChangeFact(
        what=what,
        id=item_id,
        change=change,
        actor=actor,
        correlation_id=correlation_id,
        time=m.now(),
        detail=detail,
        home=home,
    )
    outbox.add(session, subject, fact)
