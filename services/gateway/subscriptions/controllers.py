"""`/api/v1/subscriptions`: HTTP only; the logic is in `service.py`."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.status_codes import HTTP_202_ACCEPTED, HTTP_204_NO_CONTENT

from libs.webhooks import WebhookSettings
from services.gateway.body import StrictBody
from services.gateway.correlation import provide_correlation_id
from services.gateway.identity import ACTOR
from services.gateway.pagination import CursorParam, limit_param
from services.gateway.resources import Resources
from services.gateway.subscriptions.schemas import (
    DeliveryPage,
    DeliveryStatus,
    Redelivery,
    Subscription,
    SubscriptionCreate,
    SubscriptionCreated,
    SubscriptionPage,
)
from services.gateway.subscriptions.service import SubscriptionService


def provide_subscription_service(resources: NamedDependency[Resources]) -> SubscriptionService:
    hooks = WebhookSettings.of(resources.settings)
    return SubscriptionService(resources.sessions, resources.nc, hooks)


class SubscriptionController(Controller):
    path = "/subscriptions"
    tags = ["subscriptions"]
    dependencies = {
        "subscriptions": Provide(provide_subscription_service, sync_to_thread=False),
        "correlation_id": Provide(provide_correlation_id, sync_to_thread=False),
    }

    @post(
        "/",
        dto=StrictBody[SubscriptionCreate],
        operation_id="createSubscription",
        summary="Subscribe a webhook to a subject filter",
        description="Events published from now on whose subject matches `filter` are POSTed "
        "to `url`, in order, signed after the Standard Webhooks spec (`webhook-id`, "
        "`webhook-timestamp`, `webhook-signature`), and retried with back-off for 24 h. So are "
        "the alerts of rules whose `notify` action names this subscription. The "
        "answer holds the signing secret; it is not shown again. URLs that resolve to loopback, "
        "link-local or cloud metadata addresses are refused unless the administrator sets "
        "SMARTHOME_WEBHOOK_ALLOW_PRIVATE=1.",
    )
    async def create(
        self,
        subscriptions: NamedDependency[SubscriptionService],
        data: JSONBody[SubscriptionCreate],
        correlation_id: NamedDependency[str],
    ) -> SubscriptionCreated:
        return await subscriptions.create(data, actor=ACTOR, correlation_id=correlation_id)

    @get("/", operation_id="listSubscriptions", summary="List webhook subscriptions")
    async def list_subscriptions(
        self,
        subscriptions: NamedDependency[SubscriptionService],
        cursor: CursorParam = None,
        limit: Annotated[int, limit_param(50, 500)] = 50,
    ) -> SubscriptionPage:
        return await subscriptions.list(limit, cursor)

    @get(
        "/{subscription_id:str}",
        operation_id="getSubscription",
        summary="Get a webhook subscription",
    )
    async def get_subscription(
        self, subscriptions: NamedDependency[SubscriptionService], subscription_id: FromPath[str]
    ) -> Subscription:
        return await subscriptions.get(subscription_id)

    @delete(
        "/{subscription_id:str}",
        operation_id="deleteSubscription",
        summary="Delete a webhook subscription and its delivery records",
        status_code=HTTP_204_NO_CONTENT,
    )
    async def delete_subscription(
        self,
        subscriptions: NamedDependency[SubscriptionService],
        subscription_id: FromPath[str],
        correlation_id: NamedDependency[str],
    ) -> None:
        await subscriptions.delete(subscription_id, actor=ACTOR, correlation_id=correlation_id)

    @get(
        "/{subscription_id:str}/deliveries",
        operation_id="listDeliveries",
        summary="A subscription's deliveries that needed a retry, oldest first",
        description="Each event whose first attempt failed: `pending` while it is retried, "
        "`delivered` once a retry succeeded, `failed` when the retry window ended without "
        "success (the dead-letter list, see `redeliver`). `source` says whether it matched "
        "the filter or was a rule's notification addressed to the subscription; in batched "
        "mode `webhook_id` names the request that carried it. An event delivered on its first "
        "attempt has no record here: the subscription's `delivered` counts it.",
    )
    async def deliveries(
        self,
        subscriptions: NamedDependency[SubscriptionService],
        subscription_id: FromPath[str],
        status: Annotated[
            DeliveryStatus | None, QueryParameter(description="pending, delivered or failed")
        ] = None,
        cursor: CursorParam = None,
        limit: Annotated[int, limit_param(50, 500)] = 50,
    ) -> DeliveryPage:
        return await subscriptions.deliveries(subscription_id, status, limit, cursor)

    @post(
        "/{subscription_id:str}/redeliver",
        operation_id="redeliverFailed",
        summary="Send the failed deliveries again",
        description="Every `failed` delivery becomes `pending` and is sent once more, from "
        "the stream; the answer says how many.",
        status_code=HTTP_202_ACCEPTED,
    )
    async def redeliver(
        self,
        subscriptions: NamedDependency[SubscriptionService],
        subscription_id: FromPath[str],
        correlation_id: NamedDependency[str],
    ) -> Redelivery:
        return await subscriptions.redeliver(
            subscription_id, actor=ACTOR, correlation_id=correlation_id
        )
