"""Summaries of device messages kept on write: the latest message, hours and days per device.

Fleet questions read raw history otherwise: the latest message of every device was a
``DISTINCT ON`` over every message (53 s at 10M), daily mileage a pass over a week of payloads.
Three tables, kept by the statement that inserts device messages (mirror/store/summaries.py):

- ``device_latest_messages``: each device's newest message (by device time), whole.
- ``device_hours``: messages per device and UTC hour, with first and last time.
- ``device_days``: per device and UTC day, messages, first and last time, top speed, the
  ``vehicle.mileage`` range, distance along the positions (``track_km``), moving time, and
  ``distance_km``: the mileage range where the device reports one, else ``track_km``.

This revision fills them from the history already stored (both tiers), in one pass; days get
``needs_recount`` so the daemon computes their distance and moving time from their track.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 16:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GREAT_CIRCLE = """
    CREATE FUNCTION {s}.great_circle_km(lat1 float8, lon1 float8, lat2 float8, lon2 float8)
    RETURNS float8 LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        -- haversine on a sphere of the Earth's mean radius (6371.0088 km); NULL for a missing
        -- point (least() alone would turn NULL into 1: half the globe). One expression, no
        -- STRICT (least is not strict), so that the planner inlines it.
        SELECT CASE WHEN lat1 IS NOT NULL AND lon1 IS NOT NULL AND lat2 IS NOT NULL
                         AND lon2 IS NOT NULL
                    THEN 2 * 6371.0088 * asin(least(1, sqrt(
                             sin(radians(lat2 - lat1) / 2) ^ 2
                             + cos(radians(lat1)) * cos(radians(lat2))
                               * sin(radians(lon2 - lon1) / 2) ^ 2))) END
    $$
"""

TABLES = [
    """
    CREATE TABLE {s}.device_latest_messages (
        device_id bigint PRIMARY KEY,
        ts timestamptz NOT NULL,
        digest bytea NOT NULL,
        server_ts timestamptz,
        ident text,
        payload jsonb NOT NULL,
        received_at timestamptz NOT NULL,
        cid bigint
    )
    """,
    """
    CREATE TABLE {s}.device_hours (
        device_id bigint NOT NULL,
        hour timestamptz NOT NULL,
        messages integer NOT NULL,
        first_ts timestamptz NOT NULL,
        last_ts timestamptz NOT NULL,
        cid bigint,
        PRIMARY KEY (device_id, hour)
    )
    """,
    "CREATE INDEX device_hours_hour_idx ON {s}.device_hours (hour)",
    """
    CREATE TABLE {s}.device_days (
        device_id bigint NOT NULL,
        day date NOT NULL,
        cid bigint,
        messages integer NOT NULL,
        first_ts timestamptz NOT NULL,
        last_ts timestamptz NOT NULL,
        max_speed real,
        mileage_min double precision,
        mileage_max double precision,
        track_km double precision NOT NULL,
        moving_seconds double precision NOT NULL,
        distance_km double precision
            GENERATED ALWAYS AS (coalesce(mileage_max - mileage_min, track_km)) STORED,
        first_latitude double precision,
        first_longitude double precision,
        last_fix_ts timestamptz,
        last_latitude double precision,
        last_longitude double precision,
        last_speed real,
        needs_recount boolean NOT NULL DEFAULT false,
        PRIMARY KEY (device_id, day)
    )
    """,
    "CREATE INDEX device_days_day_idx ON {s}.device_days (day)",
    "CREATE INDEX device_days_recount_idx ON {s}.device_days (device_id, day) "
    "WHERE needs_recount",
]
COMMENTS = {
    "device_latest_messages": "The newest message of each device (by device time), kept with "
    "every write.",
    "device_hours": "Device messages per device and UTC hour, kept with every write.",
    "device_days": "Each device's UTC day: messages, times, distance, top speed, moving time; "
    "kept with every write.",
}
CID = "flespi account (customer) id: the cid user property, else the token's account"
COLUMN_COMMENTS = {
    ("device_latest_messages", "cid"): CID,
    ("device_hours", "cid"): CID,
    ("device_days", "cid"): CID,
    ("device_days", "max_speed"): "km/h, the highest position.speed of the day",
    ("device_days", "mileage_min"): "the lowest vehicle.mileage (km) of the day",
    ("device_days", "mileage_max"): "the highest vehicle.mileage (km) of the day",
    ("device_days", "track_km"): "km along the day's valid positions, in time order",
    ("device_days", "moving_seconds"): "seconds after a message at 5 km/h or more, gaps of "
    "up to 10 minutes",
    ("device_days", "distance_km"): "mileage_max - mileage_min, else track_km",
    ("device_days", "needs_recount"): "distance and moving time are being recomputed "
    "(messages arrived out of order)",
}

# The history already stored, per device and hour, in one pass over both tiers.
FILL = [
    """
    CREATE TEMP TABLE stored_hours ON COMMIT DROP AS
    SELECT device_id, {s}.hour_of(ts) AS hour, count(*)::int AS messages, min(ts) AS first_ts,
           max(ts) AS last_ts, max(cid) AS cid,
           max({s}.json_real(payload -> 'position.speed')) AS max_speed,
           min({s}.json_number(payload -> 'vehicle.mileage')) AS mileage_min,
           max({s}.json_number(payload -> 'vehicle.mileage')) AS mileage_max
    FROM {s}.device_messages GROUP BY 1, 2
    """,
    """
    INSERT INTO {s}.device_hours (device_id, hour, messages, first_ts, last_ts, cid)
    SELECT device_id, hour, messages, first_ts, last_ts, cid FROM stored_hours
    """,
    """
    INSERT INTO {s}.device_days (device_id, day, cid, messages, first_ts, last_ts, max_speed,
                                 mileage_min, mileage_max, track_km, moving_seconds,
                                 needs_recount)
    SELECT device_id, (hour AT TIME ZONE 'UTC')::date, max(cid), sum(messages), min(first_ts),
           max(last_ts), max(max_speed), min(mileage_min), max(mileage_max), 0, 0, true
    FROM stored_hours GROUP BY 1, 2
    """,
    """
    INSERT INTO {s}.device_latest_messages
           (device_id, ts, digest, server_ts, ident, payload, received_at, cid)
    SELECT DISTINCT ON (m.device_id) m.device_id, m.ts, m.digest, m.server_ts, m.ident,
           m.payload, m.received_at, m.cid
    FROM (SELECT device_id, max(last_ts) AS ts FROM stored_hours GROUP BY 1) newest
    CROSS JOIN LATERAL {s}.device_messages(newest.ts, newest.ts + interval '1 microsecond') m
    WHERE m.device_id = newest.device_id
    ORDER BY m.device_id, m.digest DESC
    """,
]


def _quoted(comment: str) -> str:
    return comment.replace("'", "''")


def _schema() -> str:
    return op.get_bind().execute(sa.text("SELECT current_schema()")).scalar_one()


def upgrade() -> None:
    s = f'"{_schema()}"'
    op.execute(GREAT_CIRCLE.replace("{s}", s))
    for statement in TABLES:
        op.execute(statement.replace("{s}", s))
    for table, comment in COMMENTS.items():
        op.execute(f"COMMENT ON TABLE {s}.{table} IS '{_quoted(comment)}'")
    for (table, column), comment in COLUMN_COMMENTS.items():
        op.execute(f"COMMENT ON COLUMN {s}.{table}.{column} IS '{_quoted(comment)}'")
    for statement in FILL:
        op.execute(statement.replace("{s}", s))
    for table in COMMENTS:  # a reader of device_messages may read its summaries
        op.execute(
            f"""
            DO $$
            DECLARE g record;
            BEGIN
                FOR g IN
                    SELECT a.privilege_type AS privilege,
                           CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                ELSE quote_ident(r.rolname) END AS grantee
                    FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
                    LEFT JOIN pg_roles r ON r.oid = a.grantee
                    WHERE c.oid = '{s}.device_messages_recent'::regclass
                      AND a.grantee <> c.relowner
                      AND a.privilege_type IN ('SELECT', 'INSERT', 'UPDATE', 'DELETE')
                LOOP
                    EXECUTE format('GRANT %s ON {s}.{table} TO %s', g.privilege, g.grantee);
                END LOOP;
            END $$
            """
        )


def downgrade() -> None:
    s = f'"{_schema()}"'
    for table in COMMENTS:
        op.execute(f"DROP TABLE {s}.{table}")
    op.execute(f"DROP FUNCTION {s}.great_circle_km(float8, float8, float8, float8)")
