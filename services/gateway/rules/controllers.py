"""`/api/v1/rules`: HTTP only; the logic is in `service.py`."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, post, put
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody
from litestar.status_codes import HTTP_204_NO_CONTENT

from libs.messages import RuleSpec
from libs.principals import Permission, Principal
from services.gateway.auth.context import Context, provide_context
from services.gateway.auth.guards import requires
from services.gateway.body import StrictBody
from services.gateway.pagination import CursorParam, limit_param
from services.gateway.resources import Resources
from services.gateway.rules.schemas import (
    DryRunRequest,
    DryRunResult,
    DryRunWindow,
    RulePage,
    RuleRunPage,
    RuleView,
)
from services.gateway.rules.service import RuleService

ACTIONS_CHECKED = (
    "A `command` action whose target device is registered is checked against what the "
    "device's kind accepts (light: turn_on, turn_off, toggle, set_brightness with "
    "`params.level` 0-100; energy_meter: reset_energy; switch: turn_on, turn_off, toggle; "
    "thermostat: set_target with `params.celsius`; sensor: none; any other kind: anything); "
    "a mismatch answers 422 naming the field (`$.actions[0].action`). In a rule of no home, a "
    "target that is not registered yet is accepted: it may register later, and until it does "
    "the rules service refuses the command at run time and says so in the rule's runs."
)
DRY_RUN = (
    "Replays the recorded history between `since` (inclusive) and `until` (exclusive, "
    "after `since`, at most 31 days later) through the rule and answers when it would "
    "have fired and what each firing would have sent, in order, with the time each action "
    "would go out (after any `delay`). Nothing is sent and nothing is stored. Read are "
    "the `telemetry` and `state` rows of the devices a threshold trigger watches (its "
    "device, or the registered devices its selector matches) and of the devices its "
    "conditions name; the rows an event trigger's subject matches; none for a schedule. "
    "The replay starts knowing nothing at `since` and stops at the present. An action the "
    "rules service would refuse to send (its device not registered or disconnected "
    "today) is listed with `skipped` saying why. Limits: at most 100,000 history rows "
    "(else 422: narrow the window) and 1,000 firings listed (`truncated`). A disabled "
    "rule is tried all the same. State triggers cannot be tried yet (422): the history "
    "holds what devices reported, not the state derived from it. Conditions are evaluated "
    "for threshold triggers only."
)


HOMES = (
    "A resident's rule belongs to one of its homes (`home`; its only one when omitted) and "
    "may name only devices registered there, each checked (422 naming the field, e.g. "
    "`$.actions[0].device_id`); a selector matches that home's devices, and a `notify` "
    "names a subscription of that home. An administrator's rule without `home` reads the "
    "whole platform. "
)
READ = [requires(Permission.READ)]
MANAGE = [requires(Permission.MANAGE_RULES)]


def provide_rule_service(resources: NamedDependency[Resources]) -> RuleService:
    return RuleService(resources.sessions, resources.nc, resources.js)


class RuleController(Controller):
    path = "/rules"
    tags = ["rules"]
    dependencies = {
        "rules": Provide(provide_rule_service, sync_to_thread=False),
        "ctx": Provide(provide_context, sync_to_thread=False),
    }

    @post(
        "/",
        dto=StrictBody[RuleSpec],
        guards=MANAGE,
        operation_id="createRule",
        summary="Create a rule",
        description="Without `id` one is generated. An id that exists answers 409; the id "
        "`test` is reserved. " + HOMES + ACTIONS_CHECKED,
    )
    async def create(
        self,
        rules: NamedDependency[RuleService],
        data: JSONBody[RuleSpec],
        ctx: NamedDependency[Context],
    ) -> RuleView:
        return await rules.create(data, ctx)

    @get(
        "/",
        guards=READ,
        operation_id="listRules",
        summary="List rules",
        description="The rules of the caller's homes.",
    )
    async def list_rules(
        self,
        rules: NamedDependency[RuleService],
        principal: NamedDependency[Principal],
        cursor: CursorParam = None,
        limit: Annotated[int, limit_param(50, 500)] = 50,
    ) -> RulePage:
        return await rules.list(limit, cursor, principal)

    @post(
        "/test",
        dto=StrictBody[DryRunRequest],
        guards=MANAGE,
        operation_id="testRuleBody",
        summary="Try a rule before saving it: when it would have fired over recorded history",
        description=DRY_RUN + " The rule is checked as on creation (errors name `$.rule...`), "
        "its home too.",
        status_code=200,
    )
    async def test_rule_body(
        self,
        rules: NamedDependency[RuleService],
        principal: NamedDependency[Principal],
        data: JSONBody[DryRunRequest],
    ) -> DryRunResult:
        return await rules.test_spec(data, principal)

    @post(
        "/{rule_id:str}/test",
        dto=StrictBody[DryRunWindow],
        guards=READ,
        operation_id="testRule",
        summary="Dry-run a rule: when it would have fired over recorded history",
        description=DRY_RUN + " A rule that does not exist answers 404.",
        status_code=200,
    )
    async def test_rule(
        self,
        rules: NamedDependency[RuleService],
        principal: NamedDependency[Principal],
        rule_id: FromPath[str],
        data: JSONBody[DryRunWindow],
    ) -> DryRunResult:
        return await rules.test(rule_id, data, principal)

    @get("/{rule_id:str}", guards=READ, operation_id="getRule", summary="Get a rule")
    async def get_rule(
        self,
        rules: NamedDependency[RuleService],
        principal: NamedDependency[Principal],
        rule_id: FromPath[str],
    ) -> RuleView:
        return await rules.get(rule_id, principal)

    @put(
        "/{rule_id:str}",
        dto=StrictBody[RuleSpec],
        guards=MANAGE,
        operation_id="replaceRule",
        summary="Replace a rule (its version increments)",
        description="Without `home` the rule stays in its home. " + HOMES + ACTIONS_CHECKED,
    )
    async def replace(
        self,
        rules: NamedDependency[RuleService],
        rule_id: FromPath[str],
        data: JSONBody[RuleSpec],
        ctx: NamedDependency[Context],
    ) -> RuleView:
        return await rules.replace(rule_id, data, ctx)

    @delete(
        "/{rule_id:str}",
        guards=MANAGE,
        operation_id="deleteRule",
        summary="Delete a rule",
        status_code=HTTP_204_NO_CONTENT,
    )
    async def delete_rule(
        self,
        rules: NamedDependency[RuleService],
        rule_id: FromPath[str],
        ctx: NamedDependency[Context],
    ) -> None:
        await rules.delete(rule_id, ctx)

    @get(
        "/{rule_id:str}/runs",
        guards=READ,
        operation_id="listRuleRuns",
        summary="A rule's trace: each firing, clearing or error, newest last",
    )
    async def runs(
        self,
        rules: NamedDependency[RuleService],
        principal: NamedDependency[Principal],
        rule_id: FromPath[str],
        cursor: CursorParam = None,
        limit: Annotated[int, limit_param(50, 500)] = 50,
    ) -> RuleRunPage:
        return await rules.runs(rule_id, limit, cursor, principal)
