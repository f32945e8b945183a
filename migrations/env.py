"""Alembic environment: every migration runs inside the mirror's schema.

The schema comes from ``config.attributes["schema"]`` (set by ``flespi-mirror migrate``), or
``-x schema=NAME`` on the alembic command line, default ``flespi``. It is created when missing
and put first on the ``search_path``; the version table lives in it too, so several mirrors can
share one database.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from mirror.ops.config import DEFAULT_SCHEMA, SCHEMA_NAME
from mirror.store.schema import include_in_autogenerate, metadata

config = context.config
schema: str = (
    config.attributes.get("schema")
    or context.get_x_argument(as_dictionary=True).get("schema")
    or DEFAULT_SCHEMA
)
if not SCHEMA_NAME.match(schema):
    raise ValueError(f"invalid schema name {schema!r}")


def run_with(connection: Connection) -> None:
    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    connection.execute(text(f'SET search_path TO "{schema}"'))
    connection.commit()
    connection.dialect.default_schema_name = schema
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table_schema=schema,
        include_object=include_in_autogenerate,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async(url: str) -> None:
    from mirror.store.database import create_engine

    engine = create_engine(url, None)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(run_with)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")

connection = config.attributes.get("connection")
if connection is not None:
    run_with(connection)
else:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("MIRROR_DATABASE_URL")
    if not url:
        raise SystemExit("set MIRROR_DATABASE_URL (or sqlalchemy.url) to run alembic by hand")
    asyncio.run(run_async(url))
