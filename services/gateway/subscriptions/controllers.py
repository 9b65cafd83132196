"""`/api/v1/subscriptions`: HTTP only; the logic is in `service.py`."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody
from litestar.status_codes import HTTP_202_ACCEPTED, HTTP_204_NO_CONTENT

from libs.principals import Permission, Principal
from libs.webhooks import WebhookSettings
from services.gateway.auth.context import Context, provide_context
from services.gateway.auth.guards import requires
from services.gateway.body import StrictBody
from services.gateway.deliveries import StatusParam
from services.gateway.pagination import CursorParam, limit_param
from services.gateway.resources import Resources
from services.gateway.subscriptions.schemas import (
    DeliveryPage,
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
    # Residents manage their homes' webhooks; installers have none.
    guards = [requires(Permission.MANAGE_SUBSCRIPTIONS)]
    dependencies = {
        "subscriptions": Provide(provide_subscription_service, sync_to_thread=False),
        "ctx": Provide(provide_context, sync_to_thread=False),
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
        "answer holds the signing secret; it is not shown again. A URL is shown without its "
        "user info and query. URLs that lead to private, loopback, link-local, shared or cloud "
        "metadata addresses are refused, except an administrator's inside the networks of "
        "SMARTHOME_WEBHOOK_ALLOW_NETS; multicast and reserved addresses always. A "
        "subscription with a `home` (a resident's always has one) receives only the messages "
        "about that home, whatever its filter; dead letters are for administrators.",
    )
    async def create(
        self,
        subscriptions: NamedDependency[SubscriptionService],
        data: JSONBody[SubscriptionCreate],
        ctx: NamedDependency[Context],
    ) -> SubscriptionCreated:
        return await subscriptions.create(data, ctx, admin=ctx.principal.is_admin)

    @get(
        "/",
        operation_id="listSubscriptions",
        summary="List webhook subscriptions",
        description="Those of the caller's homes.",
    )
    async def list_subscriptions(
        self,
        subscriptions: NamedDependency[SubscriptionService],
        principal: NamedDependency[Principal],
        cursor: CursorParam = None,
        limit: Annotated[int, limit_param(50, 500)] = 50,
    ) -> SubscriptionPage:
        return await subscriptions.list(limit, cursor, principal)

    @get(
        "/{subscription_id:str}",
        operation_id="getSubscription",
        summary="Get a webhook subscription",
    )
    async def get_subscription(
        self,
        subscriptions: NamedDependency[SubscriptionService],
        principal: NamedDependency[Principal],
        subscription_id: FromPath[str],
    ) -> Subscription:
        return await subscriptions.get(subscription_id, principal)

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
        ctx: NamedDependency[Context],
    ) -> None:
        await subscriptions.delete(subscription_id, ctx)

    @get(
        "/{subscription_id:str}/deliveries",
        operation_id="listDeliveries",
        summary="A subscription's deliveries that needed a retry, oldest first",
        description="Each event whose first attempt failed: `pending` while it is retried, "
        "`delivered` once a retry succeeded, `failed` when the retry window ended without "
        "success (the dead-letter list, see `redeliver`). `source` says whether it matched "
        "the filter or was a rule's notification addressed to the subscription; in batched "
        "mode `webhook_id` names the request that carried it. `last_error` says why the last "
        "attempt failed: a class (`timeout`, `refused`, `tls`, `dns`, `blocked`, `connection`, "
        "`3xx`, `4xx`, `5xx`, ...; the status in `last_status_code`) and a few words of ours, "
        "never what the receiver answered. An event delivered on its first attempt has no "
        "record here: the subscription's `delivered` counts it.",
    )
    async def deliveries(
        self,
        subscriptions: NamedDependency[SubscriptionService],
        principal: NamedDependency[Principal],
        subscription_id: FromPath[str],
        status: StatusParam = None,
        cursor: CursorParam = None,
        limit: Annotated[int, limit_param(50, 500)] = 50,
    ) -> DeliveryPage:
        return await subscriptions.deliveries(subscription_id, status, limit, cursor, principal)

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
        ctx: NamedDependency[Context],
    ) -> Redelivery:
        return await subscriptions.redeliver(subscription_id, ctx)
