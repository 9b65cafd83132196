"""User rules: stored in the `rules` table; every change is signalled on
`system.rule.<id>.changed` (an empty message) so that the rules service reloads.

A command action is checked against its target's kind (`libs.capabilities`) when the target
is registered. A target that is not registered yet is accepted: devices may register later,
and until they do the rules service refuses the command at run time and traces why.
"""

from __future__ import annotations

from datetime import datetime

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import capabilities, subjects
from libs import messages as m
from libs.db.models import Device as DeviceRow
from libs.db.models import RuleRecord, RuleRun, Subscription
from libs.errors import Conflict, Invalid, NotFound
from services.gateway.changes import Change, publish_change
from services.gateway.pagination import decode_cursor, page
from services.gateway.resources import require_bus
from services.gateway.rules.dry_run import dry_run
from services.gateway.rules.schemas import (
    DryRunRequest,
    DryRunResult,
    DryRunWindow,
    RulePage,
    RuleRunPage,
    RuleRunView,
    RuleView,
)

# `POST /rules/test` dry-runs a rule body: a rule with this id could not be read or changed.
RESERVED_IDS = frozenset({"test"})
# The id of a rule body tried without one, in its episode ids.
UNSAVED_ID = "unsaved"


class RuleService:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], nc: NATS, js: JetStreamContext
    ) -> None:
        self._sessions = sessions
        self._nc = nc
        self._js = js

    async def create(self, spec: m.RuleSpec, *, actor: str, correlation_id: str) -> RuleView:
        require_bus(self._nc)
        if spec.id in RESERVED_IDS:
            raise Invalid(
                f"{spec.id!r} is reserved (`POST /rules/test` tries a rule)", field="$.id"
            )
        rule_id = spec.id or m.new_id()
        now = m.now()
        async with self._sessions.begin() as session:
            if await session.get(RuleRecord, rule_id) is not None:
                raise Conflict(f"rule {rule_id!r} already exists", field="$.id")
            await check_actions(session, spec)
            record = RuleRecord(
                id=rule_id,
                name=spec.name,
                spec=_stored(spec, rule_id),
                enabled=spec.enabled,
                version=1,
                created_at=now,
                updated_at=now,
            )
            session.add(record)
            await session.flush()
            await self._signal(record, "created", actor, correlation_id)
        return _view(record)

    async def get(self, rule_id: str) -> RuleView:
        async with self._sessions() as session:
            return _view(await self._record(session, rule_id))

    async def list(self, limit: int, cursor: str | None) -> RulePage:
        query = select(RuleRecord).order_by(RuleRecord.id).limit(limit + 1)
        if cursor:
            query = query.where(RuleRecord.id > decode_cursor(cursor, str))
        async with self._sessions() as session:
            records = list(await session.scalars(query))
        return page(records, limit, key=lambda r: r.id, view=_view, into=RulePage)

    async def replace(
        self, rule_id: str, spec: m.RuleSpec, *, actor: str, correlation_id: str
    ) -> RuleView:
        if spec.id is not None and spec.id != rule_id:
            raise Invalid(f"{spec.id!r} is not the id in the path ({rule_id!r})", field="$.id")
        require_bus(self._nc)
        async with self._sessions.begin() as session:
            record = await self._record(session, rule_id)
            await check_actions(session, spec)
            record.name = spec.name
            record.spec = _stored(spec, rule_id)
            record.enabled = spec.enabled
            record.version += 1
            record.updated_at = m.now()
            await session.flush()
            await self._signal(record, "updated", actor, correlation_id)
        return _view(record)

    async def delete(self, rule_id: str, *, actor: str, correlation_id: str) -> None:
        require_bus(self._nc)
        async with self._sessions.begin() as session:
            record = await self._record(session, rule_id)
            await session.delete(record)
            await session.flush()
            await self._signal(record, "deleted", actor, correlation_id)

    async def runs(self, rule_id: str, limit: int, cursor: str | None) -> RuleRunPage:
        """The rule's trace, newest last."""
        query = (
            select(RuleRun)
            .where(RuleRun.rule_id == rule_id)
            .order_by(RuleRun.time, RuleRun.id)
            .limit(limit + 1)
        )
        if cursor:
            time, last_id = decode_cursor(cursor, tuple[datetime, int])
            query = query.where(
                or_(RuleRun.time > time, and_(RuleRun.time == time, RuleRun.id > last_id))
            )
        async with self._sessions() as session:
            await self._record(session, rule_id)
            rows = list(await session.scalars(query))
        return page(rows, limit, key=lambda r: (r.time, r.id), view=_run_view, into=RuleRunPage)

    async def test(self, rule_id: str, window: DryRunWindow) -> DryRunResult:
        """When the stored rule would have fired over the window; sends nothing."""
        async with self._sessions() as session:
            record = await self._record(session, rule_id)
            return await dry_run(session, _rule(record), window, rule_root=None)

    async def test_spec(self, request: DryRunRequest) -> DryRunResult:
        """When a rule body would have fired over the window; sends nothing, stores nothing."""
        spec = request.rule
        async with self._sessions() as session:
            await check_actions(session, spec, root="$.rule")
            rule = m.Rule(
                id=spec.id or UNSAVED_ID,
                name=spec.name,
                trigger=spec.trigger,
                actions=spec.actions,
                enabled=spec.enabled,
                version=0,
                conditions=spec.conditions,
                mode=spec.mode,
            )
            result = await dry_run(session, rule, request.window, rule_root="$.rule")
        return msgspec.structs.replace(result, rule_id=spec.id)

    async def _record(self, session: AsyncSession, rule_id: str) -> RuleRecord:
        record = await session.get(RuleRecord, rule_id)
        if record is None:
            raise NotFound(f"rule {rule_id!r} does not exist")
        return record

    async def _signal(
        self,
        record: RuleRecord,
        change: Change,
        actor: str,
        correlation_id: str,
    ) -> None:
        """The rules service reloads the rule; the recorder audits the change."""
        await publish_change(
            self._js,
            subjects.rule_changed(record.id),
            "rule",
            record.id,
            change,
            actor=actor,
            correlation_id=correlation_id,
            detail={"name": record.name, "version": record.version, "enabled": record.enabled},
        )


async def check_actions(session: AsyncSession, spec: m.RuleSpec, root: str = "$") -> None:
    """Refuse a command its registered target's kind lacks, naming the field
    (`$.actions[0].action`); an unregistered target is accepted (it may register later).
    A notification must name a webhook subscription that exists."""
    await _check_subscriptions(session, spec, root)
    targets = {a.device_id for a in spec.actions if isinstance(a, m.CommandAction)}
    if not targets:
        return
    registered = select(DeviceRow.id, DeviceRow.kind).where(DeviceRow.id.in_(sorted(targets)))
    kinds = {device_id: kind for device_id, kind in (await session.execute(registered)).all()}
    for index, action in enumerate(spec.actions):
        if isinstance(action, m.CommandAction) and action.device_id in kinds:
            problem = capabilities.action_problem(
                kinds[action.device_id], action.action, action.params
            )
            if problem is not None:
                raise Invalid(problem.reason, field=f"{root}.actions[{index}].{problem.field}")


async def _check_subscriptions(session: AsyncSession, spec: m.RuleSpec, root: str) -> None:
    for index, action in enumerate(spec.actions):
        named = isinstance(action, m.NotifyAction) and action.subscription_id
        if named and await session.get(Subscription, action.subscription_id) is None:
            raise Invalid(
                f"webhook subscription {action.subscription_id!r} does not exist",
                field=f"{root}.actions[{index}].subscription_id",
            )


def _rule(record: RuleRecord) -> m.Rule:
    spec = msgspec.convert(record.spec, m.RuleSpec)
    return m.Rule(
        id=record.id,
        name=record.name,
        trigger=spec.trigger,
        actions=spec.actions,
        enabled=record.enabled,
        version=record.version,
        conditions=spec.conditions,
        mode=spec.mode,
    )


def _stored(spec: m.RuleSpec, rule_id: str) -> dict:
    return msgspec.to_builtins(msgspec.structs.replace(spec, id=rule_id))


def _view(record: RuleRecord) -> RuleView:
    spec = msgspec.convert(record.spec, m.RuleSpec)
    return RuleView(
        **msgspec.structs.asdict(spec)
        | {"id": record.id, "name": record.name, "enabled": record.enabled},
        version=record.version,
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


def _run_view(row: RuleRun) -> RuleRunView:
    return RuleRunView(
        id=row.id,
        rule_id=row.rule_id,
        episode_id=row.episode_id,
        kind=row.kind,
        time=row.time,
        device_id=row.device_id,
        reason=row.reason,
        values=row.values or {},
        outcomes=row.outcomes or [],
        correlation_id=row.correlation_id,
    )
