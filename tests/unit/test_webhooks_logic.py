"""The pure parts of webhook delivery: signatures, the SSRF check, the retry schedule, what an
attempt leaves behind, and the request a bus message becomes. (No servers: these belong in
tests/unit; they sit here only because this change may add test files under this name.)"""

from __future__ import annotations

import ipaddress
import random
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from nats.js.api import AckPolicy, DeliverPolicy

from libs import bus, subjects, webhooks
from libs import messages as m
from libs import settings as settings_mod
from libs.settings import SettingsError
from services.webhooks.attempts import Previous, after_attempt
from services.webhooks.payload import Item, event_id, render, render_batch
from services.webhooks.sender import Outcome, failed

# The Standard Webhooks reference test vector.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1614265330
BODY = b'{"test": 2432232314}'
SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
T0 = datetime(2026, 1, 1, tzinfo=UTC)


# --- signatures --------------------------------------------------------------------------------


def test_signature_matches_the_standard_webhooks_reference() -> None:
    assert webhooks.sign(SECRET, MSG_ID, TIMESTAMP, BODY) == SIGNATURE


def test_verify_accepts_a_fresh_signature_among_several_and_refuses_tampering() -> None:
    now = TIMESTAMP + 10
    rotated = f"v1,bm90IHRoaXMgb25l {SIGNATURE}"

    assert webhooks.verify(SECRET, MSG_ID, str(TIMESTAMP), BODY, SIGNATURE, now=now)
    assert webhooks.verify(SECRET, MSG_ID, TIMESTAMP, BODY, rotated, now=now)
    assert not webhooks.verify(SECRET, MSG_ID, TIMESTAMP, BODY + b" ", SIGNATURE, now=now)
    assert not webhooks.verify(SECRET, "msg_other", TIMESTAMP, BODY, SIGNATURE, now=now)
    assert not webhooks.verify(SECRET, MSG_ID, TIMESTAMP, BODY, "v2" + SIGNATURE[2:], now=now)
    assert not webhooks.verify(SECRET, MSG_ID, TIMESTAMP, BODY, SIGNATURE, now=now + 3600)
    assert not webhooks.verify(SECRET, MSG_ID, "soon", BODY, SIGNATURE, now=now)


def test_new_secrets_are_valid_and_different() -> None:
    a, b = webhooks.new_secret(), webhooks.new_secret()

    assert a != b
    assert len(webhooks.secret_key(a)) == webhooks.SECRET_BYTES


@pytest.mark.parametrize(
    ("secret", "says"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_"),
        ("whsec_not*base64", "not valid base64"),
        ("whsec_c2hvcnQ=", "got 5 bytes"),
    ],
)
def test_a_malformed_secret_says_what_a_secret_is(secret: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        webhooks.secret_key(secret)


# --- where webhooks may go ---------------------------------------------------------------------


def resolver(*addresses: str) -> webhooks.Resolver:
    return lambda host, port: list(addresses)


def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"{host} was looked up although it is an address")


def only(address: str) -> webhooks.IPNetwork:
    """The allow-net holding exactly `address` (as it is judged: unwrapped)."""
    ip = webhooks.classify(address).address
    return ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")


@pytest.mark.parametrize(
    ("address", "unwrapped"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),  # IPv4-mapped
        ("64:ff9b::7f00:1", "127.0.0.1"),  # NAT64: the last 32 bits
        ("64:ff9b::a00:1", "10.0.0.1"),
        ("2002:7f00:1::", "127.0.0.1"),  # 6to4: 2002:AABB:CCDD:: is A.B.C.D
        ("2002:a9fe:a9fe:1::5", "169.254.169.254"),
        ("::127.0.0.1", "127.0.0.1"),  # IPv4-compatible
        ("::1", "::1"),  # IPv6's own loopback, not 0.0.0.1
        ("::", "::"),
        ("2606:4700::1", "2606:4700::1"),
        ("10.0.0.1", "10.0.0.1"),
    ],
)
def test_an_ipv4_address_inside_an_ipv6_one_is_judged_as_that_ipv4_address(
    address: str, unwrapped: str
) -> None:
    assert str(webhooks.unwrap(ipaddress.ip_address(address))) == unwrapped


@pytest.mark.parametrize(
    ("address", "range_"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("64:ff9b::7f00:1", "loopback"),
        ("2002:7f00:1::", "loopback"),
        ("::127.0.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.20", "private"),
        ("fd12:3456::1", "private"),
        ("fec0::1", "private"),
        ("::ffff:10.0.0.1", "private"),
        ("169.254.10.1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("100.64.0.1", "shared (carrier-grade NAT)"),
        ("169.254.169.254", "cloud metadata"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("192.0.2.1", "non-public"),
        ("198.18.0.1", "non-public"),
        ("2001:db8::1", "non-public"),
    ],
)
def test_a_non_public_address_takes_an_admin_and_an_allow_net(address: str, range_: str) -> None:
    net = [only(address)]

    nobody = webhooks.refused_range(address)
    member = webhooks.refused_range(address, net, allow_private_targets=False)
    admin_without_net = webhooks.refused_range(address, allow_private_targets=True)
    admin_with_net = webhooks.refused_range(address, net, allow_private_targets=True)

    assert webhooks.classify(address).range == range_
    assert nobody is not None and range_ in nobody
    assert member is not None and "only an administrator" in member
    assert (
        admin_without_net is not None
        and "outside SMARTHOME_WEBHOOK_ALLOW_NETS" in admin_without_net
    )
    assert admin_with_net is None


@pytest.mark.parametrize(
    ("address", "range_"),
    [
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("::ffff:0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("::ffff:224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("64:ff9b:1::a00:1", "reserved"),  # local-use NAT64: no telling where it leads
    ],
)
def test_multicast_unspecified_and_reserved_addresses_are_never_reached(
    address: str, range_: str
) -> None:
    everything = webhooks.allow_nets(["0.0.0.0/0", "::/0"])

    reason = webhooks.refused_range(address, everything, allow_private_targets=True)

    assert reason is not None and range_ in reason and "never" in reason


@pytest.mark.parametrize(
    "address",
    [
        "93.184.215.14",
        "2606:4700::1",
        "::ffff:93.184.215.14",
        "64:ff9b::5db8:d70e",
        "2002:5db8:d70e::1",
    ],
)
def test_a_public_address_is_allowed_to_everyone(address: str) -> None:
    assert webhooks.classify(address).range is None
    assert webhooks.refused_range(address, allow_private_targets=False) is None


def test_an_admins_private_target_must_be_inside_one_of_the_allow_nets() -> None:
    nets = webhooks.allow_nets(["192.168.1.0/24", "fd00::/8", "10.0.0.7"])

    def refused(address: str) -> str | None:
        return webhooks.refused_range(address, nets, allow_private_targets=True)

    assert refused("192.168.1.20") is None
    assert refused("::ffff:192.168.1.20") is None  # judged after unwrapping
    assert refused("fd00::5") is None
    assert refused("10.0.0.7") is None  # a bare address is a /32
    for outside in ("192.168.2.1", "10.0.0.8", "127.0.0.1", "169.254.169.254"):
        reason = refused(outside)
        assert reason is not None and "outside SMARTHOME_WEBHOOK_ALLOW_NETS" in reason


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/",
        "http://[::ffff:127.0.0.1]:8080/",
        "http://[64:ff9b::7f00:1]:8080/",
        "http://10.0.0.1/",
    ],
)
def test_urls_into_the_platforms_own_network_are_refused(url: str) -> None:
    loopback = webhooks.allow_nets(["127.0.0.0/8"])

    with pytest.raises(ValueError, match="only an administrator") as member:
        webhooks.check_url(url, loopback, allow_private_targets=False, resolve=no_dns)
    with pytest.raises(ValueError, match="outside SMARTHOME_WEBHOOK_ALLOW_NETS"):
        webhooks.check_url(url, (), allow_private_targets=True, resolve=no_dns)

    assert "SSRF" in str(member.value)
    if "10.0.0.1" in url:
        with pytest.raises(ValueError, match="private address outside"):
            webhooks.check_url(url, loopback, allow_private_targets=True, resolve=no_dns)
    else:
        webhooks.check_url(url, loopback, allow_private_targets=True, resolve=no_dns)
        assert "loopback" in str(member.value) and "127.0.0.1" in str(member.value)


def test_a_name_is_refused_if_any_of_its_addresses_is_without_saying_which() -> None:
    mixed = resolver("93.184.215.14", "10.1.2.3")
    public = resolver("93.184.215.14", "2606:4700::1")

    with pytest.raises(ValueError) as refused:
        webhooks.check_url("https://hooks.example/in", allow_private_targets=False, resolve=mixed)
    webhooks.check_url("https://hooks.example/in", allow_private_targets=False, resolve=public)

    assert str(refused.value).startswith("hooks.example resolves to a private address")
    assert "10.1.2.3" not in str(refused.value)


def test_the_scheme_is_checked_whoever_asks() -> None:
    everything = webhooks.allow_nets(["0.0.0.0/0", "::/0"])

    with pytest.raises(ValueError, match="http:// or https://"):
        webhooks.check_url("file:///etc/passwd", everything, allow_private_targets=True)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://x/", "not `ftp`"),
        ("//host/path", "no scheme"),
        ("http:///path", "must name a host"),
        ("http://host:99999/", "port"),
    ],
)
def test_malformed_urls_say_why(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        webhooks.check_url(url, allow_private_targets=False, resolve=resolver("93.184.215.14"))


def test_a_host_that_does_not_resolve_is_refused() -> None:
    def nxdomain(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(ValueError, match="does not resolve"):
        webhooks.check_url(
            "https://nowhere.invalid/", allow_private_targets=False, resolve=nxdomain
        )


@pytest.mark.parametrize(
    ("status", "failure"),
    [(302, "3xx"), (400, "4xx"), (404, "4xx"), (500, "5xx"), (503, "5xx")],
)
def test_a_failed_status_is_kept_as_its_class(status: int, failure: str) -> None:
    assert webhooks.Failure.of_status(status) == failure


@pytest.mark.parametrize(
    ("filter_subject", "stream"),
    [("events.*.telemetry", "EVENTS"), ("system.alert.>", "SYSTEM"), ("commands.x", "COMMANDS")],
)
def test_filters_read_from_their_stream(filter_subject: str, stream: str) -> None:
    assert subjects.check_filter(filter_subject) == stream


@pytest.mark.parametrize("filter_subject", ["events..x", "events.a b", ">", "events", "x.>", ""])
def test_bad_filters_are_refused(filter_subject: str) -> None:
    with pytest.raises(ValueError):
        subjects.check_filter(filter_subject)


# --- the retry schedule ------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    rng = random.Random(7)
    for attempt in range(1, 30):
        ceiling = min(3600.0, 1.0 * 2 ** (attempt - 1))
        delays = [webhooks.backoff(attempt, 1.0, 3600.0, rng) for _ in range(50)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # spread over the whole range, not bunched at 0
    assert webhooks.backoff(10_000, 1.0, 3600.0, rng) <= 3600.0


def test_retries_last_for_the_window_and_end_on_its_last_moment() -> None:
    policy = webhooks.RetryPolicy(base_s=1.0, cap_s=3600.0, retry_for_s=86400.0)
    rng = random.Random(1)

    early = webhooks.retry_delay(policy, 1, T0, T0 + timedelta(seconds=1), rng)
    near_end = webhooks.retry_delay(policy, 40, T0, T0 + timedelta(seconds=86399), rng)
    over = webhooks.retry_delay(policy, 41, T0, T0 + timedelta(seconds=86400), rng)

    assert early is not None and 0 <= early <= 1.0
    assert near_end is not None and near_end <= 1.0
    assert over is None


def test_an_attempt_is_delivered_retried_or_dead_lettered() -> None:
    policy = webhooks.RetryPolicy(base_s=1.0, retry_for_s=60.0)
    rng = random.Random(3)
    refused = failed(webhooks.Failure.SERVER_ERROR, "HTTP 500", 500)
    later = T0 + timedelta(seconds=61)

    first = after_attempt(None, refused, T0, policy, rng)
    second = after_attempt(
        Previous(1, T0), Outcome(True, 204), T0 + timedelta(seconds=1), policy, rng
    )
    last = after_attempt(Previous(7, T0), refused, later, policy, rng)
    redriven = after_attempt(Previous(8, T0), refused, later, None, rng)

    assert (first.status, first.attempts, first.first_attempt_at) == ("pending", 1, T0)
    assert first.retry_in_s is not None and first.next_attempt_at is not None
    assert first.next_attempt_at == T0 + timedelta(seconds=first.retry_in_s)
    assert (second.status, second.attempts, second.status_code) == ("delivered", 2, 204)
    assert second.next_attempt_at is None
    assert (last.status, last.attempts, last.error) == ("failed", 8, "5xx: HTTP 500")
    assert last.next_attempt_at is None
    assert (redriven.status, redriven.attempts) == ("failed", 9)


def test_settings_come_from_the_environment_with_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    default = webhooks.WebhookSettings.of(settings_mod.load())
    for name, value in {
        "SMARTHOME_WEBHOOK_ALLOW_NETS": "192.168.1.0/24, fd00::/8",
        "SMARTHOME_WEBHOOK_RETRY_BASE": "0.5",
        "SMARTHOME_WEBHOOK_RETRY_FOR": "600",
        "SMARTHOME_WEBHOOK_TIMEOUT": "3",
    }.items():
        monkeypatch.setenv(name, value)
    custom = webhooks.WebhookSettings.of(settings_mod.load())

    assert default == webhooks.WebhookSettings((), 10.0, webhooks.RetryPolicy(1.0, 3600.0, 86400.0))
    assert custom.allow_nets == (
        ipaddress.ip_network("192.168.1.0/24"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert custom.timeout_s == 3.0
    assert (custom.retry.base_s, custom.retry.retry_for_s) == (0.5, 600.0)
    monkeypatch.setenv("SMARTHOME_WEBHOOK_TIMEOUT", "soon")
    with pytest.raises(SettingsError, match="SMARTHOME_WEBHOOK_TIMEOUT"):
        settings_mod.load()
    monkeypatch.setenv("SMARTHOME_WEBHOOK_TIMEOUT", "3")
    monkeypatch.setenv("SMARTHOME_WEBHOOK_ALLOW_NETS", "192.168.1.0/24,the-lan")
    with pytest.raises(SettingsError, match=r"SMARTHOME_WEBHOOK_ALLOW_NETS.*the-lan"):
        settings_mod.load()


# --- the request a bus message becomes ---------------------------------------------------------


def event(**changes: object) -> m.CloudEvent:
    base = m.make_event("lamp-1", "telemetry", {"power_w": 60.0}, correlation_id="c-1")
    return msgspec.structs.replace(base, **changes)


def test_structured_mode_sends_the_event_as_it_is_on_the_bus() -> None:
    e = event()
    data = m.encode(e)

    payload = render("structured", e.nats_subject, data, None, "EVENTS-1")

    assert (payload.msg_id, payload.body) == (e.id, data)
    assert payload.headers["content-type"] == "application/cloudevents+json"
    assert payload.headers["smarthome-subject"] == "events.lamp-1.telemetry"


def test_binary_mode_sends_data_with_the_attributes_in_headers() -> None:
    e = event(source="device/lampe-küche", time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))

    payload = render("binary", e.nats_subject, m.encode(e), None, "EVENTS-1")
    empty = render("binary", e.nats_subject, m.encode(event(data=None)), None, "EVENTS-2")

    assert msgspec.json.decode(payload.body) == {"power_w": 60.0}
    assert payload.headers["content-type"] == "application/json"
    assert payload.headers["ce-id"] == e.id == payload.msg_id
    assert payload.headers["ce-type"] == "telemetry"
    assert payload.headers["ce-subject"] == "lamp-1"
    assert payload.headers["ce-specversion"] == "1.0"
    assert payload.headers["ce-time"] == "2026-01-02T03:04:05Z"
    assert payload.headers["ce-correlationid"] == "c-1"
    assert payload.headers["ce-source"] == "device/lampe-k%C3%BCche"  # headers are ASCII
    assert empty.body == b"" and "content-type" not in empty.headers


def test_other_bus_messages_go_as_json_named_by_their_message_id() -> None:
    fact = b'{"device_id": "lamp-1", "change": "created"}'

    as_json = render("binary", "system.device.lamp-1.registry", fact, {bus.MSG_ID: "r-1"}, "S-9")
    as_bytes = render("structured", "system.subscription.x.changed", b"", None, "SYSTEM-10")

    assert (as_json.msg_id, as_json.body) == ("r-1", fact)
    assert as_json.headers["content-type"] == "application/json"
    assert as_bytes.msg_id == "SYSTEM-10"
    assert as_bytes.headers["content-type"] == "application/octet-stream"


def item(seq: int, data: bytes, headers: dict[str, str] | None = None) -> Item:
    return Item("EVENTS", seq, "events.lamp-1.telemetry", data, headers)


def test_batched_mode_sends_a_json_array_of_the_events_in_order() -> None:
    events = [event(data={"n": n}) for n in range(3)]
    items = [item(10 + n, m.encode(e)) for n, e in enumerate(events)]

    payload = render_batch(items)

    assert msgspec.json.decode(payload.body, type=list[m.CloudEvent]) == events
    assert payload.headers["content-type"] == "application/cloudevents-batch+json"
    assert payload.headers["smarthome-count"] == "3"
    assert [event_id(i) for i in items] == [e.id for e in events]


def test_a_batch_is_named_by_its_events_the_same_on_every_retry() -> None:
    a, b, c = (item(seq, m.encode(event())) for seq in (10, 11, 13))

    assert render_batch([a, b]).msg_id == render_batch([a, b]).msg_id
    assert render_batch([a, b]).msg_id != render_batch([a, c]).msg_id
    assert render_batch([a, c]).msg_id.startswith("batch-EVENTS-10-13-")


def test_other_bus_messages_are_wrapped_as_cloud_events_in_a_batch() -> None:
    fact = b'{"device_id": "lamp-1"}'

    wrapped = msgspec.json.decode(
        render_batch([item(5, fact, {bus.MSG_ID: "r-1"}), item(6, b"\x00raw")]).body
    )

    assert wrapped[0] == {
        "specversion": "1.0",
        "id": "r-1",
        "source": "smarthome",
        "type": "events.lamp-1.telemetry",
        "subject": "events.lamp-1.telemetry",
        "datacontenttype": "application/json",
        "data": {"device_id": "lamp-1"},
    }
    assert wrapped[1]["id"] == "EVENTS-6" and wrapped[1]["data_base64"] == "AHJhdw=="


# --- consumers ---------------------------------------------------------------------------------


def test_a_subscription_consumer_acks_batches_and_bounds_what_is_in_flight() -> None:
    plain = webhooks.consumer_config("s1", "events.*.telemetry", 20.0)
    batched = webhooks.consumer_config("s1", "events.>", 20.0, batch_size=500)
    notify = webhooks.notify_consumer_config("s1", 20.0)

    assert plain.ack_policy == AckPolicy.ALL and plain.deliver_policy == DeliverPolicy.NEW
    assert plain.max_ack_pending == 2 * webhooks.FETCH_BATCH
    assert batched.max_ack_pending == 1000
    assert plain.durable_name == subjects.webhook_consumer("s1") == "webhook-s1"
    assert notify.durable_name == "webhook-s1-notify"
    assert notify.filter_subject == subjects.notification("s1") == "system.notify.s1"


def test_notification_subjects_name_their_subscription() -> None:
    assert subjects.parse_notification(subjects.notification("abc")) == "abc"
    for subject in ("system.notify", "system.notify.a.b", "system.alert.abc"):
        with pytest.raises(ValueError, match=r"is not system\.notify\."):
            subjects.parse_notification(subject)
