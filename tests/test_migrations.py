"""Migrations: upgrade and downgrade on an empty database, and agreement with schema.py."""

from __future__ import annotations

import warnings

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from mirror.store.database import create_engine, downgrade, migrate
from mirror.store.schema import include_in_autogenerate, metadata
from tests.helpers import query

TABLES = {
    "telemetry",
    "device_settings",
    "plugin_device_configs",
    "objects",
    "object_properties",
    "intervals",
    "device_messages",
    "channel_messages",
    "modem_messages",
    "dead_letters",
}


async def relations(engine, schema: str) -> set[str]:
    rows = await query(
        engine,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = :s",
        s=schema,
    )
    return {r[0] for r in rows}


async def test_upgrade_then_downgrade_on_an_empty_database(database, schema_name):
    engine = create_engine(database.url, schema_name)
    try:
        await migrate(engine, schema_name)
        created = await relations(engine, schema_name)
        assert TABLES | {"devices", "device_positions", "alembic_version"} <= created
        assert {f"{t}_tombstones" for t in ("telemetry", "objects", "intervals")} <= created
        await migrate(engine, schema_name)  # idempotent: already at head
        await downgrade(engine, schema_name, "base")
        assert await relations(engine, schema_name) == {"alembic_version"}
        await migrate(engine, schema_name)  # and back up again
        assert await relations(engine, schema_name) >= TABLES
    finally:
        await engine.dispose()


def _diff(connection, schema: str):
    connection.dialect.default_schema_name = schema
    context = MigrationContext.configure(
        connection,
        opts={"include_object": include_in_autogenerate},
    )
    with warnings.catch_warnings():
        # SQLAlchemy reflects no type for PostgreSQL's box (device_message_hours.bbox); the
        # comparison leaves such a column's type alone.
        warnings.filterwarnings("ignore", "Did not recognize type 'box'")
        return compare_metadata(context, metadata)


async def test_migrations_match_the_schema_module(database, schema_name):
    engine = create_engine(database.url, schema_name)
    try:
        await migrate(engine, schema_name)
        async with engine.connect() as conn:
            diff = await conn.run_sync(_diff, schema_name)
        assert diff == []
    finally:
        await engine.dispose()


async def test_two_mirrors_share_a_database_in_separate_schemas(database, schema_name):
    other = schema_name + "_b"
    for schema in (schema_name, other):
        engine = create_engine(database.url, schema)
        try:
            await migrate(engine, schema)
        finally:
            await engine.dispose()
    engine = create_engine(database.url, schema_name)
    try:
        assert await relations(engine, other) >= TABLES
        assert await relations(engine, schema_name) >= TABLES
    finally:
        await engine.dispose()


FILLED_AT_0001 = [
    "INSERT INTO telemetry VALUES (5, 'position.latitude', '54.7', now(), now()),"
    " (5, 'position.longitude', '25.3', now(), now())",
    "INSERT INTO device_settings VALUES (5, 'report', '{\"interval\": 30}', now(), now())",
    "INSERT INTO plugin_device_configs VALUES (7, 5, '{}', now(), now())",
    "INSERT INTO objects VALUES ('gw', 'devices', 5, '{\"name\": \"a\"}', '{\"name\": \"a\"}',"
    " now(), now(), now())",
    "INSERT INTO object_properties VALUES ('gw', 'devices', 5, '{connected}', 'true',"
    " now(), now())",
    "INSERT INTO intervals VALUES (9, 5, 'id:1', 1, now(), now(), 60, 'created', '{}',"
    " now(), now())",
    "INSERT INTO intervals_tombstones VALUES (9, 5, 'begin:2', now())",
    "INSERT INTO device_messages VALUES (5, now(), '\\x00', now(), 'i', '{}', now())",
    "INSERT INTO channel_messages VALUES (4, 'i', now(), '\\x00', now(), '{}', now())",
    "INSERT INTO modem_messages VALUES (2, '370', now(), '\\x00', '{}', now())",
    "INSERT INTO dead_letters (topic, payload, payload_size, properties, reason, detail,"
    " received_at) VALUES ('x', '', 0, '{}', 'unknown_topic', 'd', now())",
]


async def test_upgrading_a_filled_0001_database_keeps_every_row(database, schema_name):
    engine = create_engine(database.url, schema_name)
    try:
        await migrate(engine, schema_name, "0001")
        async with engine.begin() as conn:
            for statement in FILLED_AT_0001:
                await conn.exec_driver_sql(statement)
        await migrate(engine, schema_name)
        for table in sorted(TABLES):
            rows = await query(engine, f"SELECT count(*), count(cid) FROM {table}")
            expected = 2 if table == "telemetry" else 1
            assert rows == [(expected, 0)], table
        assert await query(engine, "SELECT interval_key, begin FROM intervals_tombstones") == [
            ("begin:2", None)  # 0004 added the span; a tombstone from before has none
        ]
        assert await query(engine, "SELECT device_id, name, cid FROM devices") == [(5, "a", None)]
        assert await query(engine, "SELECT device_id, latitude FROM device_positions") == [
            (5, 54.7)
        ]
    finally:
        await engine.dispose()
