"""Initial schema: state tables with tombstones, history tables, dead letters, views.

Functions and views are SQL here, frozen with this revision: later changes get new revisions.

Revision ID: 0001
Revises:
Create Date: 2026-11-24 15:43:16.116543
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


FUNCTIONS = [
    # jsonb_set creates only the last key of a path; property paths can be deeper
    # (connections/42), so missing levels are created as objects.
    """
    CREATE FUNCTION jsonb_set_deep(target jsonb, path text[], new_value jsonb)
    RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
    BEGIN
        IF target IS NULL OR jsonb_typeof(target) <> 'object' THEN
            target := '{}'::jsonb;
        END IF;
        IF cardinality(path) <= 1 THEN
            RETURN jsonb_set(target, path, new_value, true);
        END IF;
        RETURN jsonb_set(target, path[1:1],
                         jsonb_set_deep(target -> path[1], path[2:], new_value), true);
    END $$
    """,
    # An object's props: its last whole payload, with every property row merged in that is
    # newer than that payload or that the payload does not carry at all.
    """
    CREATE FUNCTION object_props(p_api text, p_origin text, p_id bigint, p_base jsonb,
                                 p_base_ts timestamptz)
    RETURNS jsonb LANGUAGE plpgsql STABLE SET search_path FROM CURRENT AS $$
    DECLARE
        result jsonb := coalesce(p_base, '{}'::jsonb);
        prop record;
    BEGIN
        FOR prop IN
            SELECT path, value, ts FROM object_properties
            WHERE api = p_api AND origin = p_origin AND id = p_id
            ORDER BY cardinality(path), path
        LOOP
            IF p_base IS NULL OR p_base_ts IS NULL OR prop.ts > p_base_ts
               OR NOT (p_base ? prop.path[1]) THEN
                result := jsonb_set_deep(result, prop.path, prop.value);
            END IF;
        END LOOP;
        RETURN result;
    END $$
    """,
    # Typed reads of jsonb for the views: NULL instead of an error on a value of another type.
    """
    CREATE FUNCTION json_number(v jsonb) RETURNS double precision
    LANGUAGE sql IMMUTABLE AS $$
        SELECT CASE WHEN jsonb_typeof(v) = 'number'
                         AND abs(v::numeric) < 1e300
                         AND (v::numeric = 0 OR abs(v::numeric) > 1e-300)
                    THEN v::numeric::double precision END
    $$
    """,
    """
    CREATE FUNCTION json_bool(v jsonb) RETURNS boolean
    LANGUAGE sql IMMUTABLE AS $$
        SELECT CASE WHEN jsonb_typeof(v) = 'boolean' THEN v::boolean END
    $$
    """,
    """
    CREATE FUNCTION json_epoch(v jsonb) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE AS $$
        SELECT CASE WHEN json_number(v) BETWEEN 0 AND 4102444800
                    THEN to_timestamp(json_number(v)) END
    $$
    """,
]
FUNCTION_NAMES = [
    "object_props(text, text, bigint, jsonb, timestamptz)",
    "jsonb_set_deep(jsonb, text[], jsonb)",
    "json_epoch(jsonb)",
    "json_bool(jsonb)",
    "json_number(jsonb)",
]

VIEWS = [
    """
    CREATE VIEW devices AS
    SELECT o.id AS device_id,
           o.props ->> 'name' AS name,
           o.props -> 'configuration' ->> 'ident' AS ident,
           json_number(o.props -> 'device_type_id')::bigint AS device_type_id,
           json_number(o.props -> 'protocol_id')::bigint AS protocol_id,
           json_bool(o.props -> 'connected') AS connected,
           json_epoch(o.props -> 'last_active') AS last_active,
           json_number(o.props -> 'cid')::bigint AS cid,
           o.props,
           o.ts,
           o.received_at
    FROM objects o
    WHERE o.api = 'gw' AND o.origin = 'devices'
    """,
    # Positions from the 'position' object parameter or the 'position.*' parameters,
    # whichever is newer per device.
    """
    CREATE VIEW device_positions AS
    WITH whole AS (
        SELECT device_id,
               json_number(value -> 'latitude') AS latitude,
               json_number(value -> 'longitude') AS longitude,
               json_number(value -> 'altitude') AS altitude,
               json_number(value -> 'speed') AS speed,
               ts
        FROM telemetry
        WHERE name = 'position' AND jsonb_typeof(value) = 'object'
    ), dotted AS (
        SELECT device_id,
               max(json_number(value)) FILTER (WHERE name = 'position.latitude') AS latitude,
               max(json_number(value)) FILTER (WHERE name = 'position.longitude') AS longitude,
               max(json_number(value)) FILTER (WHERE name = 'position.altitude') AS altitude,
               max(json_number(value)) FILTER (WHERE name = 'position.speed') AS speed,
               max(ts) FILTER (WHERE name IN ('position.latitude', 'position.longitude')) AS ts
        FROM telemetry
        WHERE name IN ('position.latitude', 'position.longitude', 'position.altitude',
                       'position.speed')
        GROUP BY device_id
    ), chosen AS (
        SELECT coalesce(w.device_id, d.device_id) AS device_id,
               (w.latitude IS NOT NULL AND w.longitude IS NOT NULL
                AND (d.ts IS NULL OR d.latitude IS NULL OR w.ts >= d.ts)) AS use_whole,
               w.latitude AS w_lat, w.longitude AS w_lon, w.altitude AS w_alt, w.speed AS w_speed,
               w.ts AS w_ts,
               d.latitude AS d_lat, d.longitude AS d_lon, d.altitude AS d_alt,
               d.speed AS d_speed, d.ts AS d_ts
        FROM whole w FULL JOIN dotted d ON d.device_id = w.device_id
    )
    SELECT device_id,
           CASE WHEN use_whole THEN w_lat ELSE d_lat END AS latitude,
           CASE WHEN use_whole THEN w_lon ELSE d_lon END AS longitude,
           CASE WHEN use_whole THEN coalesce(w_alt, d_alt) ELSE d_alt END AS altitude,
           CASE WHEN use_whole THEN coalesce(w_speed, d_speed) ELSE d_speed END AS speed,
           CASE WHEN use_whole THEN w_ts ELSE d_ts END AS ts
    FROM chosen
    WHERE (use_whole OR (d_lat IS NOT NULL AND d_lon IS NOT NULL))
    """,
]


def upgrade() -> None:
    op.create_table(
        "channel_messages",
        sa.Column("channel_id", sa.BigInteger(), nullable=False),
        sa.Column("ident", sa.Text(), nullable=False),
        sa.Column("ts", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("digest", sa.LargeBinary(), nullable=False),
        sa.Column("server_ts", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("received_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("channel_id", "ident", "ts", "digest"),
        comment="Every message seen by a channel, each stored once.",
        postgresql_partition_by="RANGE (ts)",
    )
    op.create_index("channel_messages_ts_idx", "channel_messages", ["ts"], unique=False)
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column(
            "payload", sa.LargeBinary(), nullable=False, comment="first bytes of the payload"
        ),
        sa.Column(
            "payload_size", sa.Integer(), nullable=False, comment="full payload size in bytes"
        ),
        sa.Column(
            "properties",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            comment="MQTT 5 user properties",
        ),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("received_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        comment="Messages that could not be mirrored, with the reason.",
    )
    op.create_index("dead_letters_received_at_idx", "dead_letters", ["received_at"], unique=False)
    op.create_table(
        "device_messages",
        sa.Column("device_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "ts",
            postgresql.TIMESTAMP(timezone=True),
            nullable=False,
            comment="message 'timestamp' (device time)",
        ),
        sa.Column(
            "digest", sa.LargeBinary(), nullable=False, comment="MD5 of the payload: its identity"
        ),
        sa.Column(
            "server_ts",
            postgresql.TIMESTAMP(timezone=True),
            nullable=True,
            comment="message 'server.timestamp'",
        ),
        sa.Column("ident", sa.Text(), nullable=True),
        sa.Column(
            "payload",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            comment="the whole message, dotted keys",
        ),
        sa.Column("received_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "ts", "digest"),
        comment="Every device message, each stored once.",
        postgresql_partition_by="RANGE (ts)",
    )
    op.create_index("device_messages_ts_idx", "device_messages", ["ts"], unique=False)
    op.create_table(
        "device_settings",
        sa.Column("device_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "name", sa.Text(), nullable=False, comment="setting name; deeper levels as name/field"
        ),
        sa.Column("value", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("ts", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("received_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "name"),
        comment="Current device settings.",
    )
    op.create_table(
        "device_settings_tombstones",
        sa.Column("device_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column(
            "ts",
            postgresql.TIMESTAMP(timezone=True),
            nullable=False,
            comment="time of the latest deletion of this key",
        ),
        sa.PrimaryKeyConstraint("device_id", "name"),
        comment="Deletions of device_settings rows, so older updates cannot resurrect them.",
    )
    op.create_table(
        "intervals",
        sa.Column("calc_id", sa.BigInteger(), nullable=False),
        sa.Column("device_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "interval_key", sa.Text(), nullable=False, comment="'id:<flespi id>' or 'begin:<begin>'"
        ),
        sa.Column(
            "interval_id",
            sa.BigInteger(),
            nullable=True,
            comment="flespi's interval id, when it sent one",
        ),
        sa.Column("begin", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("end", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("duration", sa.Double(), nullable=True, comment="seconds"),
        sa.Column("event", sa.Text(), nullable=False, comment="last event: created, updated, ..."),
        sa.Column(
            "data",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            comment="the whole interval, with every counter",
        ),
        sa.Column("ts", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("received_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("calc_id", "device_id", "interval_key"),
        comment="Calculator intervals per device.",
    )
    op.create_index("intervals_device_begin_idx", "intervals", ["device_id", "begin"], unique=False)
    op.create_table(
        "intervals_tombstones",
        sa.Column("calc_id", sa.BigInteger(), nullable=False),
        sa.Column("device_id", sa.BigInteger(), nullable=False),
        sa.Column("interval_key", sa.Text(), nullable=False),
        sa.Column(
            "ts",
            postgresql.TIMESTAMP(timezone=True),
            nullable=False,
            comment="time of the latest deletion of this key",
        ),
        sa.PrimaryKeyConstraint("calc_id", "device_id", "interval_key"),
        comment="Deletions of intervals rows, so older updates cannot resurrect them.",
    )
    op.create_table(
        "modem_messages",
        sa.Column("modem_id", sa.BigInteger(), nullable=False),
        sa.Column("phone", sa.Text(), nullable=False),
        sa.Column("ts", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("digest", sa.LargeBinary(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("received_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("modem_id", "phone", "ts", "digest"),
        comment="SMS received by modems, each stored once.",
        postgresql_partition_by="RANGE (ts)",
    )
    op.create_table(
        "object_properties",
        sa.Column("api", sa.Text(), nullable=False),
        sa.Column("origin", sa.Text(), nullable=False),
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column(
            "path",
            postgresql.ARRAY(sa.Text()),
            nullable=False,
            comment="property path, e.g. {connections,42}",
        ),
        sa.Column("value", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("ts", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("received_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("api", "origin", "id", "path"),
        comment="Individual property updates of flespi items (merged into objects.props).",
    )
    op.create_table(
        "object_properties_tombstones",
        sa.Column("api", sa.Text(), nullable=False),
        sa.Column("origin", sa.Text(), nullable=False),
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("path", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column(
            "ts",
            postgresql.TIMESTAMP(timezone=True),
            nullable=False,
            comment="time of the latest deletion of this key",
        ),
        sa.PrimaryKeyConstraint("api", "origin", "id", "path"),
        comment="Deletions of object_properties rows, so older updates cannot resurrect them.",
    )
    op.create_table(
        "objects",
        sa.Column(
            "api", sa.Text(), nullable=False, comment="flespi API, e.g. gw, storage, platform"
        ),
        sa.Column(
            "origin", sa.Text(), nullable=False, comment="item type, e.g. devices, channels, calcs"
        ),
        sa.Column(
            "id", sa.BigInteger(), nullable=False, comment="item id (the cid for platform/customer)"
        ),
        sa.Column(
            "props",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            comment="the whole object with newer property updates merged in",
        ),
        sa.Column(
            "base",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=True,
            comment="the last whole-object payload, as sent",
        ),
        sa.Column(
            "base_ts",
            postgresql.TIMESTAMP(timezone=True),
            nullable=True,
            comment="timestamp of that whole-object payload",
        ),
        sa.Column(
            "ts",
            postgresql.TIMESTAMP(timezone=True),
            nullable=False,
            comment="newest timestamp of any update of the object",
        ),
        sa.Column("received_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("api", "origin", "id"),
        comment="flespi items (devices, channels, calcs, ...) with their properties.",
    )
    op.create_table(
        "objects_tombstones",
        sa.Column("api", sa.Text(), nullable=False),
        sa.Column("origin", sa.Text(), nullable=False),
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column(
            "ts",
            postgresql.TIMESTAMP(timezone=True),
            nullable=False,
            comment="time of the latest deletion of this key",
        ),
        sa.PrimaryKeyConstraint("api", "origin", "id"),
        comment="Deletions of objects rows, so older updates cannot resurrect them.",
    )
    op.create_table(
        "plugin_device_configs",
        sa.Column("plugin_id", sa.BigInteger(), nullable=False),
        sa.Column("device_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "config",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            comment="the plugin's configuration for the device",
        ),
        sa.Column("ts", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("received_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("plugin_id", "device_id"),
        comment="Per-device plugin configurations.",
    )
    op.create_table(
        "plugin_device_configs_tombstones",
        sa.Column("plugin_id", sa.BigInteger(), nullable=False),
        sa.Column("device_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "ts",
            postgresql.TIMESTAMP(timezone=True),
            nullable=False,
            comment="time of the latest deletion of this key",
        ),
        sa.PrimaryKeyConstraint("plugin_id", "device_id"),
        comment="Deletions of plugin_device_configs rows, so older updates cannot resurrect them.",
    )
    op.create_table(
        "telemetry",
        sa.Column("device_id", sa.BigInteger(), nullable=False, comment="flespi device id"),
        sa.Column(
            "name", sa.Text(), nullable=False, comment="parameter name, e.g. position.latitude"
        ),
        sa.Column(
            "value",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            comment="the parameter's latest value, as sent",
        ),
        sa.Column(
            "ts",
            postgresql.TIMESTAMP(timezone=True),
            nullable=False,
            comment="when the value appeared (MQTT 'timestamp')",
        ),
        sa.Column(
            "received_at",
            postgresql.TIMESTAMP(timezone=True),
            nullable=False,
            comment="when the mirror received it",
        ),
        sa.PrimaryKeyConstraint("device_id", "name"),
        comment="Latest value of every device telemetry parameter.",
    )
    op.create_index("telemetry_name_idx", "telemetry", ["name"], unique=False)
    op.create_table(
        "telemetry_tombstones",
        sa.Column("device_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column(
            "ts",
            postgresql.TIMESTAMP(timezone=True),
            nullable=False,
            comment="time of the latest deletion of this key",
        ),
        sa.PrimaryKeyConstraint("device_id", "name"),
        comment="Deletions of telemetry rows, so older updates cannot resurrect them.",
    )
    op.create_table(
        "sync_state",
        sa.Column("name", sa.Text(), nullable=False, comment="e.g. snapshot:<share group>"),
        sa.Column("value", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("updated_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
        comment="The mirror's own bookkeeping (completed retained-state snapshots).",
    )
    # History tables are partitioned by day; the daemon creates day partitions ahead, and the
    # default partition takes whatever falls outside them (see mirror/store/partitions.py).
    for table in ("device_messages", "channel_messages", "modem_messages"):
        op.execute(f"CREATE TABLE {table}_default PARTITION OF {table} DEFAULT")
    for statement in FUNCTIONS + VIEWS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS device_positions")
    op.execute("DROP VIEW IF EXISTS devices")
    for name in FUNCTION_NAMES:
        op.execute(f"DROP FUNCTION IF EXISTS {name}")
    op.drop_table("telemetry_tombstones")
    op.drop_index("telemetry_name_idx", table_name="telemetry")
    op.drop_table("sync_state")
    op.drop_table("telemetry")
    op.drop_table("plugin_device_configs_tombstones")
    op.drop_table("plugin_device_configs")
    op.drop_table("objects_tombstones")
    op.drop_table("objects")
    op.drop_table("object_properties_tombstones")
    op.drop_table("object_properties")
    op.drop_table("modem_messages")
    op.drop_table("intervals_tombstones")
    op.drop_index("intervals_device_begin_idx", table_name="intervals")
    op.drop_table("intervals")
    op.drop_table("device_settings_tombstones")
    op.drop_table("device_settings")
    op.drop_index("device_messages_ts_idx", table_name="device_messages")
    op.drop_table("device_messages")
    op.drop_index("dead_letters_received_at_idx", table_name="dead_letters")
    op.drop_table("dead_letters")
    op.drop_index("channel_messages_ts_idx", table_name="channel_messages")
    op.drop_table("channel_messages")
