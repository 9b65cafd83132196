"""`/api/v1/rules`: HTTP only; the logic is in `service.py`."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, post, put
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody
from litestar.status_codes import HTTP_204_NO_CONTENT

from libs.messages import RuleSpec
from services.gateway.body import StrictBody
from services.gateway.pagination import CursorParam, limit_param
from services.gateway.resources import Resources
from services.gateway.rules.schemas import RulePage, RuleRunPage, RuleView
from services.gateway.rules.service import RuleService


def provide_rule_service(resources: NamedDependency[Resources]) -> RuleService:
    return RuleService(resources.sessions, resources.nc, resources.js)


class RuleController(Controller):
    path = "/rules"
    tags = ["rules"]
    dependencies = {"rules": Provide(provide_rule_service, sync_to_thread=False)}

    @post(
        "/",
        dto=StrictBody[RuleSpec],
        operation_id="createRule",
        summary="Create a rule",
        description="Without `id` one is generated. An id that exists answers 409.",
    )
    async def create(
        self, rules: NamedDependency[RuleService], data: JSONBody[RuleSpec]
    ) -> RuleView:
        return await rules.create(data)

    @get("/", operation_id="listRules", summary="List rules")
    async def list_rules(
        self,
        rules: NamedDependency[RuleService],
        cursor: CursorParam = None,
        limit: Annotated[int, limit_param(50, 500)] = 50,
    ) -> RulePage:
        return await rules.list(limit, cursor)

    @get("/{rule_id:str}", operation_id="getRule", summary="Get a rule")
    async def get_rule(
        self, rules: NamedDependency[RuleService], rule_id: FromPath[str]
    ) -> RuleView:
        return await rules.get(rule_id)

    @put(
        "/{rule_id:str}",
        dto=StrictBody[RuleSpec],
        operation_id="replaceRule",
        summary="Replace a rule (its version increments)",
    )
    async def replace(
        self, rules: NamedDependency[RuleService], rule_id: FromPath[str], data: JSONBody[RuleSpec]
    ) -> RuleView:
        return await rules.replace(rule_id, data)

    @delete(
        "/{rule_id:str}",
        operation_id="deleteRule",
        summary="Delete a rule",
        status_code=HTTP_204_NO_CONTENT,
    )
    async def delete_rule(
        self, rules: NamedDependency[RuleService], rule_id: FromPath[str]
    ) -> None:
        await rules.delete(rule_id)

    @get(
        "/{rule_id:str}/runs",
        operation_id="listRuleRuns",
        summary="A rule's trace: each firing, clearing or error, newest last",
    )
    async def runs(
        self,
        rules: NamedDependency[RuleService],
        rule_id: FromPath[str],
        cursor: CursorParam = None,
        limit: Annotated[int, limit_param(50, 500)] = 50,
    ) -> RuleRunPage:
        return await rules.runs(rule_id, limit, cursor)
