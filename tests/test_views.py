"""The views analysts and BI tools read: schema-qualified from any search_path, and fast.

``device_positions`` reads ``device_position_parts``, kept by statement triggers on ``telemetry``
(migration 0003); these tests write telemetry the way the store does and read the view.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from mirror.store.database import create_engine, migrate
from tests.helpers import query

T0 = 1_731_990_000.0


@pytest.fixture
async def engine(database, schema_name) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database.url, schema_name)
    await migrate(engine, schema_name)
    try:
        yield engine
    finally:
        await engine.dispose()


async def put(engine: AsyncEngine, device: int, name: str, value: str, at: float) -> None:
    """An upsert with the store's newest-wins guard."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO telemetry AS cur (device_id, name, value, ts, received_at) "
                "VALUES (:d, :n, CAST(:v AS jsonb), to_timestamp(:t), now()) "
                "ON CONFLICT (device_id, name) DO UPDATE SET value = EXCLUDED.value, "
                "ts = EXCLUDED.ts WHERE cur.ts <= EXCLUDED.ts"
            ),
            {"d": device, "n": name, "v": value, "t": at},
        )


async def position(engine: AsyncEngine, device: int) -> tuple[object, ...] | None:
    rows = await query(
        engine,
        "SELECT latitude, longitude, altitude, extract(epoch FROM ts) FROM device_positions "
        "WHERE device_id = :d",
        d=device,
    )
    return tuple(rows[0]) if rows else None


async def test_views_and_functions_work_schema_qualified_from_any_search_path(
    database, engine, schema_name
):
    await put(engine, 7, "position.latitude", "50.5", T0)
    await put(engine, 7, "position.longitude", "10.25", T0)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO objects (api, origin, id, props, ts, received_at) VALUES "
                "('gw', 'devices', 7, CAST(:p AS jsonb), now(), now())"
            ),
            {"p": '{"name": "truck", "last_active": 1731990000, "connected": true, "cid": 5}'},
        )
    bi_tool = create_engine(database.url, None)  # the role's search_path: no mirror schema
    try:
        async with bi_tool.connect() as conn:
            await conn.exec_driver_sql("SET search_path TO public")
            device = (
                await conn.exec_driver_sql(
                    f"SELECT name, connected, extract(epoch FROM last_active), cid "
                    f"FROM {schema_name}.devices"
                )
            ).one()
            assert tuple(device) == ("truck", True, 1731990000, 5)
            where = (
                await conn.exec_driver_sql(
                    f"SELECT latitude, longitude FROM {schema_name}.device_positions"
                )
            ).one()
            assert tuple(where) == (50.5, 10.25)
            epoch = await conn.exec_driver_sql(
                f"SELECT extract(epoch FROM {schema_name}.json_epoch('1700000000'::jsonb))"
            )
            assert epoch.scalar_one() == 1700000000
            deep = await conn.exec_driver_sql(
                f"SELECT {schema_name}.jsonb_set_deep('{{}}'::jsonb, '{{a,b}}', '1'::jsonb)"
            )
            assert deep.scalar_one() == {"a": {"b": 1}}
    finally:
        await bi_tool.dispose()


async def test_device_position_follows_the_newest_of_the_object_and_the_parameters(engine):
    await put(engine, 1, "position.latitude", "50", T0)
    assert await position(engine, 1) is None  # no longitude yet: no position
    await put(engine, 1, "position.longitude", "10", T0)
    assert await position(engine, 1) == (50, 10, None, T0)
    await put(engine, 1, "position", '{"latitude": 51, "longitude": 11, "altitude": 90}', T0 + 1)
    assert await position(engine, 1) == (51, 11, 90, T0 + 1)
    await put(engine, 1, "position.latitude", "52", T0 + 2)
    await put(engine, 1, "position.longitude", "12", T0 + 2)
    assert await position(engine, 1) == (52, 12, None, T0 + 2)
    await put(engine, 1, "position.latitude", "40", T0 - 5)  # older: the guard keeps 52
    assert await position(engine, 1) == (52, 12, None, T0 + 2)
    async with engine.begin() as conn:
        await conn.exec_driver_sql(
            "DELETE FROM telemetry WHERE device_id = 1 AND name LIKE 'position.%'"
        )
    assert await position(engine, 1) == (51, 11, 90, T0 + 1)
    async with engine.begin() as conn:
        await conn.exec_driver_sql("DELETE FROM telemetry WHERE device_id = 1")
    assert await position(engine, 1) is None
    await put(engine, 2, "battery.level", "80", T0)  # other parameters make no position
    assert await query(engine, "SELECT count(*) FROM device_positions") == [(0,)]


async def test_one_devices_position_is_an_index_lookup(engine):
    async with engine.begin() as conn:
        await conn.exec_driver_sql(
            "INSERT INTO telemetry (device_id, name, value, ts, received_at) "
            "SELECT d, n, to_jsonb(d % 90), now(), now() FROM generate_series(1, 5000) d, "
            "unnest(ARRAY['position.latitude', 'position.longitude', 'battery.level']) n"
        )
        await conn.exec_driver_sql("ANALYZE telemetry")
        await conn.exec_driver_sql("ANALYZE device_position_parts")
    assert await query(engine, "SELECT count(*) FROM device_positions") == [(5000,)]
    plan = "\n".join(
        r[0]
        for r in await query(engine, "EXPLAIN SELECT * FROM device_positions WHERE device_id = 77")
    )
    assert "Index Scan using device_position_parts_pkey" in plan, plan
    assert "telemetry" not in plan, plan


async def test_all_positions_join_their_accounts_instead_of_a_lookup_per_row(engine):
    """A correlated subquery for cid ran once per device (and pushed the plan into JIT)."""
    async with engine.begin() as conn:
        await conn.exec_driver_sql(
            "INSERT INTO telemetry (device_id, name, value, ts, received_at) "
            "SELECT d, n, to_jsonb(d % 90), now(), now() FROM generate_series(1, 5000) d, "
            "unnest(ARRAY['position.latitude', 'position.longitude']) n"
        )
        await conn.exec_driver_sql(
            "INSERT INTO objects (api, origin, id, props, ts, received_at, cid) "
            "SELECT 'gw', 'devices', d, '{}', now(), now(), 7 FROM generate_series(1, 5000) d"
        )
        for table in ("telemetry", "device_position_parts", "objects"):
            await conn.exec_driver_sql(f"ANALYZE {table}")
    assert await query(engine, "SELECT count(*), min(cid) FROM device_positions") == [(5000, 7)]
    plan = "\n".join(r[0] for r in await query(engine, "EXPLAIN SELECT * FROM device_positions"))
    assert "SubPlan" not in plan and "Join" in plan, plan


async def test_two_writers_of_one_device_leave_its_full_position(engine):
    """Workers of a share group may write one device's latitude and longitude at once."""
    async with engine.connect() as first, engine.connect() as second:
        await first.begin()
        await first.execute(
            text(
                "INSERT INTO telemetry VALUES "
                "(3, 'position.latitude', '50', to_timestamp(:t), now())"
            ),
            {"t": T0},
        )
        await second.begin()
        writing = asyncio.create_task(
            second.execute(
                text(
                    "INSERT INTO telemetry VALUES "
                    "(3, 'position.longitude', '10', to_timestamp(:t), now())"
                ),
                {"t": T0},
            )
        )
        await asyncio.sleep(0.3)
        await first.commit()
        await writing
        await second.commit()
    assert await position(engine, 3) == (50, 10, None, T0)


async def test_a_writer_granted_before_the_positions_table_still_moves_positions(
    database, engine, schema_name
):
    """Least-privilege roles granted on the tables of an older revision keep working."""
    role = f"w_{schema_name}"
    async with engine.begin() as conn:
        for statement in (
            f"CREATE ROLE {role} LOGIN",
            f"GRANT USAGE ON SCHEMA {schema_name} TO {role}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema_name} TO {role}",
            f"REVOKE ALL ON {schema_name}.device_position_parts FROM {role}",
        ):
            await conn.exec_driver_sql(statement)
    writer = create_engine(
        make_url(database.url).set(username=role).render_as_string(hide_password=False),
        schema_name,
    )
    try:
        await put(writer, 5, "position.latitude", "50", T0)
        await put(writer, 5, "position.longitude", "10", T0)
        async with writer.begin() as conn:
            await conn.exec_driver_sql("DELETE FROM telemetry WHERE name = 'position.longitude'")
    finally:
        await writer.dispose()
        async with engine.begin() as conn:
            await conn.exec_driver_sql(f"DROP OWNED BY {role}")
            await conn.exec_driver_sql(f"DROP ROLE {role}")
    assert await query(
        engine, "SELECT latitude, longitude FROM device_position_parts WHERE device_id = 5"
    ) == [(50, None)]
