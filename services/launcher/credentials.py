"""The launcher's accounts: the first administrator and the API keys it hands out (to its own
demo set-up, and to the demo devices, which register themselves like any installer's)."""

from __future__ import annotations

from libs import accounts
from libs.db.engine import make_engine, make_sessionmaker
from libs.principals import Role
from libs.settings import Settings
from services.launcher import demo

KEYS_FILE = "api-keys.json"
LAUNCHER_KEY = "launcher"
DEVICES_KEY = "demo-devices"


async def prepare(s: Settings) -> tuple[str | None, dict[str, str]]:
    """(the admin password when one was generated now, the launcher's API keys)."""
    engine = make_engine(s.effective_database_url)
    sessions = make_sessionmaker(engine)
    try:
        generated = await accounts.ensure_admin(sessions, s.admin_password)
        keys = await accounts.local_keys(
            sessions,
            s.data_dir / KEYS_FILE,
            {
                LAUNCHER_KEY: (Role.ADMIN, []),
                DEVICES_KEY: (Role.INSTALLER, [demo.HOME_ID]),
            },
        )
    finally:
        await engine.dispose()
    return generated, keys


async def provision(s: Settings, metrics_key: str | None, demo_key: str | None = None) -> None:
    """What `smarthome migrate` sets up beside the schema (Kubernetes has no launcher): the
    first administrator from SMARTHOME_ADMIN_PASSWORD, the scrape key of Prometheus, and the
    demo devices' installer key for the demo home (they register themselves with it)."""
    engine = make_engine(s.effective_database_url)
    sessions = make_sessionmaker(engine)
    try:
        if s.admin_password:
            await accounts.ensure_admin(sessions, s.admin_password)
        if metrics_key:
            await accounts.ensure_api_key(sessions, "metrics", Role.ADMIN, metrics_key)
        if demo_key:
            await accounts.ensure_api_key(
                sessions, DEVICES_KEY, Role.INSTALLER, demo_key, [demo.HOME_ID]
            )
    finally:
        await engine.dispose()


async def reset_password(s: Settings, username: str, password: str) -> bool:
    engine = make_engine(s.effective_database_url)
    try:
        return await accounts.reset_password(make_sessionmaker(engine), username, password)
    finally:
        await engine.dispose()
