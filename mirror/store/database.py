"""Connecting to PostgreSQL and migrating the mirror's schema."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from mirror.ops.config import database_target
from mirror.store import extensions

log = logging.getLogger(__name__)


def migrations_dir() -> Path:
    """Installed wheels carry the migrations inside the package; a checkout has them at the top."""
    packaged = Path(__file__).parent.parent / "_migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent.parent / "migrations"


def create_engine(url: str, schema: str | None, *, pool_size: int = 2) -> AsyncEngine:
    """An engine whose every connection works in ``schema`` (via search_path; None: the role's).

    asyncpg gets the URL itself as its DSN (see :func:`mirror.ops.config.database_target`), so
    libpq's TLS parameters (sslmode, sslrootcert, sslcert, sslkey) work as they do in psql.
    """
    import asyncpg

    target = database_target(url)
    server_settings = {"application_name": "flespi-mirror", **target.server_settings}
    if schema is not None:
        server_settings["search_path"] = schema

    async def connect() -> Any:
        return await asyncpg.connect(
            target.dsn,
            server_settings=server_settings,
            timeout=target.timeout or 10,
            command_timeout=120,
        )

    return create_async_engine(
        "postgresql+asyncpg://",
        async_creator=connect,
        pool_size=pool_size,
        max_overflow=2,
        pool_pre_ping=True,
        pool_recycle=1800,
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
    if revision == "head":  # the optional extensions' objects follow what the database has
        extensions.align(connection, schema, ScriptDirectory.from_config(cfg))


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
