"""Sending a command to a device: the record first (status `pending`), then the bus.

Used by the gateway (a user's command) and the rules service (a rule's action).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus, subjects
from libs import messages as m
from libs.db.engine import insert_ignoring_duplicates
from libs.db.models import CommandRecord


async def send(
    sessions: async_sessionmaker[AsyncSession],
    js: JetStreamContext,
    *,
    device_id: str,
    action: str,
    params: dict[str, Any],
    expires_s: float,
    issued_by: str,
    correlation_id: str,
    command_id: str | None = None,
) -> m.Command:
    """Record and publish a command. A repeated `command_id` is stored and published once."""
    issued = m.now()
    command = m.Command(
        id=command_id or m.new_id(),
        device_id=device_id,
        action=action,
        params=params,
        issued_at=issued,
        expires_at=issued + timedelta(seconds=expires_s),
        issued_by=issued_by,
        correlation_id=correlation_id,
    )
    row = {
        "id": command.id,
        "device_id": device_id,
        "action": action,
        "params": params,
        "status": "pending",
        "issued_by": issued_by,
        "correlation_id": correlation_id,
        "issued_at": command.issued_at,
        "expires_at": command.expires_at,
        "updated_at": issued,
    }
    async with sessions.begin() as session:
        insert = insert_ignoring_duplicates(session.bind, CommandRecord.__table__)  # type: ignore[arg-type]
        await session.execute(insert, [row])
    await bus.publish(js, subjects.commands(device_id), command, msg_id=command.id)
    return command


def effective_status(record: CommandRecord) -> str:
    """A command nobody answered before its expiry reads as `expired`."""
    if record.status in ("pending", "delivered") and record.expires_at < m.now():
        return "expired"
    return record.status
