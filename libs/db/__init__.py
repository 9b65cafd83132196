"""Database: models, engine/session set-up, and migrations (Alembic)."""
