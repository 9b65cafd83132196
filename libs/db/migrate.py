"""Apply the Alembic migrations: `python -m libs.db.migrate` (also run by `smarthome up`)."""

from __future__ import annotations

import sys
from pathlib import Path

from alembic import command
from alembic.config import Config

from libs import settings as settings_mod

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the schema to `revision`; idempotent."""
    command.upgrade(alembic_config(database_url), revision)


def main() -> None:
    try:
        s = settings_mod.load()
    except settings_mod.SettingsError as exc:
        sys.exit(f"smarthome: {exc}")
    s.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(s.effective_database_url)


if __name__ == "__main__":
    main()
