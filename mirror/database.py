"""Connecting to PostgreSQL and migrating the mirror's schema."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from mirror.config import sqlalchemy_url

log = logging.getLogger(__name__)


def migrations_dir() -> Path:
    """Installed wheels carry the migrations inside the package; a checkout has them at the top."""
    packaged = Path(__file__).parent / "_migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "migrations"


def create_engine(url: str, schema: str, *, pool_size: int = 2) -> AsyncEngine:
    """An engine whose every connection works in ``schema`` (via search_path)."""
    return create_async_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=2,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={
            "server_settings": {"search_path": schema, "application_name": "flespi-mirror"},
            "timeout": 10,
            "command_timeout": 120,
        },
    )


def alembic_config(schema: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["schema"] = schema
    return cfg


def _upgrade(connection: Connection, schema: str, revision: str) -> None:
    cfg = alembic_config(schema)
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


def _downgrade(connection: Connection, schema: str, revision: str) -> None:
    cfg = alembic_config(schema)
    cfg.attributes["connection"] = connection
    command.downgrade(cfg, revision)


async def migrate(engine: AsyncEngine, schema: str, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` (creating the schema when missing)."""
    async with engine.connect() as conn:
        await conn.run_sync(_upgrade, schema, revision)
        await conn.commit()
    # Connections opened before the migration may have cached plans of older tables.
    await engine.dispose()


async def downgrade(engine: AsyncEngine, schema: str, revision: str = "base") -> None:
    async with engine.connect() as conn:
        await conn.run_sync(_downgrade, schema, revision)
        await conn.commit()
    await engine.dispose()
