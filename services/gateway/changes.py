"""A user's change to a location, a rule or a webhook subscription, told to the bus as a
`ChangeFact`: the service that acts on it reloads, the recorder audits it."""

from __future__ import annotations

from typing import Any, Literal

from nats.js import JetStreamContext

from libs import bus
from libs import messages as m

What = Literal["location", "rule", "subscription", "user", "apikey"]
Change = Literal["created", "updated", "deleted", "redelivered", "revoked"]


async def publish_change(
    js: JetStreamContext,
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
    """`home`: what changed belongs to it (its residents see the fact and its audit row)."""
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
    await bus.publish(js, subject, fact, msg_id=m.new_id())
