"""Signing in, tokens, users and API keys, and what a browser can no longer be made to do."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import update

from libs import accounts
from libs.db.models import ApiKey
from libs.passwords import digest
from libs.principals import Role
from libs.settings import Settings
from services.gateway.app import create_app
from services.gateway.auth.tokens import signing_key
from tests.api import bearer
from tests.helpers import eventually, unique_id

API = "/api/v1"
TOKEN = f"{API}/auth/token"
FORM = {"content-type": "application/x-www-form-urlencoded"}


@pytest.fixture(scope="module")
async def anonymous(settings: Settings) -> AsyncIterator[AsyncTestClient]:
    async with AsyncTestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="module")
def admin(client: AsyncTestClient) -> AsyncTestClient:
    """The shared administrator's client (`tests/conftest.py`), named for what it is here."""
    return client


async def make_user(
    admin: AsyncTestClient, role: str = "resident", homes: list[str] | None = None
) -> tuple[str, str, str]:
    """A user of that role: (id, name, password)."""
    name, password = unique_id("user"), "correct horse battery"
    created = await admin.post(
        f"{API}/users",
        json={"username": name, "password": password, "role": role, "homes": homes or []},
    )
    assert created.status_code == 201, created.text
    return created.json()["id"], name, password


async def login(client: AsyncTestClient, name: str, password: str) -> dict:
    answer = await client.post(TOKEN, data={"username": name, "password": password})
    assert answer.status_code == 200, answer.text
    return answer.json()


async def _refused(request) -> bool:  # type: ignore[no-untyped-def]
    return (await request).status_code == 401


def assert_unauthorized(answer) -> None:  # type: ignore[no-untyped-def]
    assert answer.status_code == 401, answer.text
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert answer.headers["content-type"].startswith("application/problem+json")


async def test_password_grant_gives_a_token_that_opens_the_api(
    anonymous: AsyncTestClient, admin: AsyncTestClient
) -> None:
    _, name, password = await make_user(admin)
    tokens = await login(anonymous, name, password)
    assert tokens["token_type"] == "bearer"
    assert tokens["expires_in"] == 900
    me = await anonymous.get(f"{API}/me", headers=bearer(tokens["access_token"]))
    assert me.status_code == 200, me.text
    assert me.json() | {"permissions": None} == {
        "kind": "user",
        "id": name,
        "actor": f"user:{name}",
        "role": "resident",
        "homes": [],
        "permissions": None,
    }


async def test_wrong_password_and_unknown_user_are_the_same_401(
    anonymous: AsyncTestClient, admin: AsyncTestClient
) -> None:
    _, name, _ = await make_user(admin)
    wrong = await anonymous.post(TOKEN, data={"username": name, "password": "nope-nope"})
    unknown = await anonymous.post(TOKEN, data={"username": "ghost", "password": "nope-nope"})
    assert_unauthorized(wrong)
    assert_unauthorized(unknown)
    assert wrong.json()["detail"] == unknown.json()["detail"]


async def test_sixth_failed_login_in_a_minute_is_429_with_retry_after(
    anonymous: AsyncTestClient, admin: AsyncTestClient
) -> None:
    _, name, password = await make_user(admin)
    for _ in range(5):
        assert_unauthorized(
            await anonymous.post(TOKEN, data={"username": name, "password": "wrong-guess"})
        )
    sixth = await anonymous.post(TOKEN, data={"username": name, "password": password})
    assert sixth.status_code == 429, sixth.text
    assert 1 <= int(sixth.headers["retry-after"]) <= 60


async def test_sign_ins_from_one_address_are_limited(settings: Settings) -> None:
    limited = dataclasses.replace(settings, logins_per_minute_per_address=3)
    async with AsyncTestClient(create_app(limited)) as client:
        for n in range(3):  # other names each time: the per-name count never trips
            answer = await client.post(TOKEN, data={"username": f"x{n}", "password": "nope"})
            assert_unauthorized(answer)
        fourth = await client.post(TOKEN, data={"username": "x4", "password": "nope"})
        assert fourth.status_code == 429, fourth.text
        assert int(fourth.headers["retry-after"]) > 0
        # Everything else is not counted against the address.
        assert (await client.get("/health/live")).status_code == 200


async def test_writes_are_limited_per_principal(settings: Settings, make_token) -> None:
    limited = dataclasses.replace(settings, writes_per_minute=3)
    one, other = bearer(await make_token(Role.ADMIN)), bearer(await make_token(Role.ADMIN))
    location = {"name": "Somewhere", "kind": "home"}
    async with AsyncTestClient(create_app(limited)) as client:
        for _ in range(3):
            made = await client.post(f"{API}/locations", json=location, headers=one)
            assert made.status_code == 201, made.text
        assert (await client.get(f"{API}/locations", headers=one)).status_code == 200  # reads
        fourth = await client.post(f"{API}/locations", json=location, headers=one)
        assert fourth.status_code == 429, fourth.text
        assert int(fourth.headers["retry-after"]) > 0
        assert fourth.headers["content-type"].startswith("application/problem+json")
        theirs = await client.post(f"{API}/locations", json=location, headers=other)
        assert theirs.status_code == 201, theirs.text


@pytest.mark.parametrize(
    "case", ["none", "garbage", "tampered", "expired", "alg-none", "issuer", "audience"]
)
async def test_a_bad_access_token_is_401(
    case: str, anonymous: AsyncTestClient, admin: AsyncTestClient, settings: Settings
) -> None:
    _, name, password = await make_user(admin)
    good = (await login(anonymous, name, password))["access_token"]
    claims = jwt.decode(good, options={"verify_signature": False})
    key = signing_key(settings)
    past = int((datetime.now(UTC) - timedelta(minutes=1)).timestamp())
    header, _, signature = good.split(".")
    forged = {
        "none": None,
        "garbage": "not-a-token",
        "tampered": f"{header}.{_b64({**claims, 'role': 'admin'})}.{signature}",
        "expired": jwt.encode({**claims, "exp": past}, key, algorithm="HS256"),
        "alg-none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64({**claims, 'role': 'admin'})}.",
        "issuer": jwt.encode({**claims, "iss": "someone-else"}, key, algorithm="HS256"),
        "audience": jwt.encode({**claims, "aud": "smarthome-stream"}, key, algorithm="HS256"),
    }[case]
    headers = bearer(forged) if forged else {}
    assert_unauthorized(await anonymous.get(f"{API}/devices", headers=headers))


def _b64(value: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


async def test_a_refresh_token_works_once_and_a_replay_revokes_the_sign_in(
    anonymous: AsyncTestClient, admin: AsyncTestClient
) -> None:
    _, name, password = await make_user(admin)
    first = await login(anonymous, name, password)
    second = await anonymous.post(
        f"{API}/auth/refresh", json={"refresh_token": first["refresh_token"]}
    )
    assert second.status_code == 200, second.text
    replay = await anonymous.post(
        f"{API}/auth/refresh", json={"refresh_token": first["refresh_token"]}
    )
    assert_unauthorized(replay)
    # The thief's copy and the rightful one are both dead now.
    after = await anonymous.post(
        f"{API}/auth/refresh", json={"refresh_token": second.json()["refresh_token"]}
    )
    assert_unauthorized(after)


async def test_logout_and_password_change_end_the_sign_in(
    anonymous: AsyncTestClient, admin: AsyncTestClient
) -> None:
    user_id, name, password = await make_user(admin)
    one = await login(anonymous, name, password)
    two = await login(anonymous, name, password)
    out = await anonymous.post(
        f"{API}/auth/logout",
        json={"refresh_token": one["refresh_token"]},
        headers=bearer(one["access_token"]),
    )
    assert out.status_code == 204, out.text
    assert_unauthorized(
        await anonymous.post(f"{API}/auth/refresh", json={"refresh_token": one["refresh_token"]})
    )
    changed = await anonymous.patch(
        f"{API}/users/{user_id}",
        json={"password": "a brand new secret", "current_password": password},
        headers=bearer(two["access_token"]),
    )
    assert changed.status_code == 200, changed.text
    assert_unauthorized(
        await anonymous.post(f"{API}/auth/refresh", json={"refresh_token": two["refresh_token"]})
    )
    await login(anonymous, name, "a brand new secret")


async def test_a_resident_cannot_raise_its_own_role_or_homes(
    anonymous: AsyncTestClient, admin: AsyncTestClient
) -> None:
    user_id, name, password = await make_user(admin)
    token = (await login(anonymous, name, password))["access_token"]
    for change, field in (({"role": "admin"}, "$.role"), ({"homes": ["x"]}, "$.homes")):
        refused = await anonymous.patch(
            f"{API}/users/{user_id}", json=change, headers=bearer(token)
        )
        assert refused.status_code == 422, refused.text
        assert refused.json()["errors"][0]["field"] == field
    mine = await admin.get(f"{API}/users/{user_id}")
    assert (mine.json()["role"], mine.json()["homes"]) == ("resident", [])


async def test_users_and_api_keys_are_for_administrators(
    anonymous: AsyncTestClient, admin: AsyncTestClient, make_token
) -> None:
    resident = bearer(await make_token(Role.RESIDENT, ["home"]))
    assert (await anonymous.get(f"{API}/users", headers=resident)).status_code == 403
    assert (await anonymous.get(f"{API}/api-keys", headers=resident)).status_code == 403
    made = await anonymous.post(
        f"{API}/api-keys", json={"name": "x", "role": "resident"}, headers=resident
    )
    assert made.status_code == 403


async def test_an_api_key_is_shown_once_works_and_stops_when_revoked(
    anonymous: AsyncTestClient, admin: AsyncTestClient
) -> None:
    made = await admin.post(f"{API}/api-keys", json={"name": "hub", "role": "installer"})
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    assert key.startswith("shk_")
    listed = (await admin.get(f"{API}/api-keys")).json()["items"]
    assert all("key" not in item for item in listed)
    me = await anonymous.get(f"{API}/me", headers=bearer(key))
    assert me.json()["actor"] == f"apikey:{made.json()['id']}"
    assert (await admin.delete(f"{API}/api-keys/{made.json()['id']}")).status_code == 204
    # Revoked through one gateway, refused by another that had verified it (the bus tells).
    await eventually(lambda: _refused(anonymous.get(f"{API}/me", headers=bearer(key))), timeout=5)


async def test_an_expired_api_key_is_refused(
    anonymous: AsyncTestClient, sessions, settings: Settings
) -> None:
    key = await accounts.issue_api_key(sessions, "old", Role.RESIDENT, [], "tests")
    assert (await anonymous.get(f"{API}/me", headers=bearer(key))).status_code == 200
    async with sessions.begin() as session:
        await session.execute(
            update(ApiKey)
            .where(ApiKey.key_hash == digest(key))
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    async with AsyncTestClient(create_app(settings)) as fresh:  # no verified key cached yet
        assert_unauthorized(await fresh.get(f"{API}/me", headers=bearer(key)))


async def test_a_key_cannot_have_more_rights_than_its_maker(
    anonymous: AsyncTestClient, admin: AsyncTestClient
) -> None:
    _, name, password = await make_user(admin, role="installer")
    token = (await login(anonymous, name, password))["access_token"]
    # An installer may not make keys at all; an admin may, up to admin.
    refused = await anonymous.post(
        f"{API}/api-keys", json={"name": "x", "role": "admin"}, headers=bearer(token)
    )
    assert refused.status_code == 403


async def test_health_and_the_ui_page_need_no_token(anonymous: AsyncTestClient) -> None:
    assert (await anonymous.get("/health/live")).status_code == 200
    assert (await anonymous.get("/")).status_code == 200
    assert_unauthorized(await anonymous.get("/metrics"))
    assert_unauthorized(await anonymous.get("/schema/openapi.json"))


async def test_metrics_and_schema_are_for_administrators(
    anonymous: AsyncTestClient, admin: AsyncTestClient, make_token
) -> None:
    resident = bearer(await make_token(Role.RESIDENT, []))
    assert (await anonymous.get("/metrics", headers=resident)).status_code == 403
    assert (await admin.get("/metrics")).status_code == 200
    assert (await admin.get("/schema/openapi.json")).status_code == 200


# --- the browser ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
async def test_json_routes_refuse_other_content_types(
    content_type: str, admin: AsyncTestClient
) -> None:
    body = json.dumps({"id": unique_id(), "name": "Lamp", "kind": "light"})
    answer = await admin.post(
        f"{API}/devices", content=body, headers={"content-type": content_type}
    )
    assert answer.status_code == 415, answer.text


async def test_a_write_from_a_foreign_origin_is_refused(admin: AsyncTestClient) -> None:
    device = {"id": unique_id(), "name": "Lamp", "kind": "light"}
    foreign = await admin.post(
        f"{API}/devices", json=device, headers={"origin": "https://evil.example"}
    )
    assert foreign.status_code == 403, foreign.text
    assert (await admin.get(f"{API}/devices/{device['id']}")).status_code == 404
    own = await admin.post(
        f"{API}/devices", json=device, headers={"origin": "http://testserver.local"}
    )
    assert own.status_code == 201, own.text


async def test_an_unknown_host_is_refused_but_probes_and_scrapes_answer(
    anonymous: AsyncTestClient, admin: AsyncTestClient
) -> None:
    refused = await anonymous.get(f"{API}/devices", headers={"host": "rebound.example"})
    assert refused.status_code == 400, refused.text
    probe = await anonymous.get("/health/live", headers={"host": "10.1.2.3:8000"})
    assert probe.status_code == 200
    scrape = await admin.get("/metrics", headers={"host": "10.1.2.3:8000"})  # by the pod's IP
    assert scrape.status_code == 200


async def test_every_answer_carries_the_security_headers(anonymous: AsyncTestClient) -> None:
    for path in ("/", f"{API}/devices", "/no-such-page", "/health/live"):
        headers = (await anonymous.get(path)).headers
        assert "default-src 'self'" in headers["content-security-policy"], path
        assert "frame-ancestors 'none'" in headers["content-security-policy"], path
        assert headers["x-content-type-options"] == "nosniff", path
        assert headers["referrer-policy"] == "no-referrer", path


async def test_deeply_nested_json_is_a_422(admin: AsyncTestClient) -> None:
    deep = '{"id":"e1","source":"x","type":"telemetry","subject":"d","specversion":"1.0","data":'
    deep += '{"a":' * 10_000 + "1" + "}" * 10_000 + "}"
    answer = await admin.post(
        f"{API}/events", content=deep, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 422, answer.text[:300]


async def test_a_trailing_newline_is_not_part_of_an_id(admin: AsyncTestClient) -> None:
    answer = await admin.post(
        f"{API}/devices", json={"id": "lamp\n", "name": "Lamp", "kind": "light"}
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"][0]["field"] == "$.id"
