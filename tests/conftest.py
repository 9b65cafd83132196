"""Real servers, once per test session: nats-server from the wheel, the database, Redis.

DATABASE_URL / REDIS_URL (set by .ci/run when the local servers answer) select Postgres and
Redis; without them the embedded defaults (SQLite, in-process cache) are used.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from libs import accounts, bus, bus_auth, bus_grants, embedded_nats
from libs.db.engine import make_engine, make_sessionmaker
from libs.db.migrate import upgrade
from libs.principals import Role
from libs.settings import Settings, async_database_url

if TYPE_CHECKING:
    from litestar.testing import AsyncTestClient

# A pytest-xdist worker starts with COLUMNS=80 and LINES=24 in its environment, a serial run
# with neither. The CLI's console (services/ctl/output.py) reads COLUMNS once, at import: it
# would print 80 columns whatever width a test asks for (tests/integration/test_ctl.py).
if os.environ.get("PYTEST_XDIST_WORKER"):
    for name in ("COLUMNS", "LINES"):
        os.environ.pop(name, None)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("smarthome")


@pytest.fixture(scope="session")
def mqtt_port() -> int:
    """The session's nats-server also listens for MQTT devices, here."""
    return embedded_nats.free_port()


@pytest.fixture(scope="session")
def bus_passwords(data_dir: Path) -> dict[str, bus_grants.ServicePassword]:
    """The services' bus passwords (and the operator's, the tests' own client's), kept in the
    session's data dir like the launcher keeps them: services started as processes find theirs."""
    return bus_grants.ensure_service_passwords(data_dir / "bus")


@pytest.fixture(scope="session")
def nats_url(data_dir: Path, mqtt_port: int, bus_passwords: dict) -> Iterator[str]:
    """The session's nats-server, with no anonymous user: services as their static users,
    everyone else through the auth callout (no busauth running: refused)."""
    port = embedded_nats.free_port()
    proc = embedded_nats.start(
        data_dir / "nats",
        port,
        data_dir / "nats.log",
        mqtt_port=mqtt_port,
        auth=bus_auth.embedded_authorization(data_dir / "bus"),
    )
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


async def _create_postgres_database(server_url: str) -> str:
    """A database of our own on the given server, so that runs never see each other's rows."""
    name = f"smarthome_test_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(async_database_url(server_url), isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    await admin.dispose()
    base, _, _ = async_database_url(server_url).rpartition("/")
    return f"{base}/{name}"


async def _drop_postgres_database(server_url: str, url: str) -> None:
    name = url.rpartition("/")[2]
    admin = create_async_engine(async_database_url(server_url), isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    await admin.dispose()


@pytest.fixture(scope="session")
def database_url(data_dir: Path) -> Iterator[str]:
    server = os.environ.get("DATABASE_URL")
    if server:
        url = asyncio.run(_create_postgres_database(server))
    else:
        url = f"sqlite+aiosqlite:///{data_dir / 'test.db'}"
    upgrade(url)
    yield url
    if server:
        asyncio.run(_drop_postgres_database(server, url))


def _worker_redis_url(url: str, worker: str | None) -> str:
    """The Redis database of this pytest-xdist worker: the one REDIS_URL names for the
    first (or with no xdist), the next numbers for the others. The database number is the
    product's own setting (the URL's path); keys are not prefixed per run, so two workers
    caching a device of one id (`lamp-1`, the demo's) in one database would read each
    other's states."""
    index = int(worker.removeprefix("gw")) if worker else 0
    if not index:
        return url
    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0) + index
    return urlunsplit(parts._replace(path=f"/{db}"))


@pytest.fixture(scope="session")
def redis_url() -> str | None:
    url = os.environ.get("REDIS_URL")
    return _worker_redis_url(url, os.environ.get("PYTEST_XDIST_WORKER")) if url else None


@pytest.fixture(scope="session")
def settings(
    data_dir: Path, nats_url: str, database_url: str, redis_url: str | None, bus_passwords: dict
) -> Settings:
    """The settings of a gateway run in the test process: the gateway's bus identity."""
    return Settings(
        data_dir=data_dir,
        nats_url=nats_url,
        nats_user="gateway",
        nats_password=bus_passwords["gateway"].password,
        database_url=database_url,
        redis_url=redis_url,
        heartbeat_timeout_s=2.0,
        # AsyncTestClient's host, beside the loopback names the gateway answers by default.
        allowed_hosts=("testserver.local", "127.0.0.1", "localhost"),
    )


@pytest.fixture(scope="session")
def service_env(settings: Settings) -> dict[str, str]:
    """Environment for services started as subprocesses against the session's servers."""
    env = {
        **os.environ,
        "NATS_URL": settings.effective_nats_url,
        "DATABASE_URL": settings.effective_database_url,
        "SMARTHOME_DATA_DIR": str(settings.data_dir),
        "SMARTHOME_HEARTBEAT_TIMEOUT": str(settings.heartbeat_timeout_s),
    }
    if settings.redis_url:
        env["REDIS_URL"] = settings.redis_url
    else:
        env.pop("REDIS_URL", None)
    return env


@pytest.fixture(scope="session")
async def nc(nats_url: str, bus_passwords: dict) -> AsyncIterator:
    """The tests' own client: the operator identity (everything, as a person with the nats
    CLI); services started as processes connect as themselves."""
    conn = await bus.connect(nats_url, "tests", "operator", bus_passwords["operator"].password)
    await bus.ensure_streams(conn.jetstream())
    yield conn
    await conn.drain()


@pytest.fixture(scope="session")
async def js(nc):  # type: ignore[no-untyped-def]
    return nc.jetstream()


@pytest.fixture(scope="session")
async def sessions(database_url: str) -> AsyncIterator:
    engine = make_engine(database_url)
    yield make_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture(scope="session")
async def admin_token(sessions) -> str:  # type: ignore[no-untyped-def]
    """An administrator's API key: the tests' own credentials for the HTTP API."""
    return await accounts.issue_api_key(sessions, "tests", Role.ADMIN, [], "tests")


@pytest.fixture(scope="session")
async def make_token(sessions):  # type: ignore[no-untyped-def]
    """`await make_token(Role.RESIDENT, ["home-a"])`: an API key of that role and homes (the
    homes need not be defined locations: keys made here skip the API's checks)."""

    async def make(role: Role, homes: list[str] | None = None) -> str:
        return await accounts.issue_api_key(sessions, f"tests-{role}", role, homes or [], "tests")

    return make


@pytest.fixture(scope="module")
async def client(settings: Settings, admin_token: str) -> AsyncIterator[AsyncTestClient]:
    """The gateway in-process, as an administrator (one app per test module)."""
    # Imported here: the unit tests need no gateway, and importing it costs a second.
    from tests.api import api_client

    async with api_client(settings, admin_token) as c:
        yield c
