"""Webhook delivery end to end: the gateway in-process, the webhooks service as a real process,
and a real HTTP receiver in the test that fails, hangs or answers on demand: order, retries
with back-off, restarts, dead letters and re-drives, batches, notifications, lost deliveries."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import msgspec
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from libs import bus, subjects, webhooks
from libs import messages as m
from tests.helpers import eventually, unique_id
from tests.integration import webhooks_support
from tests.integration.webhooks_support import (
    SUBS,
    Receiver,
    Scripted,
    Subscriptions,
    answer,
    batched_ids,
    ids_of,
    publish,
    verifies,
    webhooks_service,
)
from tests.proxy import Relay

# The shared fixtures, under their names: pytest finds them in this module.
client = webhooks_support.client
subs = webhooks_support.subs


# --- delivery ----------------------------------------------------------------------------------


async def test_failing_endpoint_gets_the_event_once_after_backoff_with_a_valid_signature(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    device = unique_id()
    async with Receiver(fail_first=3) as receiver, webhooks_service(service_env, data_dir):
        sub = await subs.create(receiver, device)
        event = await publish(js, device, power_w=60.0)
        # In order: the next event waits behind the retries, and no copy of the first follows it.
        marker = await publish(js, device, power_w=0.0)
        await eventually(lambda: len(receiver.delivered) == 2, timeout=15)
        await eventually(lambda: subs.delivered(sub["id"], 2), timeout=10)
        deliveries = await subs.deliveries(sub["id"])

    assert [r.status for r in receiver.requests] == [500, 500, 500, 200, 200]
    assert ids_of(receiver.requests) == [event.id] * 4 + [marker.id]
    first = receiver.delivered[0]
    assert verifies(sub["secret"], first)
    assert not verifies(webhooks.new_secret(), first)
    assert first.headers["content-type"] == "application/cloudevents+json"
    assert m.cloud_event_decoder.decode(first.body) == event
    # Only the event that needed retries has a record; the marker is only counted.
    assert [(d["event_id"], d["status"], d["attempts"]) for d in deliveries] == [
        (event.id, "delivered", 4),
    ]
    assert deliveries[0]["last_status_code"] == 200
    assert deliveries[0]["source"] == "filter"


async def test_events_arrive_in_order_in_binary_mode(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    device = unique_id()
    async with Receiver() as receiver, webhooks_service(service_env, data_dir):
        sub = await subs.create(receiver, device, mode="binary")
        events = [await publish(js, device, n=n) for n in range(5)]
        await eventually(lambda: len(receiver.delivered) == 5, timeout=15)

    assert [r.headers["ce-id"] for r in receiver.requests] == [e.id for e in events]
    assert [msgspec.json.decode(r.body) for r in receiver.requests] == [{"n": n} for n in range(5)]
    first = receiver.requests[0]
    assert first.headers["content-type"] == "application/json"
    assert first.headers["ce-type"] == "telemetry"
    assert first.headers["ce-subject"] == device
    assert first.headers["ce-specversion"] == "1.0"
    assert all(verifies(sub["secret"], r) for r in receiver.requests)


async def test_a_hanging_endpoint_does_not_delay_other_subscriptions(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    stuck_device, device = unique_id(), unique_id()
    async with (
        Receiver(hang=True) as stuck,
        Receiver() as receiver,
        webhooks_service(service_env, data_dir),
    ):
        await subs.create(stuck, stuck_device)
        await subs.create(receiver, device)
        await publish(js, stuck_device, n=0)
        await publish(js, stuck_device, n=1)
        await eventually(lambda: stuck.hanging == 1, timeout=10)
        events = [await publish(js, device, n=n) for n in range(3)]
        await eventually(lambda: len(receiver.delivered) == 3, timeout=10)
        still_hanging = stuck.hanging

    assert still_hanging == 1, "the other deliveries waited for the hanging endpoint"
    assert [r.headers[webhooks.HEADER_ID] for r in receiver.delivered] == [e.id for e in events]
    assert len(stuck.requests) == 1  # its second event waits behind its first


async def test_killed_service_resumes_retries_and_delivers_exactly_once(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    device = unique_id()
    async with Receiver(fail_first=4) as receiver, webhooks_service(service_env, data_dir) as svc:
        sub = await subs.create(receiver, device)
        event = await publish(js, device, power_w=60.0)

        async def retrying() -> bool:
            pending = await subs.deliveries(sub["id"], status="pending")
            return bool(pending) and pending[0]["attempts"] >= 2

        await eventually(retrying, timeout=10)
        svc.kill9()
        await asyncio.to_thread(svc.start)
        # The dead owner's lease expires first: then the restarted service takes over.
        await eventually(lambda: svc.tail(100_000).count("acquired") >= 2, timeout=20)
        await eventually(lambda: receiver.delivered, timeout=15)
        marker = await publish(js, device, power_w=0.0)
        await eventually(lambda: len(receiver.delivered) == 2, timeout=10)
        deliveries = await subs.deliveries(sub["id"])

    assert ids_of(receiver.delivered) == [event.id, marker.id]
    assert [r.status for r in receiver.requests] == [500] * 4 + [200, 200]
    assert [(d["event_id"], d["status"]) for d in deliveries] == [(event.id, "delivered")]
    # An attempt the kill interrupted after the request may be missing from the record.
    assert deliveries[0]["attempts"] in (4, 5)


async def test_exhausted_retries_are_dead_lettered_and_redelivered_on_request(
    subs: Subscriptions,
    client: AsyncTestClient,
    js: JetStreamContext,
    service_env: dict[str, str],
    data_dir: Path,
) -> None:
    device = unique_id()
    service = webhooks_service(service_env, data_dir, SMARTHOME_WEBHOOK_RETRY_FOR="2")
    async with Receiver(fail_first=1_000) as receiver, service:
        sub = await subs.create(receiver, device)
        lost = await publish(js, device, power_w=60.0)
        failed = await eventually(lambda: subs.deliveries(sub["id"], status="failed"), timeout=15)
        receiver.fail_first = 0  # the endpoint is fixed
        # The dead letter no longer holds back the events after it.
        after = await publish(js, device, power_w=0.0)
        await eventually(lambda: receiver.delivered, timeout=10)
        redelivered = await client.post(f"{SUBS}/{sub['id']}/redeliver")
        await eventually(lambda: len(receiver.delivered) == 2, timeout=10)
        delivered = await eventually(
            lambda: subs.deliveries(sub["id"], status="delivered"), timeout=5
        )
        await eventually(lambda: subs.delivered(sub["id"], 2), timeout=10)
        still_failed = await subs.deliveries(sub["id"], status="failed")

    assert [d["event_id"] for d in failed] == [lost.id]
    assert failed[0]["attempts"] >= 2 and failed[0]["last_status_code"] == 500
    assert failed[0]["last_error"] == "5xx: HTTP 500"
    assert (redelivered.status_code, redelivered.json()) == (202, {"redelivered": 1})
    assert ids_of(receiver.delivered) == [after.id, lost.id]
    assert [d["event_id"] for d in delivered] == [lost.id]  # `after` went first time: no record
    assert still_failed == []


async def test_a_failed_delivery_shows_its_class_and_status_never_what_the_receiver_said(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    device = unique_id()
    secret_body = b"SECRET-BODY of the private address"
    telling = Scripted([answer(500, secret_body, "x-secret: SECRET-HEADER")] * 100)
    async with Receiver() as receiver, telling, webhooks_service(service_env, data_dir) as service:
        await subs.create(receiver, device)  # on 127.0.0.1, inside the allow-net: delivered
        refused_by = await subs.create(telling, device)
        event = await publish(js, device, power_w=60.0)
        await eventually(lambda: ids_of(receiver.delivered) == [event.id], timeout=15)
        records = await eventually(lambda: subs.deliveries(refused_by["id"]), timeout=15)
        log = service.tail(100_000)

    assert [(d["event_id"], d["status"]) for d in records] == [(event.id, "pending")]
    assert (records[0]["last_error"], records[0]["last_status_code"]) == ("5xx: HTTP 500", 500)
    assert "SECRET" not in str(records) and "SECRET" not in log


async def test_a_lost_consumer_is_made_again(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    device = unique_id()
    async with Receiver() as receiver:
        sub = await subs.create(receiver, device)
        await js.delete_consumer(subjects.EVENTS_STREAM, subjects.webhook_consumer(sub["id"]))
        async with webhooks_service(service_env, data_dir) as service:
            await eventually(lambda: "was missing" in service.tail(100_000), timeout=10)
            event = await publish(js, device, power_w=1.0)
            await eventually(lambda: receiver.delivered, timeout=10)

    assert ids_of(receiver.delivered) == [event.id]


async def test_a_killed_service_resumes_mid_batch_in_order_without_losing_any(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    device = unique_id()
    async with Receiver(hang_at=3) as receiver, webhooks_service(service_env, data_dir) as svc:
        await subs.create(receiver, device)
        before = [await publish(js, device, n=n) for n in range(8)]
        await eventually(lambda: receiver.hanging == 1, timeout=10)
        svc.kill9()
        # Published while the service is down: the consumer must not hand these out before
        # the un-acked ones of the batch the killed service held.
        after = [await publish(js, device, n=n) for n in range(8, 12)]
        receiver.hang_at = None
        restarted_at = len(receiver.requests)
        await asyncio.to_thread(svc.start)
        await eventually(lambda: svc.tail(100_000).count("acquired") >= 2, timeout=20)
        await eventually(lambda: ids_of(receiver.delivered)[-1:] == [after[-1].id], timeout=15)

    ids = [e.id for e in before + after]
    resent = [r.headers[webhooks.HEADER_ID] for r in receiver.requests[restarted_at:]]
    # After the restart: from the first event not known to be delivered on, in order, once.
    assert resent == ids[len(ids) - len(resent) :]
    assert ids_of(receiver.delivered)[:3] == ids[:3]
    assert len(resent) >= len(ids) - 3


async def test_batched_mode_delivers_every_event_once_in_order_signed(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    device = unique_id()
    async with Receiver() as receiver, webhooks_service(service_env, data_dir):
        sub = await subs.create(receiver, device, mode="batched", batch_size=50)
        events = [m.make_event(device, "telemetry", {"n": n}) for n in range(300)]
        await bus.publish_many(js, [(e.nats_subject, e, e.id) for e in events])
        await eventually(lambda: len(batched_ids(receiver.delivered)) >= 300, timeout=20)
        await eventually(lambda: subs.delivered(sub["id"], 300), timeout=10)

    assert batched_ids(receiver.requests) == [e.id for e in events]
    assert sub["mode"] == "batched" and sub["batch_size"] == 50
    for request in receiver.requests:
        batch = msgspec.json.decode(request.body, type=list[m.CloudEvent])
        assert 1 <= len(batch) <= 50
        assert request.headers["content-type"] == "application/cloudevents-batch+json"
        assert request.headers["smarthome-count"] == str(len(batch))
        assert verifies(sub["secret"], request)
    assert len({r.headers[webhooks.HEADER_ID] for r in receiver.requests}) == len(receiver.requests)
    first = msgspec.json.decode(receiver.requests[0].body, type=list[m.CloudEvent])[0]
    assert first == events[0]


async def test_a_failed_batch_is_retried_as_it_was_then_the_rest_follows(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    device = unique_id()
    async with Receiver(fail_first=2) as receiver, webhooks_service(service_env, data_dir):
        sub = await subs.create(receiver, device, mode="batched", batch_size=3)
        events = [m.make_event(device, "telemetry", {"n": n}) for n in range(7)]
        await bus.publish_many(js, [(e.nats_subject, e, e.id) for e in events])
        await eventually(lambda: len(batched_ids(receiver.delivered)) == 7, timeout=15)
        deliveries = await subs.deliveries(sub["id"])

    failed, retried = receiver.requests[:2], receiver.requests[2]
    assert [r.status for r in failed] == [500, 500] and retried.status == 200
    assert {r.body for r in failed} == {retried.body}
    assert {ids_of([r])[0] for r in failed} == {ids_of([retried])[0]}
    assert batched_ids(receiver.delivered) == [e.id for e in events]
    # One record per event of the batch that needed retries, naming the request.
    first_batch = batched_ids([retried])
    assert [d["event_id"] for d in deliveries] == first_batch
    assert {(d["status"], d["attempts"], d["webhook_id"]) for d in deliveries} == {
        ("delivered", 3, ids_of([retried])[0])
    }


async def test_a_rules_notification_reaches_the_named_subscription_signed(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    async with Receiver(fail_first=1) as receiver, webhooks_service(service_env, data_dir):
        # Its filter matches nothing the alert is published on.
        sub = await subs.create(receiver, unique_id())
        alert = m.make_event(
            unique_id(), "alert", {"message": "too hot"}, source="rule/r1", event_id=unique_id()
        )
        # What the rules service publishes for a `notify` action naming the subscription.
        await bus.publish(js, subjects.notification(sub["id"]), alert, msg_id=alert.id)
        await eventually(lambda: receiver.delivered, timeout=15)

        # The record of the failed first attempt is settled after the receiver's 200.
        async def settled() -> list[dict]:
            found = await subs.deliveries(sub["id"])
            return found if all(d["status"] != "pending" for d in found) else []

        deliveries = await eventually(settled, timeout=15)

    delivered = receiver.delivered[0]
    assert [r.status for r in receiver.requests] == [500, 200]
    assert verifies(sub["secret"], delivered)
    assert delivered.headers[webhooks.HEADER_ID] == alert.id
    assert delivered.headers["smarthome-subject"] == subjects.notification(sub["id"])
    assert m.cloud_event_decoder.decode(delivered.body) == alert
    assert [(d["source"], d["event_id"], d["status"]) for d in deliveries] == [
        ("notify", alert.id, "delivered")
    ]


async def test_a_notification_goes_once_and_only_to_the_subscription_it_names(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    """A filter covering `system.notify.*` does not get the notifications of every
    subscription, nor its own a second time."""
    async with Receiver() as receiver, webhooks_service(service_env, data_dir):
        created = await subs.client.post(
            SUBS, json={"filter": subjects.NOTIFICATIONS_ALL, "url": receiver.url}
        )
        assert created.status_code == 201, created.text
        sub = created.json()
        subs.ids.append(sub["id"])
        alerts = [
            m.make_event(unique_id(), "alert", {"n": n}, event_id=unique_id()) for n in (1, 2)
        ]
        for alert in alerts:
            await bus.publish(js, subjects.notification(sub["id"]), alert, msg_id=alert.id)
        other = m.make_event(unique_id(), "alert", {"n": 3}, event_id=unique_id())
        ack = await bus.publish(js, subjects.notification(unique_id("sub")), other, msg_id=other.id)
        # The filter's consumer has passed all three (settled, acked) ...
        await eventually(lambda: _acked_through(js, subjects.webhook_consumer(sub["id"]), ack.seq))
        # ... and the notify consumer delivered the two addressed to this subscription.
        await eventually(lambda: len(receiver.delivered) >= 2, timeout=15)

    assert ids_of(receiver.delivered) == [a.id for a in alerts]


async def _acked_through(js: JetStreamContext, durable: str, seq: int) -> bool:
    info = await js.consumer_info(subjects.SYSTEM_STREAM, durable)
    return info.ack_floor.stream_seq >= seq


async def test_a_notification_for_no_subscription_is_dead_lettered_with_the_reason(
    js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    nobody = unique_id("sub")
    alert = m.make_event(unique_id(), "alert", {"message": "x"}, event_id=unique_id())
    dead_subject = subjects.deadletter(subjects.notification(nobody))

    async def dead_letter() -> Any:
        with contextlib.suppress(NotFoundError):
            return await js.get_last_msg(subjects.DEADLETTER_STREAM, dead_subject)
        return None

    async with webhooks_service(service_env, data_dir):
        await bus.publish(js, subjects.notification(nobody), alert, msg_id=alert.id)
        dead = await eventually(dead_letter, timeout=15)

    assert dead.headers is not None
    assert f"subscription or channel {nobody!r} does not exist" in dead.headers[bus.DL_REASON]
    assert dead.headers[bus.DL_CONSUMER] == bus.WEBHOOKS_NOTIFY_DURABLE
    assert m.cloud_event_decoder.decode(dead.data) == alert


async def test_events_lost_with_a_connection_are_delivered_once_in_order(
    subs: Subscriptions,
    js: JetStreamContext,
    service_env: dict[str, str],
    data_dir: Path,
    nats_url: str,
) -> None:
    """Events the bus handed out on a connection that died before they reached the service:
    the ack of a newer one on the next connection would ack them undelivered."""
    device = unique_id()
    relay = Relay(int(nats_url.rsplit(":", 1)[1]))
    try:
        async with (
            Receiver() as receiver,
            webhooks_service(service_env, data_dir, NATS_URL=relay.url) as service,
        ):
            sub = await subs.create(receiver, device)
            events = [await publish(js, device, n=n) for n in range(3)]
            await eventually(lambda: len(receiver.delivered) == 3, timeout=15)
            relay.drop()
            events += [await publish(js, device, n=n) for n in range(3, 6)]
            last = (await js.stream_info(subjects.EVENTS_STREAM)).state.last_seq
            await eventually(lambda: _handed_out(js, sub["id"], last), timeout=15)
            relay.cut()
            events += [await publish(js, device, n=n) for n in range(6, 9)]
            await eventually(lambda: len(receiver.delivered) >= 9, timeout=30)
            log = service.tail(100_000)
    finally:
        relay.close()
    assert ids_of(receiver.delivered) == [e.id for e in events]
    assert "deliveries never received" in log


async def _handed_out(js: JetStreamContext, subscription_id: str, last_seq: int) -> bool:
    info = await js.consumer_info(
        subjects.EVENTS_STREAM, subjects.webhook_consumer(subscription_id)
    )
    return info.delivered.stream_seq >= last_seq
