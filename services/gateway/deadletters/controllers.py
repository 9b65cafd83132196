"""`/api/v1/deadletters`: HTTP only; the logic is in `service.py`."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import PathParameter, QueryParameter
from litestar.status_codes import HTTP_200_OK

from libs.errors import Invalid
from libs.principals import Permission, Principal
from services.gateway.auth.guards import requires
from services.gateway.correlation import provide_correlation_id
from services.gateway.deadletters.schemas import DeadLetterPage, Redriven
from services.gateway.deadletters.service import (
    MAX_SCAN,
    MAX_SEQ,
    PREVIEW_BYTES,
    DeadLetterService,
)
from services.gateway.pagination import CursorParam, limit_param
from services.gateway.problems import problem
from services.gateway.resources import Resources

LIST_PARAMETERS = frozenset({"subject", "consumer", "cursor", "limit"})


def provide_dead_letter_service(resources: NamedDependency[Resources]) -> DeadLetterService:
    return DeadLetterService(resources.nc, resources.js)


class DeadLetterController(Controller):
    path = "/deadletters"
    tags = ["deadletters"]
    guards = [requires(Permission.ADMINISTER)]
    dependencies = {
        "deadletters": Provide(provide_dead_letter_service, sync_to_thread=False),
        "correlation_id": Provide(provide_correlation_id, sync_to_thread=False),
    }

    @get(
        "/",
        operation_id="listDeadLetters",
        summary="The messages the workers gave up on, oldest first",
        description=(
            "Each with the subject it was on, why and by which consumer it was given up, its "
            f"original stream sequence and the first {PREVIEW_BYTES} bytes of its body as text. "
            "`subject` filters by the original subject (wildcards); `consumer` by who gave up "
            f"on it (a page then holds those among the next {MAX_SCAN:,} dead letters, perhaps "
            "fewer than `limit`: follow `next_cursor` until it is null). Administrators only."
        ),
    )
    async def list_dead_letters(
        self,
        request: Request[Any, Any, Any],
        deadletters: NamedDependency[DeadLetterService],
        subject: Annotated[
            str,
            QueryParameter(
                description="original subject filter: `*` one token, `>` the rest",
                max_length=512,
            ),
        ] = ">",
        consumer: Annotated[
            str | None,
            QueryParameter(description="the durable consumer that gave up", max_length=128),
        ] = None,
        cursor: CursorParam = None,
        limit: Annotated[int, limit_param(50, 200)] = 50,
    ) -> DeadLetterPage:
        for name in request.query_params:
            if name not in LIST_PARAMETERS:
                raise Invalid(
                    f"unknown filter; known: {', '.join(sorted(LIST_PARAMETERS))}", field=name
                )
        return await deadletters.list(subject, consumer, limit, cursor)

    @post(
        "/{seq:int}/redrive",
        operation_id="redriveDeadLetter",
        summary="Send a dead letter back to the subject it was on",
        description=(
            "Publishes it again with its headers (the dead-letter ones dropped), then removes "
            "it from the dead letters: a second redrive of the same sequence answers 404. "
            "Audited (`deadletter.redriven`). Answers where the bus stored the new copy."
        ),
        status_code=HTTP_200_OK,
        responses={404: problem("no dead letter has this sequence (or it was redriven)")},
    )
    async def redrive(
        self,
        deadletters: NamedDependency[DeadLetterService],
        principal: NamedDependency[Principal],
        correlation_id: NamedDependency[str],
        seq: Annotated[int, PathParameter(ge=1, le=MAX_SEQ, description="the dead letter's `seq`")],
    ) -> Redriven:
        return await deadletters.redrive(seq, principal.actor, correlation_id)
