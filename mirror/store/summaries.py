"""Summaries of device messages, kept in the transaction that stores the messages.

Fleet questions should not read every message: the latest message of each device, messages per
hour, and each device's day (messages, first and last time, distance, top speed, moving time)
are kept up to date by the statement that inserts the messages, from exactly the rows it
inserted (``RETURNING``): a redelivered message inserts nothing and so counts nothing, and a
message of any age lands in its own hour and day.

``device_latest_messages``, ``device_hours`` and the sums, extremes and first/last times of
``device_days`` are exact whatever order messages arrive in (each is a count, a minimum or a
maximum). Distance along the positions and moving time depend on the order of a day's
messages: a batch whose messages all come after the day's stored ones (live traffic) extends
them in the same transaction; one that reaches back into a day (a backfill, a black box, a
redelivery out of order) marks the day ``needs_recount``, and :func:`recount` computes both
from the day's stored track within seconds.

The chain of a day's messages is ordered by (ts, speed, latitude, longitude), here and in the
recount alike, so a day ends the same whatever batches brought it.

Pure: SQL text; ``store.py`` runs the write, the daemon runs :func:`recount`.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

MOVING_KMH = 5.0  # a message at this speed or more starts moving time
MAX_GAP = "10 minutes"  # a longer gap between two messages is not counted as moving
MILEAGE = "vehicle.mileage"  # flespi's odometer parameter, km

# The chain order of a day's messages (see the module docstring).
_ORDER = "ts, speed, lat, lon"
_ORDER_DESC = "ts DESC, speed DESC, lat DESC, lon DESC"


def _typed(rows: str) -> str:
    """What the summaries need of device message rows ``rows`` (the recent tier's columns)."""
    return f"""
        SELECT i.device_id, i.ts, i.digest, i.cid, (i.ts AT TIME ZONE 'UTC')::date AS day,
               hour_of(i.ts) AS hour, i.latitude AS lat, i.longitude AS lon, i.valid, i.speed,
               json_number(i.payload -> '{MILEAGE}') AS mileage
        FROM {rows} i
    """


def _day_parts(typed: str) -> str:
    """CTEs ``steps``, ``fixes``, ``moves``, ``travel`` and ``day_rows`` over the typed rows
    ``typed``: per device and day, the moving time and distance along the rows, the first and
    last position, the last speed, and the commutative parts."""
    within = "PARTITION BY device_id, day ORDER BY " + _ORDER
    return f"""
        steps AS (
            SELECT t.device_id, t.day, t.ts, lag(t.ts) OVER w AS prev_ts,
                   lag(t.speed) OVER w AS prev_speed
            FROM {typed} t WINDOW w AS ({within})
        ), fixes AS (
            SELECT f.device_id, f.day, f.ts, f.speed, f.lat, f.lon,
                   lag(f.lat) OVER w AS prev_lat, lag(f.lon) OVER w AS prev_lon
            FROM {typed} f
            WHERE f.lat IS NOT NULL AND f.lon IS NOT NULL AND f.valid IS NOT false
            WINDOW w AS ({within})
        ), moves AS (
            SELECT device_id, day,
                   sum(CASE WHEN prev_speed >= {MOVING_KMH}
                             AND ts - prev_ts <= interval '{MAX_GAP}'
                            THEN extract(epoch FROM ts - prev_ts) ELSE 0 END)::float8 AS moving
            FROM steps GROUP BY device_id, day
        ), travel AS (
            SELECT device_id, day,
                   coalesce(sum(great_circle_km(prev_lat, prev_lon, lat, lon)), 0) AS km,
                   (array_agg(lat ORDER BY {_ORDER}))[1] AS first_lat,
                   (array_agg(lon ORDER BY {_ORDER}))[1] AS first_lon,
                   max(ts) AS last_fix_ts,
                   (array_agg(lat ORDER BY {_ORDER_DESC}))[1] AS last_lat,
                   (array_agg(lon ORDER BY {_ORDER_DESC}))[1] AS last_lon
            FROM fixes GROUP BY device_id, day
        ), day_rows AS (
            SELECT t.device_id, t.day, count(*)::int AS messages, min(t.ts) AS first_ts,
                   max(t.ts) AS last_ts, max(t.cid) AS cid, max(t.speed) AS max_speed,
                   min(t.mileage) AS mileage_min, max(t.mileage) AS mileage_max,
                   (array_agg(t.speed ORDER BY {_ORDER_DESC}))[1] AS last_speed
            FROM {typed} t GROUP BY t.device_id, t.day
        )
    """


_IN_ORDER = "EXCLUDED.first_ts > cur.last_ts"  # every new message after every stored one
_JOIN_MOVING = (
    f"CASE WHEN cur.last_speed >= {MOVING_KMH} "
    f"AND EXCLUDED.first_ts - cur.last_ts <= interval '{MAX_GAP}' "
    "THEN extract(epoch FROM EXCLUDED.first_ts - cur.last_ts) ELSE 0 END"
)
_JOIN_KM = (
    "coalesce(great_circle_km(cur.last_latitude, cur.last_longitude, "
    "EXCLUDED.first_latitude, EXCLUDED.first_longitude), 0)"
)
_NEWER_FIX = (
    "EXCLUDED.last_fix_ts IS NOT NULL AND "
    "(cur.last_fix_ts IS NULL OR EXCLUDED.last_fix_ts > cur.last_fix_ts)"
)


def summaries_of(inserted: str) -> str:
    """CTEs (after ``WITH`` … ``,``) bringing the summaries up to date with the device message
    rows of the CTE ``inserted`` (as returned by the insert). Rows are written in key order, so
    two writers of one device lock its summary rows alike."""
    return f"""
        typed AS ({_typed(inserted)}),
        latest AS (
            INSERT INTO device_latest_messages AS cur
                   (device_id, ts, digest, server_ts, ident, payload, received_at, cid)
            SELECT DISTINCT ON (device_id) device_id, ts, digest, server_ts, ident, payload,
                   received_at, cid
            FROM {inserted} ORDER BY device_id, ts DESC, digest DESC
            ON CONFLICT (device_id) DO UPDATE
            SET ts = EXCLUDED.ts, digest = EXCLUDED.digest, server_ts = EXCLUDED.server_ts,
                ident = EXCLUDED.ident, payload = EXCLUDED.payload,
                received_at = EXCLUDED.received_at, cid = coalesce(EXCLUDED.cid, cur.cid)
            WHERE (cur.ts, cur.digest) < (EXCLUDED.ts, EXCLUDED.digest)
        ), hours AS (
            INSERT INTO device_hours AS cur (device_id, hour, messages, first_ts, last_ts, cid)
            SELECT device_id, hour, count(*), min(ts), max(ts), max(cid)
            FROM typed GROUP BY device_id, hour ORDER BY device_id, hour
            ON CONFLICT (device_id, hour) DO UPDATE
            SET messages = cur.messages + EXCLUDED.messages,
                first_ts = least(cur.first_ts, EXCLUDED.first_ts),
                last_ts = greatest(cur.last_ts, EXCLUDED.last_ts),
                cid = coalesce(EXCLUDED.cid, cur.cid)
        ), {_day_parts("typed")}, days AS (
            INSERT INTO device_days AS cur
                   (device_id, day, cid, messages, first_ts, last_ts, max_speed, mileage_min,
                    mileage_max, track_km, moving_seconds, first_latitude, first_longitude,
                    last_fix_ts, last_latitude, last_longitude, last_speed)
            SELECT d.device_id, d.day, d.cid, d.messages, d.first_ts, d.last_ts, d.max_speed,
                   d.mileage_min, d.mileage_max, coalesce(tr.km, 0), m.moving, tr.first_lat,
                   tr.first_lon, tr.last_fix_ts, tr.last_lat, tr.last_lon, d.last_speed
            FROM day_rows d JOIN moves m USING (device_id, day)
            LEFT JOIN travel tr USING (device_id, day)
            ORDER BY d.device_id, d.day
            ON CONFLICT (device_id, day) DO UPDATE
            SET messages = cur.messages + EXCLUDED.messages,
                first_ts = least(cur.first_ts, EXCLUDED.first_ts),
                last_ts = greatest(cur.last_ts, EXCLUDED.last_ts),
                cid = coalesce(EXCLUDED.cid, cur.cid),
                max_speed = greatest(cur.max_speed, EXCLUDED.max_speed),
                mileage_min = least(cur.mileage_min, EXCLUDED.mileage_min),
                mileage_max = greatest(cur.mileage_max, EXCLUDED.mileage_max),
                track_km = CASE WHEN {_IN_ORDER}
                                THEN cur.track_km + {_JOIN_KM} + EXCLUDED.track_km
                                ELSE cur.track_km END,
                moving_seconds = CASE WHEN {_IN_ORDER}
                                      THEN cur.moving_seconds + {_JOIN_MOVING}
                                           + EXCLUDED.moving_seconds
                                      ELSE cur.moving_seconds END,
                first_latitude = coalesce(cur.first_latitude, EXCLUDED.first_latitude),
                first_longitude = coalesce(cur.first_longitude, EXCLUDED.first_longitude),
                last_fix_ts = CASE WHEN {_NEWER_FIX} THEN EXCLUDED.last_fix_ts
                                   ELSE cur.last_fix_ts END,
                last_latitude = CASE WHEN {_NEWER_FIX} THEN EXCLUDED.last_latitude
                                     ELSE cur.last_latitude END,
                last_longitude = CASE WHEN {_NEWER_FIX} THEN EXCLUDED.last_longitude
                                      ELSE cur.last_longitude END,
                last_speed = CASE WHEN EXCLUDED.last_ts > cur.last_ts THEN EXCLUDED.last_speed
                                  ELSE cur.last_speed END,
                needs_recount = cur.needs_recount OR NOT ({_IN_ORDER})
        )
    """


def insert_with_summaries(insert: str, returning: Sequence[str]) -> str:
    """The device messages ``insert`` (an ``INSERT … ON CONFLICT DO NOTHING``) returning
    ``returning``, with the summaries of what it inserted; the statement yields that count."""
    return f"""
        WITH inserted AS ({insert} RETURNING {", ".join(returning)}),
        {summaries_of("inserted")}
        SELECT count(*) FROM inserted
    """


# ---------------------------------------------------------------------------------------------
# Recount: the order-dependent parts of days marked needs_recount, from their stored track

_PICK = text(
    "SELECT device_id, day FROM device_days WHERE needs_recount "
    "ORDER BY device_id, day LIMIT :limit FOR UPDATE SKIP LOCKED"
)
_RECOUNT = text(
    f"""
    WITH picked AS (
        SELECT * FROM unnest(CAST(:devices AS bigint[]), CAST(:days AS date[])) AS p(device_id, day)
    ), track AS (
        SELECT p.device_id, p.day, x.ts, x.latitude AS lat, x.longitude AS lon, x.speed, x.valid,
               x.cid, NULL::float8 AS mileage
        FROM picked p
        CROSS JOIN LATERAL device_track(p.day::timestamp AT TIME ZONE 'UTC',
                                        (p.day + 1)::timestamp AT TIME ZONE 'UTC') x
        WHERE x.device_id = p.device_id
    ), {_day_parts("track")}
    UPDATE device_days d
    SET track_km = coalesce(tr.km, 0), moving_seconds = coalesce(m.moving, 0),
        first_latitude = tr.first_lat, first_longitude = tr.first_lon,
        last_fix_ts = tr.last_fix_ts, last_latitude = tr.last_lat, last_longitude = tr.last_lon,
        last_speed = coalesce(r.last_speed, d.last_speed), needs_recount = false
    FROM picked p
    LEFT JOIN moves m USING (device_id, day)
    LEFT JOIN travel tr USING (device_id, day)
    LEFT JOIN day_rows r USING (device_id, day)
    WHERE d.device_id = p.device_id AND d.day = p.day
    """
)


async def recount(engine: AsyncEngine, limit: int = 200) -> int:
    """Recount up to ``limit`` days marked needs_recount; returns how many. The days are locked
    first (a writer of one of them waits, then extends the recounted day in order, or marks it
    again), and read in a statement of their own, which sees every message committed before."""
    async with engine.begin() as conn:
        picked = (await conn.execute(_PICK, {"limit": limit})).fetchall()
        if not picked:
            return 0
        await conn.execute(
            _RECOUNT, {"devices": [p[0] for p in picked], "days": [p[1] for p in picked]}
        )
    return len(picked)
