"""Typed track: each device message's position and motion as real columns, indexed in space.

``device_track`` (a view over both tiers of ``device_messages``) has a row per message with
``latitude``, ``longitude`` (double precision), ``altitude``, ``speed``, ``direction`` (real),
``satellites`` (smallint), ``valid`` (boolean) from flespi's ``position.*`` parameters, and
``position``, a ``point(longitude, latitude)``. Packed hours carry these as arrays already
(0007), so a day of one device is a few arrays read, never a payload; recent rows carry them
as columns (0007; the writer reads them from the payload). ``device_track(since, until)`` is
the same for a time window, and ``device_track(since, until, area box)`` for a window and an
area, which the packed rows' bounding boxes (a GiST index) and an SP-GiST index on the recent
rows' points narrow down.

With PostGIS in the database, the same objects carry a ``geom`` column (``geometry`` Point,
SRID 4326), the recent rows get a GiST index on it, and ``device_track(since, until, area
geometry)`` takes any geometry for the area. ``deploy`` below is the one definition of these
objects; ``mirror.store.extensions`` calls it again when PostGIS is installed or removed later.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 14:00:00
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (column, type): the typed position, columns of the recent rows (the writer reads them from
# the payload as it stores a message; mirror/decode/payloads.py) and arrays of the packed rows.
FIELDS = (
    ("latitude", "double precision"),
    ("longitude", "double precision"),
    ("altitude", "real"),
    ("speed", "real"),
    ("direction", "real"),
    ("satellites", "smallint"),
    ("valid", "boolean"),
)
# A recent row stored before 0007 lacks the columns (0007 filled the last three hours; older
# rows get them when they are packed, which compaction does first): read those from the
# payload, with the rules the writer applies.
FALLBACK = {
    "latitude": "json_number(r.payload -> 'position.latitude')",
    "longitude": "json_number(r.payload -> 'position.longitude')",
    "altitude": "json_real(r.payload -> 'position.altitude')",
    "speed": "json_real(r.payload -> 'position.speed')",
    "direction": "json_real(r.payload -> 'position.direction')",
    "satellites": "json_smallint(r.payload -> 'position.satellites')",
    "valid": "json_bool(r.payload -> 'position.valid')",
}
SIGNATURES = (
    "device_track(timestamptz, timestamptz)",
    "device_track(timestamptz, timestamptz, box)",
)
GEOMETRY_SIGNATURE = "device_track(timestamptz, timestamptz, {g}.geometry)"


def _parts(s: str, g: str | None) -> tuple[str, str, str, str]:
    """(columns, recent select list, packed select list and FROM, geometry of a packed row)."""
    names = [n for n, _ in FIELDS]
    columns = ", ".join(
        ["device_id bigint", "ts timestamptz", *(f"{n} {t}" for n, t in FIELDS)]
        + ['"position" point', "cid bigint"]
        + ([f"geom {g}.geometry"] if g else [])
    )
    recent = ", ".join(
        ["r.device_id", "r.ts", *(f"coalesce(r.{n}, {s}.{FALLBACK[n]}) AS {n}" for n in names)]
        + ["point(r.longitude, r.latitude) AS position", "r.cid"]
        + ([f"{g}.ST_SetSRID({g}.ST_MakePoint(r.longitude, r.latitude), 4326) AS geom"]
           if g else [])
    )
    geom = f"{g}.ST_SetSRID({g}.ST_MakePoint(m.longitude, m.latitude), 4326)" if g else ""
    packed = ", ".join(
        ["h.device_id", f"{s}.hour_ts(h.hour, m.o)", *(f"m.{n}" for n in names)]
        + ["point(m.longitude, m.latitude)", "m.cid"]
        + ([geom] if g else [])
    )
    arrays = ", ".join(f"unnest(h.{n})" for n in names)
    packed += (
        f" FROM {s}.device_message_hours h CROSS JOIN LATERAL ROWS FROM "
        f"(unnest(h.ts_offsets), {arrays}, unnest(h.cids)) AS m(o, {', '.join(names)}, cid)"
    )
    return columns, recent, packed, geom


def deploy(execute: Callable[[str], object], schema: str, postgis: str | None) -> None:
    """(Re)create the track objects in ``schema``; with PostGIS (its schema) the geom flavour.
    Idempotent: drops what it makes first."""
    s, g = f'"{schema}"', (f'"{postgis}"' if postgis else None)
    drop(execute, schema, postgis_schemas=[postgis] if postgis else [])
    columns, recent, packed, geom = _parts(s, g)
    point = "point(r.longitude, r.latitude)"
    window = "r.ts >= since AND r.ts < until"
    # Per message only in the hours the window cuts: a whole hour inside needs no check.
    hours = (
        f"h.hour > since - interval '1 hour' AND h.hour < until "
        f"AND ((h.hour >= since AND h.hour <= until - interval '1 hour') "
        f"OR ({s}.hour_ts(h.hour, m.o) >= since AND {s}.hour_ts(h.hour, m.o) < until))"
    )
    execute(
        f"CREATE VIEW {s}.device_track AS SELECT {recent} FROM {s}.device_messages_recent r "
        f"UNION ALL SELECT {packed}"
    )
    execute(
        f"COMMENT ON VIEW {s}.device_track IS 'Each device message''s position and motion as "
        "typed columns, both tiers (device_track(since, until) for a time window).'"
    )
    # Inlined by the planner (SQL, STABLE, no SET), so the caller's conditions reach both tiers.
    functions = [
        ("since timestamptz, until timestamptz DEFAULT 'infinity'", "", ""),
        (
            "since timestamptz, until timestamptz, area box",
            f" AND {point} <@ area",
            " AND h.bbox && area AND point(m.longitude, m.latitude) <@ area",
        ),
    ]
    if g:
        recent_geom = f"{g}.ST_SetSRID({g}.ST_MakePoint(r.longitude, r.latitude), 4326)"
        envelope = (
            f"box(point({g}.ST_XMin(area), {g}.ST_YMin(area)), "
            f"point({g}.ST_XMax(area), {g}.ST_YMax(area)))"
        )
        functions.append(
            (
                f"since timestamptz, until timestamptz, area {g}.geometry",
                f" AND {g}.ST_Intersects({recent_geom}, area)",
                f" AND h.bbox && {envelope} AND {g}.ST_Intersects({geom}, area)",
            )
        )
    for arguments, recent_area, packed_area in functions:
        execute(
            f"""
            CREATE FUNCTION {s}.device_track({arguments}) RETURNS TABLE ({columns})
            LANGUAGE sql STABLE AS $$
                SELECT {recent} FROM {s}.device_messages_recent r WHERE {window}{recent_area}
                UNION ALL
                SELECT {packed} WHERE {hours}{packed_area}
            $$
            """
        )
    # SP-GiST (a k-d tree) costs a writer half what GiST does per row, and answers <@ box alike.
    execute(
        f"CREATE INDEX IF NOT EXISTS device_messages_recent_position_idx "
        f"ON {s}.device_messages_recent USING spgist (point(longitude, latitude) kd_point_ops)"
    )
    if g:
        execute(
            f"CREATE INDEX IF NOT EXISTS device_messages_recent_geom_idx "
            f"ON {s}.device_messages_recent USING gist "
            f"({g}.ST_SetSRID({g}.ST_MakePoint(longitude, latitude), 4326))"
        )


def drop(execute: Callable[[str], object], schema: str, postgis_schemas: Sequence[str]) -> None:
    """Drop the track objects (either flavour)."""
    s = f'"{schema}"'
    for g in postgis_schemas:
        signature = GEOMETRY_SIGNATURE.replace("{g}", '"' + g + '"')
        execute(f"DROP FUNCTION IF EXISTS {s}.{signature}")
    for signature in SIGNATURES:
        execute(f"DROP FUNCTION IF EXISTS {s}.{signature}")
    execute(f"DROP VIEW IF EXISTS {s}.device_track")
    execute(f"DROP INDEX IF EXISTS {s}.device_messages_recent_geom_idx")


def postgis_schema(connection: sa.engine.Connection) -> str | None:
    """The schema PostGIS is installed in, in this database; None when it is not installed."""
    return connection.execute(
        sa.text(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
            "WHERE e.extname = 'postgis'"
        )
    ).scalar()


def _schema() -> str:
    return op.get_bind().execute(sa.text("SELECT current_schema()")).scalar_one()


def upgrade() -> None:
    deploy(op.execute, _schema(), postgis_schema(op.get_bind()))


def downgrade() -> None:
    s = _schema()
    postgis = postgis_schema(op.get_bind())
    drop(op.execute, s, [postgis] if postgis else [])
    op.execute(f'DROP INDEX IF EXISTS "{s}".device_messages_recent_position_idx')
