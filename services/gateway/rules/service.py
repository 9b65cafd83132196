"""User rules: stored in the `rules` table; every change is signalled on
`system.rule.<id>.changed` (an empty message) so that the rules service reloads.

A command action is checked against its target's kind (`libs.capabilities`) when the target
is registered. In a rule of no home, a target that is not registered yet is accepted: devices
may register later, and until they do the rules service refuses the command at run time and
traces why. A rule of a home names its home's registered devices only (`check_rule`).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import capabilities, subjects
from libs import messages as m
from libs.db.models import Channel, RuleRecord, RuleRun, Subscription
from libs.db.models import Device as DeviceRow
from libs.errors import Conflict, Invalid, NotFound
from libs.principals import Principal, home_of
from services.gateway import scope
from services.gateway.auth.context import Context
from services.gateway.changes import Change, record_change
from services.gateway.pagination import decode_cursor, keyset, page
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

    async def create(self, spec: m.RuleSpec, ctx: Context) -> RuleView:
        require_bus(self._nc)
        if spec.id in RESERVED_IDS:
            raise Invalid(
                f"{spec.id!r} is reserved (`POST /rules/test` tries a rule)", field="$.id"
            )
        home = scope.home_for(ctx.principal, spec.home, "$.home")
        rule_id = spec.id or m.new_id()
        now = m.now()
        async with self._sessions.begin() as session:
            if await session.get(RuleRecord, rule_id) is not None:
                raise Conflict(f"rule {rule_id!r} already exists", field="$.id")
            await check_rule(session, spec, home)
            record = RuleRecord(
                id=rule_id,
                name=spec.name,
                spec=_stored(spec, rule_id, home),
                enabled=spec.enabled,
                version=1,
                home=home,
                created_at=now,
                updated_at=now,
            )
            session.add(record)
            await session.flush()
            _signal(session, record, "created", ctx)
        return _view(record)

    async def get(self, rule_id: str, principal: Principal) -> RuleView:
        async with self._sessions() as session:
            return _view(await self._record(session, rule_id, principal))

    async def list(self, limit: int, cursor: str | None, principal: Principal) -> RulePage:
        query = keyset(select(RuleRecord), RuleRecord.id, limit, cursor)
        query = scope.homed(principal, query, RuleRecord.home)
        async with self._sessions() as session:
            records = list(await session.scalars(query))
        return page(records, limit, key=lambda r: r.id, view=_view, into=RulePage)

    async def replace(self, rule_id: str, spec: m.RuleSpec, ctx: Context) -> RuleView:
        """The rule as `spec` says; without `home` it stays in its home."""
        if spec.id is not None and spec.id != rule_id:
            raise Invalid(f"{spec.id!r} is not the id in the path ({rule_id!r})", field="$.id")
        require_bus(self._nc)
        async with self._sessions.begin() as session:
            record = await self._record(session, rule_id, ctx.principal)
            home = record.home
            if spec.home is not None:
                home = scope.home_for(ctx.principal, spec.home, "$.home")
            await check_rule(session, spec, home)
            record.name = spec.name
            record.spec = _stored(spec, rule_id, home)
            record.enabled = spec.enabled
            record.home = home
            record.version += 1
            record.updated_at = m.now()
            await session.flush()
            _signal(session, record, "updated", ctx)
        return _view(record)

    async def delete(self, rule_id: str, ctx: Context) -> None:
        require_bus(self._nc)
        async with self._sessions.begin() as session:
            record = await self._record(session, rule_id, ctx.principal)
            await session.delete(record)
            _signal(session, record, "deleted", ctx)

    async def runs(
        self, rule_id: str, limit: int, cursor: str | None, principal: Principal
    ) -> RuleRunPage:
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
            await self._record(session, rule_id, principal)
            rows = list(await session.scalars(query))
        return page(rows, limit, key=lambda r: (r.time, r.id), view=_run_view, into=RuleRunPage)

    async def test(self, rule_id: str, window: DryRunWindow, principal: Principal) -> DryRunResult:
        """When the stored rule would have fired over the window; sends nothing."""
        async with self._sessions() as session:
            record = await self._record(session, rule_id, principal)
            return await dry_run(session, record.to_rule(), window, rule_root=None)

    async def test_spec(self, request: DryRunRequest, principal: Principal) -> DryRunResult:
        """When a rule body would have fired over the window; sends nothing, stores nothing.
        Its home is settled and checked as on creation."""
        spec = request.rule
        home = scope.home_for(principal, spec.home, "$.rule.home")
        async with self._sessions() as session:
            await check_rule(session, spec, home, root="$.rule")
            rule = m.Rule(
                id=spec.id or UNSAVED_ID,
                name=spec.name,
                trigger=spec.trigger,
                actions=spec.actions,
                enabled=spec.enabled,
                version=0,
                conditions=spec.conditions,
                mode=spec.mode,
                home=home,
            )
            result = await dry_run(session, rule, request.window, rule_root="$.rule")
        return msgspec.structs.replace(result, rule_id=spec.id)

    async def _record(
        self, session: AsyncSession, rule_id: str, principal: Principal
    ) -> RuleRecord:
        record = await session.get(RuleRecord, rule_id)
        missing = f"rule {rule_id!r} does not exist"
        if record is None:
            raise NotFound(missing)
        scope.visible(principal, record.home, missing)
        return record


def _signal(session: AsyncSession, record: RuleRecord, change: Change, ctx: Context) -> None:
    """The rules service reloads the rule; the recorder audits the change. In the change's
    transaction: published after its commit, so the reload reads what committed."""
    record_change(
        session,
        subjects.rule_changed(record.id),
        "rule",
        record.id,
        change,
        actor=ctx.principal.actor,
        correlation_id=ctx.correlation_id,
        detail={"name": record.name, "version": record.version, "enabled": record.enabled},
        home=record.home,
    )


async def check_rule(
    session: AsyncSession, spec: m.RuleSpec, home: str | None, root: str = "$"
) -> None:
    """What a rule may be, checked before it is stored or tried (`root`: where it is in the
    body): its home's devices only (`_check_home`), then its actions (`check_actions`)."""
    await _check_home(session, spec, home, root)
    await check_actions(session, spec, home, root)


async def _check_home(session: AsyncSession, spec: m.RuleSpec, home: str | None, root: str) -> None:
    """A rule of a home reads and commands that home's devices only: each device it names is
    registered there, and its selector looks there. A device elsewhere is refused in the
    words of one that is not registered, naming the field (`$.actions[0].device_id`). A rule
    of no home (an administrator's) may name any device, registered or not yet."""
    if home is None:
        return
    named = list(named_devices(spec, root))
    if named:
        registered = select(DeviceRow.id, DeviceRow.location).where(
            DeviceRow.id.in_(sorted({device_id for _, device_id in named}))
        )
        homes = {d: home_of(location) for d, location in (await session.execute(registered)).all()}
        for field, device_id in named:
            if homes.get(device_id) != home:
                raise Invalid(
                    f"no device {device_id!r} is registered in home {home!r}", field=field
                )
    trigger = spec.trigger
    selector = trigger.selector if isinstance(trigger, m.ThresholdTrigger) else None
    if selector is not None and selector.location and home_of(selector.location) != home:
        raise Invalid(
            f"{selector.location!r} is not in home {home!r}: a rule selects its home's devices",
            field=f"{root}.trigger.selector.location",
        )


def named_devices(spec: m.RuleSpec, root: str = "$") -> Iterator[tuple[str, str]]:
    """Every device a rule names, with the field that names it: its trigger's, its
    conditions' and its actions' (an event trigger's subject names one by its second token)."""
    trigger = spec.trigger
    match trigger:
        case m.ThresholdTrigger(device_id=str(device_id)) | m.StateTrigger(device_id=device_id):
            yield f"{root}.trigger.device_id", device_id
        case m.EventTrigger(subject=subject):
            tokens = subject.split(".")
            if len(tokens) > 1 and tokens[1] not in ("*", ">"):
                yield f"{root}.trigger.subject", tokens[1]
    for index, condition in enumerate(spec.conditions):
        yield from _condition_devices(condition, f"{root}.conditions[{index}]")
    for index, action in enumerate(spec.actions):
        if isinstance(action, m.CommandAction | m.SetStateAction | m.PublishAction):
            yield f"{root}.actions[{index}].device_id", action.device_id


def _condition_devices(condition: m.Condition, at: str) -> Iterator[tuple[str, str]]:
    match condition:
        case m.AttributeCondition(device_id=device_id) | m.StateCondition(device_id=device_id):
            yield f"{at}.device_id", device_id
        case m.AllOf(conditions=inner) | m.AnyOf(conditions=inner):
            for index, each in enumerate(inner):
                yield from _condition_devices(each, f"{at}.conditions[{index}]")
        case m.Not(condition=inner):
            yield from _condition_devices(inner, f"{at}.condition")


async def check_actions(
    session: AsyncSession, spec: m.RuleSpec, home: str | None = None, root: str = "$"
) -> None:
    """Refuse a command its registered target's kind lacks, naming the field
    (`$.actions[0].action`); an unregistered target is accepted (it may register later).
    A notification must name a webhook subscription that exists (of the rule's home)."""
    await _check_subscriptions(session, spec, home, root)
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


async def _check_subscriptions(
    session: AsyncSession, spec: m.RuleSpec, home: str | None, root: str
) -> None:
    for index, action in enumerate(spec.actions):
        if not isinstance(action, m.NotifyAction):
            continue
        for model, key, what in (
            (Subscription, action.subscription_id, "webhook subscription"),
            (Channel, action.channel, "notification channel"),
        ):
            if not key:
                continue
            target = await session.get(model, key)
            # A homed rule's alerts go to its home's subscriptions and channels: another
            # home's (or a platform-wide one) is as unknown.
            if target is None or (home is not None and target.home != home):
                field = "subscription_id" if model is Subscription else "channel"
                raise Invalid(
                    f"{what} {key!r} does not exist", field=f"{root}.actions[{index}].{field}"
                )


def _stored(spec: m.RuleSpec, rule_id: str, home: str | None) -> dict:
    return msgspec.to_builtins(msgspec.structs.replace(spec, id=rule_id, home=home))


def _view(record: RuleRecord) -> RuleView:
    spec = msgspec.convert(record.spec, m.RuleSpec)
    return RuleView(
        **msgspec.structs.asdict(spec)
        | {"id": record.id, "name": record.name, "enabled": record.enabled, "home": record.home},
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
