"""Who may reach private targets is remembered with the subscription: the webhooks service
delivers to a name that resolves into the allow-nets only for an administrator's."""

from __future__ import annotations

import functools

import pytest
from nats.aio.client import Client as NATS
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import webhooks
from libs.principals import Principal, PrincipalKind, Role
from services.gateway.auth.context import Context
from services.gateway.subscriptions.schemas import SubscriptionCreate
from services.gateway.subscriptions.service import SubscriptionService
from services.webhooks.sender import Outcome, Sender, make_session
from services.webhooks.store import DeliveryStore, Target
from tests.integration.webhooks_support import (
    LOOPBACK,
    PAYLOAD,
    RESIDENT,
    Rebinding,
    Scripted,
    answer,
)

ADMIN = Principal(PrincipalKind.USER, "admin", Role.ADMIN, None)
PUBLIC = "93.184.215.14"  # what the name resolves to when the gateway checks it


async def deliver(target: Target, settings: webhooks.WebhookSettings) -> Outcome:
    """One delivery as the webhooks service makes it for `target`, the name now resolving to
    the loopback receiver."""
    private = target.allow_private_targets
    resolver = Rebinding("127.0.0.1", "127.0.0.1")
    async with make_session(settings, allow_private_targets=private, resolver=resolver) as http:
        sender = Sender(http, settings, target.url, target.secret, allow_private_targets=private)
        return await sender.send(PAYLOAD)


async def test_a_residents_name_that_resolves_into_the_allow_nets_later_is_refused_at_delivery(
    sessions: async_sessionmaker[AsyncSession], nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = webhooks.WebhookSettings(allow_nets=LOOPBACK)
    service = SubscriptionService(sessions, nc, settings)
    at_creation = Rebinding(PUBLIC, PUBLIC)
    monkeypatch.setattr(
        webhooks, "check_url", functools.partial(webhooks.check_url, resolve=at_creation.lookup)
    )
    async with Scripted([answer(204)]) as endpoint:
        body = SubscriptionCreate(
            filter="events.x.>", url=f"http://hooks.rebind.test:{endpoint.port}/hook"
        )
        residents = await service.create(body, Context(RESIDENT, "c-1"), admin=False)
        admins = await service.create(body, Context(ADMIN, "c-2"), admin=True)
        targets = await DeliveryStore(sessions).targets()
        refused = await deliver(targets[residents.id], settings)
        delivered = await deliver(targets[admins.id], settings)
    for created, by in ((residents, RESIDENT), (admins, ADMIN)):
        await service.delete(created.id, Context(by, "c-3"))

    assert targets[residents.id].allow_private_targets is False
    assert targets[admins.id].allow_private_targets is True
    assert refused == Outcome(
        False,
        None,
        "blocked: hooks.rebind.test resolves to a loopback address, which only an "
        "administrator may target",
    )
    assert delivered == Outcome(True, 204)
    assert len(endpoint.requests) == 1  # the admin's: the resident's never connected
