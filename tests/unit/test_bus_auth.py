"""The auth callout's pieces on their own: the JWTs the server will check, the grants, the
revocations read from facts."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import msgspec
import nkeys

from libs import bus_auth, bus_grants, subjects
from libs import messages as m
from services.busauth.authorizer import Revocations
from services.busauth.kicker import _opened, kicks_of


def _claims(token: str) -> dict:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def _request(user: str = "dev-1", password: str = "pw") -> bus_auth.AuthRequest:
    server = nkeys.from_seed(bytearray(nkeys.encode_seed(b"\x01" * 32, nkeys.PREFIX_BYTE_SERVER)))
    claims = {
        "aud": "nats-authorization-request",
        "iss": server.public_key.decode(),
        "nats": {
            "server_id": {"id": "NSERVER", "name": "smarthome"},
            "user_nkey": "UUSERKEY",
            "client_info": {"id": 7, "type": "mqtt", "mqtt_id": user},
            "connect_opts": {"user": user, "pass": password, "name": "n"},
            "type": "authorization_request",
            "version": 2,
        },
    }
    token = bus_auth._encode(claims, server)
    return bus_auth.decode_request(token.encode())


def test_a_request_is_read_as_the_server_sends_it() -> None:
    request = _request("dev-1", "secret")
    assert (request.server_id, request.user_nkey, request.cid) == ("NSERVER", "UUSERKEY", 7)
    assert (request.username, request.password, request.client_type) == ("dev-1", "secret", "mqtt")
    assert request.mqtt_client_id == "dev-1"


def test_the_answer_carries_a_user_jwt_signed_by_the_issuer_for_that_connection() -> None:
    seed = bus_auth.new_issuer_seed()
    signer = bus_auth.issuer(seed)
    request = _request()
    grant = bus_grants.device_grant("dev-1")

    answer = bus_auth.allow(signer, request, bus_auth.user_jwt(signer, request, "dev-1", grant, 60))

    outer = _claims(answer.decode())
    assert (outer["sub"], outer["aud"], outer["iss"]) == (
        "UUSERKEY",
        "NSERVER",
        bus_auth.issuer_public_key(seed),
    )
    inner = _claims(outer["nats"]["jwt"])
    assert (inner["sub"], inner["aud"], inner["name"]) == ("UUSERKEY", "$G", "dev-1")
    assert inner["nats"]["pub"]["allow"] == list(grant.publish)
    assert inner["exp"] - inner["iat"] == 60
    head, body, sig = answer.split(b".")
    padded = sig + b"=" * (-len(sig) % 4)
    assert signer.verify(head + b"." + body, base64.urlsafe_b64decode(padded))


def test_a_refusal_says_why_and_grants_nothing() -> None:
    signer = bus_auth.issuer(bus_auth.new_issuer_seed())
    outer = _claims(bus_auth.deny(signer, _request(), "wrong password").decode())
    assert outer["nats"] == {
        "error": "wrong password",
        "type": "authorization_response",
        "version": 2,
    }


def test_a_device_is_granted_exactly_its_own_subjects() -> None:
    grant = bus_grants.device_grant("dev-1")
    assert grant.publish == (
        "events.dev-1.>",
        "$JS.API.CONSUMER.INFO.COMMANDS.device-dev-1",
        "$JS.API.CONSUMER.MSG.NEXT.COMMANDS.device-dev-1",
        "$JS.ACK.COMMANDS.device-dev-1.>",
    )
    assert grant.subscribe == ("commands.dev-1", "_INBOX.dev.dev-1.>")
    assert not grant.responses


def test_no_service_but_the_gateway_and_the_rules_may_publish_commands() -> None:
    grants = bus_grants.service_grants()
    commanders = {
        name
        for name, grant in grants.items()
        if any(subjects.matches(p, "commands.x") for p in grant.publish if "*" not in p[:1])
    }
    assert commanders == {"gateway", "rules", "operator"}
    for name, grant in grants.items():
        creates = [p for p in grant.publish if p.startswith("$JS.API.STREAM.CREATE.")]
        assert all(p.startswith("$JS.API.STREAM.CREATE.KV_") for p in creates), name
        assert not [p for p in grant.publish if "PURGE" in p or "STREAM.DELETE" in p], name


def test_the_servers_configuration_has_no_anonymous_user() -> None:
    passwords = {u: f"$PW_{n}" for n, u in enumerate((*bus_grants.SERVICE_USERS, "busauth-sys"))}
    text = bus_grants.authorization_config(passwords, "AISSUER")
    assert "no_auth_user" not in text and "token" not in text
    assert 'issuer: "AISSUER"' in text
    assert text.count("password: $PW_") == len(passwords)


def test_a_revoking_fact_kicks_and_holds_the_device() -> None:
    revocations = Revocations()
    now = datetime.now(UTC)
    rejected = m.RegistryFact(
        device_id="d1", change="updated", actor="user:x", correlation_id="c", time=now,
        device={"lifecycle": "rejected"},
    )  # fmt: skip
    rotated = m.ChangeFact(
        what="credentials", id="d2", change="rotated", actor="user:x", correlation_id="c", time=now
    )
    renamed = m.RegistryFact(
        device_id="d3", change="updated", actor="user:x", correlation_id="c", time=now,
        device={"lifecycle": "active"},
    )  # fmt: skip

    kicks = kicks_of(subjects.device_registry("d1"), msgspec.json.encode(rejected), revocations)
    kicks += kicks_of(subjects.credentials_changed("d2"), msgspec.json.encode(rotated), revocations)
    kicks += kicks_of(subjects.device_registry("d3"), msgspec.json.encode(renamed), revocations)

    assert [(k.identity, k.reason) for k in kicks] == [
        ("d1", "device rejected"),
        ("d2", "credentials rotated"),
    ]
    assert revocations.holds("d1") and not revocations.holds("d2")


def test_connz_start_times_are_read_to_the_microsecond() -> None:
    assert _opened("2026-12-06T09:29:46.65174121Z") == datetime(
        2026, 12, 6, 9, 29, 46, 651741, tzinfo=UTC
    )
