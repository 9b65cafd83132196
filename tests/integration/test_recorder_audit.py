"""The audit log is append-only and hash-chained: the database refuses UPDATE and DELETE
(retention deletes only behind a signed checkpoint), verify names a row edited behind the
platform's back, concurrent writers build one chain, and every row names its principal."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from litestar.testing import AsyncTestClient
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from libs import audit_chain
from libs import messages as m
from libs.db import audit
from libs.db.engine import make_engine, make_sessionmaker
from libs.db.migrate import alembic_config, upgrade
from libs.db.models import AuditCheckpoint, AuditEntry
from libs.principals import Role
from libs.settings import async_database_url
from tests.helpers import eventually, unique_id
from tests.processes import Service

KEY = audit_chain.checkpoint_key("k" * 40)
API = "/api/v1"


@pytest.fixture
async def fresh(tmp_path: Path) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """A database of its own, migrated: a chain no other test writes to (and that this test
    may tamper with)."""
    server = os.environ.get("DATABASE_URL")
    if server:
        name = f"smarthome_audit_{uuid.uuid4().hex[:8]}"
        admin = create_async_engine(async_database_url(server), isolation_level="AUTOCOMMIT")
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = f"{async_database_url(server).rpartition('/')[0]}/{name}"
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    await asyncio.to_thread(upgrade, url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    await engine.dispose()
    if server:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


def entry(n: int, **changes: Any) -> AuditEntry:
    values: dict[str, Any] = {
        "time": m.now(),
        "actor": "user:alice",
        "action": "command.sent",
        "device_id": "lamp",
        "result": "pending",
        "correlation_id": f"c-{n}",
        "detail": {"n": n, "params": {"on": True, "level": 0.5}},
        "stream": "TEST",
        "source_seq": n,
    }
    return AuditEntry(**(values | changes))


async def add(sessions: async_sessionmaker[AsyncSession], *entries: AuditEntry) -> list[int]:
    async with sessions.begin() as session:
        session.add_all(entries)
    return [e.id for e in entries]


def is_postgres(sessions: async_sessionmaker[AsyncSession]) -> bool:
    return sessions.kw["bind"].dialect.name == "postgresql"


async def test_update_and_delete_of_audit_rows_are_refused(
    fresh: async_sessionmaker[AsyncSession],
) -> None:
    [first, _] = await add(fresh, entry(1), entry(2))
    for statement in (
        f"UPDATE audit SET result = 'done' WHERE id = {first}",
        f"DELETE FROM audit WHERE id = {first}",
        "DELETE FROM audit",
    ):
        with pytest.raises(DBAPIError, match="append-only"):
            async with fresh.begin() as session:
                await session.execute(text(statement))
    if is_postgres(fresh):
        with pytest.raises(DBAPIError, match="append-only"):
            async with fresh.begin() as session:
                await session.execute(text("TRUNCATE audit"))
    async with fresh() as session:
        assert await session.scalar(select(func.count()).select_from(AuditEntry)) == 2
    assert (await audit.verify(fresh, KEY)).ok


async def test_a_row_edited_behind_the_platforms_back_is_named_by_verify(
    fresh: async_sessionmaker[AsyncSession],
) -> None:
    ids = await add(fresh, *(entry(n) for n in range(1, 6)))
    assert await audit.verify(fresh, KEY) == audit.Verdict(True, 5, None)
    # An attacker with the database: the triggers out of the way, one row rewritten.
    async with fresh.begin() as session:
        if is_postgres(fresh):
            await session.execute(text("ALTER TABLE audit DISABLE TRIGGER audit_append_only"))
        else:
            await session.execute(text("DROP TRIGGER audit_no_update"))
        await session.execute(
            text("UPDATE audit SET actor = 'user:mallory' WHERE id = :id"), {"id": ids[2]}
        )

    verdict = await audit.verify(fresh, KEY)

    assert not verdict.ok and verdict.first_bad is not None
    assert verdict.first_bad.id == ids[2]
    assert "edited" in verdict.first_bad.reason
    assert verdict.checked == 3


async def test_verify_passes_after_retention_behind_its_signed_checkpoint(
    fresh: async_sessionmaker[AsyncSession],
) -> None:
    old = m.now() - timedelta(days=400)
    ids = await add(
        fresh, *(entry(n, recorded_at=old) for n in (1, 2, 3)), entry(4), entry(5, recorded_at=old)
    )

    cut = await audit.cut_before(fresh, KEY, m.now() - timedelta(days=365))

    # Only the prefix goes: row 5 was recorded "long ago" but after row 4, which is kept.
    assert cut == audit.Cut(ids[2], 3)
    async with fresh() as session:
        kept = list(await session.scalars(select(AuditEntry.id).order_by(AuditEntry.id)))
    assert kept == ids[3:]
    assert await audit.verify(fresh, KEY) == audit.Verdict(True, 2, None)
    # Rows after the checkpoint are still refused; a new row chains on.
    with pytest.raises(DBAPIError, match="append-only"):
        async with fresh.begin() as session:
            await session.execute(text("DELETE FROM audit WHERE id = :id"), {"id": ids[3]})
    await add(fresh, entry(6))
    assert await audit.verify(fresh, KEY) == audit.Verdict(True, 3, None)
    # A checkpoint signed with another key is not ours.
    other = await audit.verify(fresh, audit_chain.checkpoint_key("x" * 40))
    assert not other.ok and other.first_bad is not None
    assert other.first_bad.id == ids[2] and "checkpoint" in other.first_bad.reason


async def test_retention_of_every_row_leaves_the_chain_to_go_on_from_the_checkpoint(
    fresh: async_sessionmaker[AsyncSession],
) -> None:
    old = m.now() - timedelta(days=400)
    ids = await add(fresh, entry(1, recorded_at=old), entry(2, recorded_at=old))
    assert (await audit.cut_before(fresh, KEY, m.now() - timedelta(days=1))).deleted == 2
    [new] = await add(fresh, entry(3))
    assert new == ids[-1] + 1
    assert await audit.verify(fresh, KEY) == audit.Verdict(True, 1, None)
    async with fresh() as session:
        assert await session.scalar(select(func.count()).select_from(AuditCheckpoint)) == 1


async def test_concurrent_writers_and_a_redelivered_batch_build_one_chain(
    fresh: async_sessionmaker[AsyncSession],
) -> None:
    def rows(stream: str, start: int) -> list[dict[str, Any]]:
        return [
            {
                "time": m.now(),
                "actor": f"device:{stream}",
                "action": "device.hello",
                "device_id": stream,
                "result": "hello",
                "correlation_id": None,
                "detail": {},
                "stream": stream,
                "source_seq": start + i,
            }
            for i in range(20)
        ]

    async def write(batch: list[dict[str, Any]]) -> int:
        async with fresh.begin() as session:
            return await session.run_sync(audit.append, batch)

    batches = [rows(s, n) for s in ("A", "B", "C") for n in range(0, 100, 20)]
    written = await asyncio.gather(*(write(b) for b in batches))
    again = await write(batches[0] + rows("A", 1000)[:1])  # a redelivery and one new row

    assert sum(written) == 300 and again == 1
    assert await audit.verify(fresh, KEY) == audit.Verdict(True, 301, None)


async def test_rows_written_before_the_chain_join_it_in_the_migration(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    await asyncio.to_thread(upgrade, url, "0007")
    engine = make_engine(url)
    async with engine.begin() as conn:
        for n in (1, 2):
            await conn.execute(
                text(
                    "INSERT INTO audit (time, actor, action, result, detail, stream, source_seq)"
                    " VALUES (:time, 'user:a', 'x', 'ok', '{\"n\": 1}', 'S', :n)"
                ),
                {"time": m.now().replace(tzinfo=None), "n": n},
            )
    await asyncio.to_thread(upgrade, url)
    sessions = make_sessionmaker(engine)
    await add(sessions, entry(3))
    assert await audit.verify(sessions, KEY) == audit.Verdict(True, 3, None)
    await engine.dispose()


async def test_the_migration_goes_down_and_up_again(
    fresh: async_sessionmaker[AsyncSession],
) -> None:
    await add(fresh, entry(1))
    engine = fresh.kw["bind"]
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    await engine.dispose()  # SQLite: no connection of ours holds the table being rebuilt

    await asyncio.to_thread(command.downgrade, config, "0007")
    async with fresh.begin() as session:  # append-only no more, and no chain
        await session.execute(text("UPDATE audit SET result = 'x'"))
    await asyncio.to_thread(command.upgrade, config, "head")

    assert await audit.verify(fresh, KEY) == audit.Verdict(True, 1, None)
    with pytest.raises(DBAPIError, match="append-only"):
        async with fresh.begin() as session:
            await session.execute(text("UPDATE audit SET result = 'y'"))


# --- over HTTP, on the session's database --------------------------------------------------


async def test_verify_over_http_is_for_administrators(
    client: AsyncTestClient, sessions: async_sessionmaker[AsyncSession], make_token: Any
) -> None:
    await add(sessions, entry(int(uuid.uuid4().int % 10**12)))
    answer = await client.get(f"{API}/audit/verify")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["ok"] is True and body["first_bad"] is None and body["checked"] >= 1
    resident = await make_token(Role.RESIDENT, ["home-a"])
    refused = await client.get(
        f"{API}/audit/verify", headers={"Authorization": f"Bearer {resident}"}
    )
    assert refused.status_code == 403


async def test_the_export_in_both_formats_matches_the_list(
    client: AsyncTestClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    device, first = unique_id("lamp"), uuid.uuid4().int % 10**12
    await add(
        sessions,
        *(
            entry(first + n, device_id=device, detail={"n": n, "text": 'a "b", c\nd'})
            for n in range(5)
        ),
    )
    listed = await client.get(f"{API}/audit", params={"device_id": device})
    ndjson = await client.get(f"{API}/audit/export", params={"device_id": device})
    as_csv = await client.get(f"{API}/audit/export", params={"device_id": device, "format": "csv"})

    items = listed.json()["items"]
    assert len(items) == 5 and {i["principal"]["kind"] for i in items} == {"user"}
    assert ndjson.status_code == 200 and ndjson.headers["content-type"].startswith(
        "application/x-ndjson"
    )
    assert [json.loads(line) for line in ndjson.text.splitlines()] == items
    assert as_csv.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [
        (int(r["id"]), r["actor"], r["principal_kind"], r["hash"], json.loads(r["detail"]))
        for r in table
    ] == [(i["id"], i["actor"], "user", i["hash"], i["detail"]) for i in items]


async def test_the_list_pages_newest_first_when_asked_and_oldest_first_by_default(
    client: AsyncTestClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    device, first = unique_id("lamp"), uuid.uuid4().int % 10**12
    start = m.now() - timedelta(minutes=1)
    # Two rows share a time: their ids order them, both ways.
    times = [start, start + timedelta(seconds=1), start + timedelta(seconds=1)]
    times += [start + timedelta(seconds=2), start + timedelta(seconds=3)]
    ids = await add(
        sessions, *(entry(first + n, device_id=device, time=t) for n, t in enumerate(times))
    )

    async def pages(**params: str) -> list[list[int]]:
        got: list[list[int]] = []
        cursor: str | None = None
        while True:
            query = {"device_id": device, "limit": "2", **params}
            if cursor:
                query["cursor"] = cursor
            answer = await client.get(f"{API}/audit", params=query)
            assert answer.status_code == 200, answer.text
            got.append([i["id"] for i in answer.json()["items"]])
            cursor = answer.json()["next_cursor"]
            if cursor is None:
                return got

    newest = await pages(order="desc")
    oldest = await pages()
    ascending = await pages(order="asc")
    first_page = await client.get(
        f"{API}/audit", params={"device_id": device, "limit": "2", "order": "desc"}
    )
    mixed = await client.get(
        f"{API}/audit", params={"device_id": device, "cursor": first_page.json()["next_cursor"]}
    )

    assert newest == [ids[:2:-1], ids[2:0:-1], ids[:1]]
    assert oldest == ascending == [ids[:2], ids[2:4], ids[4:]]
    # A cursor goes on in the order of the page that gave it, never read in the other one.
    assert mixed.status_code == 422, mixed.text
    assert [e["field"] for e in mixed.json()["errors"]] == ["cursor"]


@pytest.mark.parametrize(
    "route, params, field",
    [
        ("/audit", {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "until"),
        (
            "/audit/export",
            {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
            "until",
        ),
        ("/audit", {"devce_id": "lamp"}, "devce_id"),
        ("/audit/export", {"who": "x"}, "who"),
        ("/audit", {"limit": "1001"}, "limit"),
        ("/audit", {"order": "newest"}, "order"),
        ("/audit/export", {"format": "xml"}, "format"),
    ],
)
async def test_bad_audit_queries_are_422_naming_the_field(
    client: AsyncTestClient, route: str, params: dict[str, str], field: str
) -> None:
    answer = await client.get(API + route, params=params)
    assert answer.status_code == 422, answer.text
    assert field in [e["field"].removeprefix("$.") for e in answer.json()["errors"]], answer.text


async def test_a_command_sent_by_a_user_names_that_user_in_the_audit(
    client: AsyncTestClient,
    service_env: dict[str, str],
    data_dir: Path,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    name, password = unique_id("user"), "correct horse battery"
    made = await client.post(
        f"{API}/users", json={"username": name, "password": password, "role": "admin", "homes": []}
    )
    assert made.status_code == 201, made.text
    tokens = await client.post(f"{API}/auth/token", data={"username": name, "password": password})
    assert tokens.status_code == 200, tokens.text
    as_user = {"Authorization": f"Bearer {tokens.json()['access_token']}"}
    lamp = unique_id("lamp")
    created = await client.post(
        f"{API}/devices", json={"id": lamp, "name": "Lamp", "kind": "light"}
    )
    assert created.status_code == 201, created.text
    sent = await client.post(
        f"{API}/devices/{lamp}/commands", json={"action": "turn_off"}, headers=as_user
    )
    assert sent.status_code in (201, 202), sent.text

    recorder = Service("services.recorder", service_env, data_dir).start()
    try:

        async def command_audited() -> list[dict[str, Any]]:
            page = await client.get(
                f"{API}/audit", params={"device_id": lamp, "action": "command.sent"}
            )
            return list(page.json()["items"])

        [row] = await eventually(command_audited, timeout=30)
    finally:
        recorder.stop()
    assert row["actor"] == f"user:{name}"
    assert row["principal"] == {"kind": "user", "id": name}
    assert row["target"] == f"command:{sent.json()['id']}"
    assert row["correlation_id"] == sent.json()["correlation_id"]
    assert (await client.get(f"{API}/audit/verify")).json()["ok"] is True
