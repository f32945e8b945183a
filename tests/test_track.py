"""The typed track (migration 0008) against a real PostgreSQL, with PostGIS and without it:
positions as real columns from both history tiers, values that are not numbers as NULL (never
an error), and the time and area paths through the indexes.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from mirror.decode.records import Inbound
from mirror.store import compaction, partitions
from mirror.store.database import create_engine, migrate
from mirror.store.writer import Store
from tests.helpers import query
from tests.launchers import TestDatabase, _run_admin
from tests.test_history import NOW, START, message, write

COLUMNS = "device_id, ts, latitude, longitude, altitude, speed, direction, satellites, valid"
AREA = "box(point(25.215, 54.6), point(25.225, 54.7))"  # holds device 2's longitude only


def odd(device: int, ts: float, **fields: Any) -> Inbound:
    """A message whose position parameters are not what their names promise (a string value
    of a field is put in as raw JSON text: numbers no double can hold)."""
    parts = [f'"timestamp": {ts}'] + [
        f'"{k}": {v if isinstance(v, str) and v[:1] in "0123456789-" else json.dumps(v)}'
        for k, v in fields.items()
    ]
    return Inbound(f"flespi/message/gw/devices/{device}", ("{" + ", ".join(parts) + "}").encode(),
                   {}, ts)  # fmt: skip


def track_history() -> list[Inbound]:
    every = 300.0
    return [
        message(d, START + i * every + d, **{"position.altitude": 100 + i, "position.satellites": 9,
                                             "position.direction": (i * 7) % 360})
        for i in range(int((NOW - START) / every)) for d in (1, 2, 3)
    ]  # fmt: skip



@pytest.fixture(scope="module")
def postgis_database(database: TestDatabase) -> Iterator[TestDatabase]:
    """A database of its own with PostGIS installed (CREATE EXTENSION is per database)."""
    name = f"{database.name}_gis_{uuid.uuid4().hex[:6]}"
    _run_admin(database.admin_url, f'CREATE DATABASE "{name}"')
    gis = TestDatabase(admin_url=database.admin_url, name=name)
    try:
        try:
            _run_admin(gis.url, "CREATE EXTENSION postgis")
        except Exception as exc:  # no PostGIS package for this server: scripts/ensure-postgis.sh
            pytest.skip(f"PostGIS is not installed for this PostgreSQL ({exc})")
        yield gis
    finally:
        gis.drop()


async def test_each_message_has_its_position_as_typed_columns_in_both_tiers(engine):
    await write(Store(engine), track_history())
    expected = await query(
        engine,
        "SELECT device_id, ts, (payload->>'position.latitude')::float8,"
        " (payload->>'position.longitude')::float8, (payload->>'position.altitude')::real,"
        " (payload->>'position.speed')::real, (payload->>'position.direction')::real,"
        " (payload->>'position.satellites')::smallint, (payload->>'position.valid')::boolean"
        " FROM device_messages ORDER BY 1, 2",
    )
    before = await query(engine, f"SELECT {COLUMNS} FROM device_track ORDER BY 1, 2")
    await compaction.compact(engine, after_hours=1.0, now=NOW)
    (packed,) = (await query(engine, "SELECT count(*) FROM device_message_hours"))[0]
    assert packed > 0
    after = await query(engine, f"SELECT {COLUMNS} FROM device_track ORDER BY 1, 2")
    assert before == after == expected
    (position,) = (
        await query(engine, "SELECT position::text FROM device_track ORDER BY ts LIMIT 1")
    )[0]
    assert position == f"({expected[0][3]},{expected[0][2]})"  # point(longitude, latitude)


async def test_position_values_that_are_not_numbers_are_null_and_stop_nothing(engine):
    store = Store(engine)
    await write(
        store,
        [
            odd(7, START + 10, **{"position.latitude": "north", "position.longitude": 25.3,
                                   "position.speed": "1e300", "position.satellites": 40000,
                                   "position.altitude": "1e-300", "position.valid": "yes"}),
            odd(7, START + 20, **{"position.latitude": {"deg": 54}, "position.direction": None}),
            message(7, START + 30),
        ],
    )  # fmt: skip
    report = await compaction.compact(engine, after_hours=1.0, now=NOW)
    assert report.caught_up and report.moved["device_messages"] == 3
    rows = await query(
        engine,
        "SELECT latitude, longitude, speed, satellites, altitude, valid, direction"
        " FROM device_track WHERE device_id = 7 ORDER BY ts",
    )
    assert rows[0] == (None, 25.3, None, None, None, None, None)
    assert rows[1] == (None, None, None, None, None, None, None)
    assert rows[2][0] is not None and rows[2][5] is True


async def test_time_and_area_windows_read_only_their_rows_and_hours(engine):
    await write(Store(engine), track_history())
    await compaction.compact(engine, after_hours=1.0, now=NOW)
    since, until = NOW - 3 * 3600, NOW
    expected = await query(
        engine,
        f"SELECT {COLUMNS} FROM device_track WHERE ts >= to_timestamp(:a) "
        "AND ts < to_timestamp(:b) ORDER BY 1, 2",
        a=since,
        b=until,
    )
    window = f"SELECT {COLUMNS} FROM device_track(to_timestamp(:a), to_timestamp(:b))"
    assert await query(engine, window + " ORDER BY 1, 2", a=since, b=until) == expected
    in_area = [r for r in expected if r[0] == 2]
    area = f"SELECT {COLUMNS} FROM device_track(to_timestamp(:a), to_timestamp(:b), {AREA})"
    assert await query(engine, area + " ORDER BY 1, 2", a=since, b=until) == in_area
    assert await query(
        engine, window + f" WHERE position <@ {AREA} ORDER BY 1, 2", a=since, b=until
    ) == in_area
    plan = "\n".join(
        r[0]
        for r in await query(engine, "EXPLAIN (COSTS OFF) " + area, a=since, b=until)
    )
    assert "Index Cond: (point(" in plan, plan  # the recent rows' GiST index on their points
    assert "bbox" in plan, plan  # the packed rows' bounding boxes narrow the hours


async def test_without_postgis_there_is_no_geom_column(engine):
    columns = await query(
        engine,
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = 'device_track'",
    )
    assert "geom" not in {c for (c,) in columns} and "position" in {c for (c,) in columns}


async def test_with_postgis_the_track_has_geometry_and_an_area_of_any_shape(
    postgis_database: TestDatabase, schema_name: str
) -> None:
    engine = create_engine(postgis_database.url, schema_name)
    try:
        await migrate(engine, schema_name)
        await partitions.maintain(engine)
        await write(Store(engine), track_history())
        await compaction.compact(engine, after_hours=1.0, now=NOW)
        (geom,) = (
            await query(
                engine,
                "SELECT public.ST_AsText(geom) = 'POINT(' || longitude || ' ' || latitude || ')'"
                " AND public.ST_SRID(geom) = 4326 FROM device_track ORDER BY ts LIMIT 1",
            )
        )[0]
        assert geom is True
        since, until = START, NOW
        by_box = await query(
            engine,
            f"SELECT {COLUMNS} FROM device_track(to_timestamp(:a), to_timestamp(:b), {AREA})"
            " ORDER BY 1, 2",
            a=since,
            b=until,
        )
        envelope = "public.ST_MakeEnvelope(25.215, 54.6, 25.225, 54.7, 4326)"
        by_geometry = await query(
            engine,
            f"SELECT {COLUMNS} FROM device_track(to_timestamp(:a), to_timestamp(:b), "
            f"{envelope}) ORDER BY 1, 2",
            a=since,
            b=until,
        )
        assert by_box == by_geometry and {r[0] for r in by_box} == {2}
        plan = "\n".join(
            r[0]
            for r in await query(
                engine,
                f"EXPLAIN (COSTS OFF) SELECT device_id FROM device_track(to_timestamp(:a), "
                f"to_timestamp(:b), {envelope})",
                a=since,
                b=until,
            )
        )
        assert "index cond: (public.st_setsrid(" in plan.lower(), plan  # recent rows' geometry
    finally:
        await engine.dispose()


async def test_postgis_installed_or_removed_later_switches_the_track_on_the_next_start(
    postgis_database: TestDatabase,
) -> None:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    other = f"{postgis_database.name}_late"
    await asyncio.to_thread(_run_admin, postgis_database.admin_url, f'CREATE DATABASE "{other}"')
    late = TestDatabase(admin_url=postgis_database.admin_url, name=other)
    engine = create_engine(late.url, schema)
    geom = (
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = 'device_track' AND column_name = 'geom'"
    )
    try:
        await migrate(engine, schema)
        assert await query(engine, geom) == [(0,)]
        await asyncio.to_thread(_run_admin, late.url, "CREATE EXTENSION postgis")
        await migrate(engine, schema)
        assert await query(engine, geom) == [(1,)]
        # CASCADE takes the geom objects along
        await asyncio.to_thread(_run_admin, late.url, "DROP EXTENSION postgis CASCADE")
        await migrate(engine, schema)
        assert await query(engine, geom) == [(0,)]
        assert await query(engine, "SELECT count(*) FROM device_track") == [(0,)]
    finally:
        await engine.dispose()
        await asyncio.to_thread(late.drop)
