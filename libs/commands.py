"""Sending a command to a device: the record (status `pending`) and the bus.

The gateway records a user's command first, then publishes it: an error answer means
nothing was sent. The rules service publishes first and records after, so that a rule's
command does not wait for the database (and still goes out while it is down).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Any

from nats.js import JetStreamContext
from prometheus_client import Counter
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus, subjects
from libs import messages as m
from libs.db.engine import HasDialect, upsert
from libs.db.models import CommandRecord

# Each status a command reaches, counted once where it is reached: `pending` by the process
# that sends it (the gateway, the rules), `delivered`/`done`/`failed` as the actors apply the
# device's report, `expired` by the actors' expiry sweep (`expire_overdue`).
STATUSES = Counter("smarthome_commands_total", "Commands reaching each status", ["status"])
# Statuses that wait for the device; past the expiry they read, and are swept to, `expired`.
UNANSWERED = ("pending", "delivered")
EXPIRE_EVERY_S = 15.0

log = logging.getLogger(__name__)


async def send(
    sessions: async_sessionmaker[AsyncSession], js: JetStreamContext, command: m.Command
) -> None:
    """Record, then publish a command (a user's: an error answer means nothing was sent).
    A repeated command id is stored and published once."""
    await record(sessions, command)
    await publish(js, command)


def new(
    *,
    device_id: str,
    action: str,
    params: dict[str, Any],
    expires_s: float,
    issued_by: str,
    correlation_id: str,
    command_id: str | None = None,
) -> m.Command:
    issued = m.now()
    return m.Command(
        id=command_id or m.new_id(),
        device_id=device_id,
        action=action,
        params=params,
        issued_at=issued,
        expires_at=issued + timedelta(seconds=expires_s),
        issued_by=issued_by,
        correlation_id=correlation_id,
    )


async def publish(js: JetStreamContext, command: m.Command) -> None:
    ack = await bus.publish(js, subjects.commands(command.device_id), command, msg_id=command.id)
    if not ack.duplicate:  # a command sent again (a rule re-run) is pending once
        STATUSES.labels("pending").inc()


# What the sender knows of a command. A device's status may reach the database before the
# sender's record (a rule publishes first): the actors then store the status in a stand-in
# row (`stand_in`), which the record fills in, leaving the status as the device reported it.
SENDER_COLUMNS = ("action", "params", "issued_by", "correlation_id", "issued_at", "expires_at")
STAND_IN_ACTION = ""


def stand_in(device_id: str, status: m.CommandStatusData) -> dict[str, Any]:
    """A row for a status whose command is not recorded yet (the sender's record follows)."""
    now = m.now()
    return {
        "id": status.command_id,
        "device_id": device_id,
        "action": STAND_IN_ACTION,
        "params": {},
        "status": status.status,
        "detail": status.detail,
        "issued_by": "",
        "correlation_id": "",
        "issued_at": now,
        "expires_at": now,
        "updated_at": now,
    }


async def record(sessions: async_sessionmaker[AsyncSession], *sent: m.Command) -> None:
    """Store commands (status `pending`) in one write; a repeated id changes nothing, except
    that it fills in a stand-in row."""
    async with sessions.begin() as session:
        await session.execute(
            record_statement(session.get_bind()),
            [row(command) for command in sent],
        )


def record_statement(engine: HasDialect) -> Any:
    """The write of `record`, for rows made by `row`: also the recorder's, which records
    every command from the bus (a rule's command sent while the database was down is
    recorded when it is back)."""
    fills_stand_in = CommandRecord.__table__.c.action == STAND_IN_ACTION
    return upsert(engine, CommandRecord.__table__, "id", SENDER_COLUMNS, where=fills_stand_in)


def row(command: m.Command) -> dict[str, Any]:
    return {
        "id": command.id,
        "device_id": command.device_id,
        "action": command.action,
        "params": command.params,
        "status": "pending",
        "issued_by": command.issued_by,
        "correlation_id": command.correlation_id,
        "issued_at": command.issued_at,
        "expires_at": command.expires_at,
        "updated_at": command.issued_at,
    }


async def expire_overdue(sessions: async_sessionmaker[AsyncSession]) -> int:
    """Mark `expired` the commands nobody answered before their expiry; how many. Several
    processes may sweep at once: each row moves (and is counted) in one of them."""
    table = CommandRecord.__table__.c
    now = m.now()
    async with sessions.begin() as session:
        moved = await session.execute(
            update(CommandRecord)
            .where(
                table.status.in_(UNANSWERED),
                table.expires_at < now,
                table.action != STAND_IN_ACTION,  # its expiry comes with the sender's record
            )
            .values(status="expired", detail="no answer before the expiry", updated_at=now)
        )
    count = int(getattr(moved, "rowcount", 0) or 0)
    STATUSES.labels("expired").inc(count)
    return count


async def expire_forever(
    sessions: async_sessionmaker[AsyncSession], stop: asyncio.Event, every_s: float = EXPIRE_EVERY_S
) -> None:
    """Sweep for expired commands until `stop` is set."""
    while not stop.is_set():
        try:
            await expire_overdue(sessions)
        except Exception as exc:  # the next sweep tries again; readers see the expiry anyway
            log.warning("command expiry sweep failed: %r", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


def effective_status(record: CommandRecord) -> str:
    """A command nobody answered before its expiry reads as `expired`."""
    if record.status in UNANSWERED and record.expires_at < m.now():
        return "expired"
    return record.status
