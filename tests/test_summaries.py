"""Summaries kept on write (migration 0009, mirror/store/summaries.py) against a real PostgreSQL:
exact under redelivery, backfill and out-of-order device time, whatever the batching, and equal
to what the stored messages say after any mix of those.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import random
from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from mirror.decode.records import Inbound
from mirror.store import compaction, partitions, summaries
from mirror.store.database import create_engine, migrate
from mirror.store.writer import Store
from tests.helpers import eventually, publisher, query, running_mirror, settings_for
from tests.test_history import NOW, write

DAY_START = dt.datetime.fromtimestamp(NOW - 86400, dt.UTC).replace(hour=0, minute=0, second=0)
T0 = DAY_START.timestamp() + 8 * 3600  # 08:00 UTC of yesterday: packed by compaction


def trip(device: int, count: int = 120, every: float = 60.0, start: float = T0) -> list[Inbound]:
    """A drive with stops: speeds from a fixed pattern, positions along a heading, an odometer;
    every fifth message has no position, every seventh an invalid one."""
    rng = random.Random(device)
    lat, lon, mileage = 54.6 + device / 100, 25.2, 1000.0 * device
    out = []
    for i in range(count):
        speed = (0, 0, 30, 60, 90, 45, 4, 0, 70, 110)[i % 10]
        lat += speed * every / 3600 / 111.2
        lon += rng.uniform(-0.001, 0.001)
        mileage += speed * every / 3600
        payload: dict[str, Any] = {
            "timestamp": start + i * every,
            "position.speed": speed,
            "vehicle.mileage": round(mileage, 3),
        }
        if i % 5 != 4:
            payload |= {"position.latitude": round(lat, 6), "position.longitude": round(lon, 6),
                        "position.valid": i % 7 != 6}  # fmt: skip
        ts = start + i * every
        out.append(
            Inbound(f"flespi/message/gw/devices/{device}", json.dumps(payload).encode(),
                    {"timestamp": str(ts)}, ts + 1)
        )
    return out


def great_circle_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    (lat1, lon1), (lat2, lon2) = a, b
    h = (math.sin(math.radians(lat2 - lat1) / 2) ** 2 + math.cos(math.radians(lat1))
         * math.cos(math.radians(lat2)) * math.sin(math.radians(lon2 - lon1) / 2) ** 2)  # fmt: skip
    return 2 * 6371.0088 * math.asin(min(1.0, math.sqrt(h)))


def expected_day(messages: Sequence[Inbound]) -> dict[str, Any]:
    """What device_days must say about one device's messages of one day."""
    rows = sorted((json.loads(m.payload) for m in messages), key=lambda p: p["timestamp"])
    fixes = [(p["position.latitude"], p["position.longitude"]) for p in rows
             if "position.latitude" in p and p.get("position.valid") is not False]  # fmt: skip
    moving = sum(
        b["timestamp"] - a["timestamp"]
        for a, b in itertools.pairwise(rows)
        if a["position.speed"] >= 5 and b["timestamp"] - a["timestamp"] <= 600
    )
    mileage = [p["vehicle.mileage"] for p in rows]
    return {
        "messages": len(rows),
        "max_speed": max(p["position.speed"] for p in rows),
        "track_km": sum(great_circle_km(a, b) for a, b in itertools.pairwise(fixes)),
        "moving_seconds": moving,
        "distance_km": max(mileage) - min(mileage),
        "first": fixes[0],
        "last": fixes[-1],
        "last_speed": rows[-1]["position.speed"],
    }


async def stored_day(engine: AsyncEngine, device: int) -> dict[str, Any]:
    ((messages, max_speed, track_km, moving, distance, first_lat, first_lon, last_lat, last_lon,
      last_speed, recount),) = await query(
        engine,
        "SELECT messages, max_speed, track_km, moving_seconds, distance_km, first_latitude,"
        " first_longitude, last_latitude, last_longitude, last_speed, needs_recount"
        " FROM device_days WHERE device_id = :d",
        d=device,
    )  # fmt: skip
    assert recount is False
    return {
        "messages": messages,
        "max_speed": max_speed,
        "track_km": track_km,
        "moving_seconds": moving,
        "distance_km": distance,
        "first": (first_lat, first_lon),
        "last": (last_lat, last_lon),
        "last_speed": last_speed,
    }


def assert_day(got: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, value in expected.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
        else:
            assert got[key] == value, key


async def recount_all(engine: AsyncEngine) -> None:
    while await summaries.recount(engine):
        pass



async def test_a_day_sent_in_order_in_many_batches_is_exact_without_a_recount(engine):
    store = Store(engine)
    messages = trip(1)
    for start in range(0, len(messages), 7):
        await write(store, messages[start : start + 7])
    assert_day(await stored_day(engine, 1), expected_day(messages))


async def test_any_order_and_redelivery_end_the_same_after_the_recount(engine):
    store = Store(engine)
    messages = trip(2)
    shuffled = messages[:]
    random.Random(5).shuffle(shuffled)
    for start in range(0, len(shuffled), 13):
        await write(store, shuffled[start : start + 13])
    await write(store, messages[40:80])  # a redelivery: counted nothing twice
    (flagged,) = (await query(engine, "SELECT needs_recount FROM device_days"))[0]
    assert flagged is True
    await recount_all(engine)
    assert_day(await stored_day(engine, 2), expected_day(messages))


async def test_a_backfill_into_a_packed_day_counts_each_message_once(engine):
    store = Store(engine)
    messages = trip(3)
    live = messages[::2]  # the mirror saw every other message; the backfill brings the rest
    await write(store, live)
    await compaction.compact(engine, after_hours=1.0, now=NOW)
    (packed,) = (await query(engine, "SELECT sum(messages) FROM device_message_hours"))[0]
    assert packed == len(live)
    await write(store, messages)  # the backfill fetches the whole window again
    await recount_all(engine)
    assert_day(await stored_day(engine, 3), expected_day(messages))
    hours = await query(
        engine,
        "SELECT h.hour, h.messages, (SELECT count(*) FROM device_messages m WHERE m.device_id = 3"
        " AND hour_of(m.ts) = h.hour) FROM device_hours h WHERE h.device_id = 3 ORDER BY 1",
    )
    assert [(n, c) for _, n, c in hours] == [(c, c) for _, _, c in hours]
    assert sum(n for _, n, _ in hours) == len(messages)


async def test_the_latest_message_is_the_newest_by_device_time(engine):
    store = Store(engine)
    messages = trip(4, count=30)
    await write(store, messages[10:])
    await write(store, messages[:10])  # older, later: changes nothing
    await write(store, messages[-1:])  # a redelivery of the newest
    ((ts, payload),) = await query(
        engine, "SELECT extract(epoch FROM ts), payload FROM device_latest_messages"
    )
    assert float(ts) == json.loads(messages[-1].payload)["timestamp"]
    assert payload == json.loads(messages[-1].payload)


async def test_retention_drops_the_summaries_of_the_days_it_drops(engine):
    store = Store(engine)
    old = T0 - 40 * 86400
    await write(store, trip(5, count=3, start=old) + trip(5, count=3))
    assert await query(engine, "SELECT count(*) FROM device_days") == [(2,)]
    await partitions.maintain(engine, retention_days=30)
    days = await query(engine, "SELECT day FROM device_days")
    assert days == [(dt.datetime.fromtimestamp(T0, dt.UTC).date(),)]
    (hours,) = (await query(engine, "SELECT count(*) FROM device_hours WHERE hour < now() - "
                            "interval '30 days'"))[0]  # fmt: skip
    assert hours == 0
    assert await query(engine, "SELECT count(*) FROM device_latest_messages") == [(1,)]


async def test_upgrading_fills_the_summaries_from_the_history_already_stored(
    database: Any, schema_name: str
) -> None:
    engine = create_engine(database.url, schema_name)
    try:
        await migrate(engine, schema_name, "0008")
        await partitions.maintain(engine)
        messages = trip(6)
        async with engine.begin() as conn:
            for m in messages:
                await conn.execute(
                    text(
                        "INSERT INTO device_messages_recent (device_id, ts, digest, payload,"
                        " received_at) VALUES (6, to_timestamp(:ts), decode(md5(:p), 'hex'),"
                        " CAST(:p AS jsonb), now())"
                    ),
                    {"ts": json.loads(m.payload)["timestamp"], "p": m.payload.decode()},
                )
        await migrate(engine, schema_name)
        hours = await query(engine, "SELECT sum(messages), count(*) FROM device_hours")
        assert hours == [(len(messages), 2)]
        await recount_all(engine)
        assert_day(await stored_day(engine, 6), expected_day(messages))
        ((ts,),) = await query(engine, "SELECT extract(epoch FROM ts) FROM device_latest_messages")
        assert float(ts) == json.loads(messages[-1].payload)["timestamp"]
    finally:
        await engine.dispose()


@pytest.mark.slow
async def test_the_daemon_recounts_a_day_that_messages_reached_out_of_order(
    broker: Any, database: Any, engine: AsyncEngine, schema_name: str
) -> None:
    messages = trip(8, count=40)
    settings = settings_for(broker.url, database.url, schema_name)
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            for m in messages[20:] + messages[:20]:  # the second half first, then the first
                pub.publish(m.topic, json.loads(m.payload), float(m.properties["timestamp"]))
        await eventually(
            running.engine, "SELECT messages, needs_recount FROM device_days", [(40, False)], 20
        )
    assert_day(await stored_day(engine, 8), expected_day(messages))
