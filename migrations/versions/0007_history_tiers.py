"""Device and channel messages in two tiers: recent rows, and past hours packed one row each.

A device message took 1,441 bytes on disk (10M messages: 14 GB), most of it the jsonb payload,
which TOAST leaves uncompressed below 2 kB. The tables become the recent tier
(``device_messages_recent``, ``channel_messages_recent``: renamed, with their partitions, rows
and grants), and new ``*_hours`` tables (partitioned by day of ``hour``) hold past hours, one
row per device (channel and ident) and UTC hour: each per-message column an array, the payloads
one JSON array compressed by lz4 as one value (pglz where the server lacks lz4). The daemon's
compaction fills them (mirror/store/compaction.py); this revision moves no rows.

The views ``device_messages`` and ``channel_messages`` union both tiers with the columns the
tables had, and so does ``device_messages(since, until)`` for a time window, with the window
applied to both tiers' indexes (a view cannot pass a condition on an array element's ``ts``
down to the packed row's ``hour``). Each role's privileges on the old table are granted on the
view and the packed table too, so readers and a least-privilege writer keep working.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIERS = {  # old table -> (recent tier, packed hours, group columns)
    "device_messages": ("device_messages_recent", "device_message_hours", ("device_id",)),
    "channel_messages": ("channel_messages_recent", "channel_message_hours", ("channel_id", "ident")),  # noqa: E501
}
OFFSET_BIAS = 1_800_000_000

FUNCTIONS = [
    # The UTC hour a time falls in (date_bin is immutable; date_trunc follows the session zone).
    """
    CREATE FUNCTION {s}.hour_of(ts timestamptz) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT date_bin('1 hour', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00')
    $$
    """,
    # A time as an int4 offset into its hour: microseconds after the hour, minus 1.8e9.
    f"""
    CREATE FUNCTION {{s}}.ts_offset(ts timestamptz, hour timestamptz) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT (extract(epoch FROM ts - hour) * 1000000 - {OFFSET_BIAS})::integer
    $$
    """,
    # STABLE as timestamptz + interval is: an IMMUTABLE function whose body is not would not be
    # inlined, and a call of a SQL function costs 20 times the expression (bench history).
    f"""
    CREATE FUNCTION {{s}}.hour_ts(hour timestamptz, o integer) RETURNS timestamptz
    LANGUAGE sql STABLE PARALLEL SAFE AS $$
        SELECT hour + (o::bigint + {OFFSET_BIAS}) * interval '1 microsecond'
    $$
    """,
    # Whether a packed row holds the message with this offset and digest.
    """
    CREATE FUNCTION {s}.hour_holds(offsets integer[], digests bytea, o integer, digest bytea)
    RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT EXISTS (SELECT 1 FROM unnest(array_positions(offsets, o)) AS i
                       WHERE substring(digests FROM i * 16 - 15 FOR 16) = digest)
    $$
    """,
    # Typed readers that never fail: a number outside the type's range is NULL, not an error.
    # One expression each (no FROM), so that the planner inlines them.
    """
    CREATE FUNCTION {s}.json_real(v jsonb) RETURNS real
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT CASE WHEN jsonb_typeof(v) = 'number'
                         AND (v::numeric = 0 OR abs(v::numeric) BETWEEN 1.2e-38 AND 3.4e38)
                    THEN v::numeric::double precision::real END
    $$
    """,
    """
    CREATE FUNCTION {s}.json_smallint(v jsonb) RETURNS smallint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT CASE WHEN jsonb_typeof(v) = 'number' AND v::numeric BETWEEN -32768 AND 32767
                    THEN round(v::numeric)::smallint END
    $$
    """,
]
FUNCTION_NAMES = [
    "json_smallint(jsonb)",
    "json_real(jsonb)",
    "hour_holds(integer[], bytea, integer, bytea)",
    "hour_ts(timestamptz, integer)",
    "ts_offset(timestamptz, timestamptz)",
    "hour_of(timestamptz)",
]

PACKED_COMMON = """
    hour timestamptz NOT NULL,
    messages integer NOT NULL,
    first_ts timestamptz NOT NULL,
    last_ts timestamptz NOT NULL,
    ts_offsets integer[] NOT NULL,
    digests bytea NOT NULL,
    server_ts timestamptz[] NOT NULL,
    received_at timestamptz[] NOT NULL,
    cids bigint[] NOT NULL,
"""
PACKED = {
    "device_message_hours": f"""
        device_id bigint NOT NULL,
        {PACKED_COMMON}
        idents text[] NOT NULL,
        latitude double precision[] NOT NULL,
        longitude double precision[] NOT NULL,
        altitude real[] NOT NULL,
        speed real[] NOT NULL,
        direction real[] NOT NULL,
        satellites smallint[] NOT NULL,
        valid boolean[] NOT NULL,
        bbox box,
        payloads jsonb NOT NULL,
        PRIMARY KEY (device_id, hour)
    """,
    "channel_message_hours": f"""
        channel_id bigint NOT NULL,
        ident text NOT NULL,
        {PACKED_COMMON}
        payloads jsonb NOT NULL,
        PRIMARY KEY (channel_id, ident, hour)
    """,
}
COMMENTS = {
    "device_message_hours": "Device messages of past hours, one row per device and hour "
    "(read them through the device_messages view).",
    "channel_message_hours": "Channel messages of past hours, one row per channel, ident and hour "
    "(read them through the channel_messages view).",
    "device_messages_recent": "Device messages of the hours not compacted yet, each stored once "
    "(read them through the device_messages view).",
    "channel_messages_recent": "Channel messages of the hours not compacted yet, each stored "
    "once (read them through the channel_messages view).",
}
COLUMN_COMMENTS = {
    "hour": "the UTC hour the messages' ts fall in",
    "messages": "messages in the row",
    "ts_offsets": "each message's ts: microseconds after hour, minus 1,800,000,000",
    "digests": "the 16-byte MD5s, concatenated",
    "payloads": "the messages, a JSON array",
    "bbox": "longitude/latitude bounds of the hour's positions",
}
# Stored per message as arrays: compressed in line, so reading ts (or a position) never
# touches the payloads; the payloads are compressed and stored out of line.
IN_LINE = {
    "device_message_hours": (
        "ts_offsets", "digests", "server_ts", "received_at", "cids", "idents", "latitude",
        "longitude", "altitude", "speed", "direction", "satellites", "valid",
    ),
    "channel_message_hours": ("ts_offsets", "digests", "server_ts", "received_at", "cids"),
}  # fmt: skip

VIEW_COLUMNS = {
    "device_messages": (
        "device_id bigint, ts timestamptz, digest bytea, server_ts timestamptz, ident text, "
        "payload jsonb, received_at timestamptz, cid bigint"
    ),
    "channel_messages": (
        "channel_id bigint, ident text, ts timestamptz, digest bytea, server_ts timestamptz, "
        "payload jsonb, received_at timestamptz, cid bigint"
    ),
}
RECENT_SELECT = {
    "device_messages": "r.device_id, r.ts, r.digest, r.server_ts, r.ident, r.payload, "
    "r.received_at, r.cid",
    "channel_messages": "r.channel_id, r.ident, r.ts, r.digest, r.server_ts, r.payload, "
    "r.received_at, r.cid",
}
PACKED_SELECT = {
    "device_messages": "h.device_id, {s}.hour_ts(h.hour, m.o), "
    "substring(h.digests FROM m.i::int * 16 - 15 FOR 16), m.server_ts, m.ident, m.payload, "
    "m.received_at, m.cid",
    "channel_messages": "h.channel_id, h.ident, {s}.hour_ts(h.hour, m.o), "
    "substring(h.digests FROM m.i::int * 16 - 15 FOR 16), m.server_ts, m.payload, "
    "m.received_at, m.cid",
}
UNPACK = {
    "device_messages": "CROSS JOIN LATERAL ROWS FROM (unnest(h.ts_offsets), unnest(h.idents), "
    "unnest(h.server_ts), unnest(h.received_at), unnest(h.cids), "
    "jsonb_array_elements(h.payloads)) WITH ORDINALITY "
    "AS m(o, ident, server_ts, received_at, cid, payload, i)",
    "channel_messages": "CROSS JOIN LATERAL ROWS FROM (unnest(h.ts_offsets), "
    "unnest(h.server_ts), unnest(h.received_at), unnest(h.cids), "
    "jsonb_array_elements(h.payloads)) WITH ORDINALITY "
    "AS m(o, server_ts, received_at, cid, payload, i)",
}


def _schema() -> str:
    return op.get_bind().execute(sa.text("SELECT current_schema()")).scalar_one()


def _lz4() -> bool:
    return bool(
        op.get_bind()
        .execute(
            sa.text(
                "SELECT 'lz4' = ANY (enumvals) FROM pg_settings "
                "WHERE name = 'default_toast_compression'"
            )
        )
        .scalar()
    )


def _rename_tier(s: str, old: str, new: str) -> None:
    """The table, its partitions (``old_pYYYYMMDD``, ``old_default``) and its own indexes."""
    op.execute(f'ALTER TABLE "{s}".{old} RENAME TO {new}')
    partitions = op.get_bind().execute(
        sa.text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.oid = CAST(:t AS regclass)"
        ),
        {"t": f'"{s}".{new}'},
    ).fetchall()
    for (name,) in partitions:
        if name.startswith(old + "_"):
            op.execute(f'ALTER TABLE "{s}"."{name}" RENAME TO "{new}{name[len(old):]}"')
    for suffix in ("pkey", "ts_idx", "cid_ts_idx"):
        op.execute(f'ALTER INDEX IF EXISTS "{s}".{old}_{suffix} RENAME TO {new}_{suffix}')
    op.execute(f"COMMENT ON TABLE \"{s}\".{new} IS '{COMMENTS[new]}'")


# Device messages carry their typed position as columns from now on (the writer reads it from
# the payload; mirror/decode/payloads.py). Rows already stored get it here when they are recent
# enough to stay unpacked for a while; older ones get it from their payload when they are packed.
TRACK_COLUMNS = (
    ("latitude", "double precision", "json_number(payload -> 'position.latitude')"),
    ("longitude", "double precision", "json_number(payload -> 'position.longitude')"),
    ("altitude", "real", "json_real(payload -> 'position.altitude')"),
    ("speed", "real", "json_real(payload -> 'position.speed')"),
    ("direction", "real", "json_real(payload -> 'position.direction')"),
    ("satellites", "smallint", "json_smallint(payload -> 'position.satellites')"),
    ("valid", "boolean", "json_bool(payload -> 'position.valid')"),
)


def _add_track_columns(s: str) -> None:
    columns = ", ".join(f"ADD COLUMN {name} {type_}" for name, type_, _ in TRACK_COLUMNS)
    op.execute(f'ALTER TABLE "{s}".device_messages_recent {columns}')
    values = ", ".join(f'{name} = "{s}".{sql}' for name, _, sql in TRACK_COLUMNS)
    op.execute(
        f'UPDATE "{s}".device_messages_recent SET {values} '
        "WHERE ts > now() - interval '3 hours'"
    )


def _create_packed(s: str, name: str, group: tuple[str, ...], lz4: bool) -> None:
    op.execute(f'CREATE TABLE "{s}".{name} ({PACKED[name]}) PARTITION BY RANGE (hour)')
    for column in (*IN_LINE[name], "payloads"):
        if lz4:
            op.execute(f'ALTER TABLE "{s}".{name} ALTER COLUMN {column} SET COMPRESSION lz4')
        if column != "payloads":
            op.execute(f'ALTER TABLE "{s}".{name} ALTER COLUMN {column} SET STORAGE MAIN')
    op.execute(
        f'CREATE TABLE "{s}".{name}_default PARTITION OF "{s}".{name} DEFAULT '
        "WITH (toast_tuple_target = 128)"
    )
    op.execute(f'CREATE INDEX {name}_hour_idx ON "{s}".{name} (hour)')
    if name == "device_message_hours":
        op.execute(f'CREATE INDEX {name}_bbox_idx ON "{s}".{name} USING gist (bbox)')
    op.execute(f"COMMENT ON TABLE \"{s}\".{name} IS '{COMMENTS[name]}'")
    for column, comment in COLUMN_COMMENTS.items():
        if column != "bbox" or name == "device_message_hours":
            quoted = comment.replace("'", "''")
            op.execute(f"COMMENT ON COLUMN \"{s}\".{name}.{column} IS '{quoted}'")


def _view_and_window(s: str, view: str, recent: str, packed: str) -> None:
    recent_select = RECENT_SELECT[view]
    packed_select = PACKED_SELECT[view].replace("{s}", f'"{s}"')
    unpack = UNPACK[view]
    ts = f'"{s}".hour_ts(h.hour, m.o)'
    op.execute(
        f"""
        CREATE VIEW "{s}".{view} AS
        SELECT {recent_select} FROM "{s}".{recent} r
        UNION ALL
        SELECT {packed_select} FROM "{s}".{packed} h {unpack}
        """
    )
    # Inlined by the planner (SQL, STABLE, no SET): a caller's conditions on the columns reach
    # both tiers, and the window reaches the recent tier's ts and the packed tier's hour.
    op.execute(
        f"""
        CREATE FUNCTION "{s}".{view}(since timestamptz, until timestamptz DEFAULT 'infinity')
        RETURNS TABLE ({VIEW_COLUMNS[view]}) LANGUAGE sql STABLE AS $$
            SELECT {recent_select} FROM "{s}".{recent} r
            WHERE r.ts >= since AND r.ts < until
            UNION ALL
            SELECT {packed_select} FROM "{s}".{packed} h {unpack}
            WHERE h.hour > since - interval '1 hour' AND h.hour < until
              AND ((h.hour >= since AND h.hour <= until - interval '1 hour')
                   OR ({ts} >= since AND {ts} < until))
        $$
        """
    )


def _copy_grants(s: str, source: str, target: str, *, read_only: bool) -> None:
    """Grant each role (PUBLIC included) on ``target`` what it holds on ``source``."""
    privileges = "('SELECT')" if read_only else "('SELECT', 'INSERT', 'UPDATE', 'DELETE')"
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
                WHERE c.oid = '"{s}".{source}'::regclass AND a.grantee <> c.relowner
                  AND a.privilege_type IN {privileges}
            LOOP
                EXECUTE format('GRANT %s ON "{s}".{target} TO %s', g.privilege, g.grantee);
            END LOOP;
        END $$
        """
    )


def upgrade() -> None:
    s = _schema()
    for function in FUNCTIONS:
        op.execute(function.replace("{s}", f'"{s}"'))
    lz4 = _lz4()
    for old, (recent, packed, group) in TIERS.items():
        _rename_tier(s, old, recent)
        if old == "device_messages":
            _add_track_columns(s)
        _create_packed(s, packed, group, lz4)
        _view_and_window(s, old, recent, packed)
        _copy_grants(s, recent, packed, read_only=False)
        _copy_grants(s, recent, old, read_only=True)
    op.execute(
        f"""INSERT INTO "{s}".sync_state (name, value, updated_at)
        VALUES ('history:horizon', '{{"horizon": "-infinity"}}', now())
        ON CONFLICT (name) DO NOTHING"""
    )


def downgrade() -> None:
    """Every packed message back into the single table, then the tiers undone."""
    s = _schema()
    op.execute(f"DELETE FROM \"{s}\".sync_state WHERE name = 'history:horizon'")
    for old, (recent, packed, _group) in TIERS.items():
        columns = RECENT_SELECT[old].replace("r.", "")
        op.execute(
            f"""
            INSERT INTO "{s}".{recent} ({columns})
            SELECT {PACKED_SELECT[old].replace("{s}", f'"{s}"')}
            FROM "{s}".{packed} h {UNPACK[old]}
            ON CONFLICT DO NOTHING
            """
        )
        if old == "device_messages":
            columns = ", ".join(f"DROP COLUMN {name}" for name, _, _ in TRACK_COLUMNS)
            op.execute(f'ALTER TABLE "{s}".{recent} {columns}')
        op.execute(f'DROP FUNCTION "{s}".{old}(timestamptz, timestamptz)')
        op.execute(f'DROP VIEW "{s}".{old}')
        op.execute(f'DROP TABLE "{s}".{packed}')
        partitions = op.get_bind().execute(
            sa.text(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = CAST(:t AS regclass)"
            ),
            {"t": f'"{s}".{recent}'},
        ).fetchall()
        op.execute(f'ALTER TABLE "{s}".{recent} RENAME TO {old}')
        for (name,) in partitions:
            if name.startswith(recent + "_"):
                op.execute(f'ALTER TABLE "{s}"."{name}" RENAME TO "{old}{name[len(recent):]}"')
        for suffix in ("pkey", "ts_idx", "cid_ts_idx"):
            op.execute(f'ALTER INDEX IF EXISTS "{s}".{recent}_{suffix} RENAME TO {old}_{suffix}')
        label = "Every device message" if old == "device_messages" else "Every message seen by a channel"  # noqa: E501
        op.execute(f"COMMENT ON TABLE \"{s}\".{old} IS '{label}, each stored once.'")
    for function in FUNCTION_NAMES:
        op.execute(f'DROP FUNCTION "{s}".{function}')
