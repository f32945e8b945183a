"""Accounts and new families: cid everywhere, calculator device state, platform logs, other
messages, telemetry expiry, per-path object merges, deleted devices leave the views.

Every change adds (a nullable column, a table, an index, a function) or replaces a view or a
function: rows of a 0001 database stay where they are (tests/test_migrations.py fills one and
upgrades it). Functions and views are SQL here, frozen with this revision.

Revision ID: 0002
Revises: 0003
Create Date: 2026-11-25 19:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = postgresql.TIMESTAMP(timezone=True)
JSONB = postgresql.JSONB(astext_type=sa.Text())

CID_TABLES = (
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
)
CID_COMMENT = "flespi account (customer) id: the cid user property, else the token's account"
# Indexes where analysts filter by account: (table, columns).
CID_INDEXES = (
    ("telemetry", ["cid"]),
    ("objects", ["cid"]),
    ("intervals", ["cid"]),
    ("dead_letters", ["cid"]),
    ("device_messages", ["cid", "ts"]),
    ("channel_messages", ["cid", "ts"]),
)
NEW_HISTORY_TABLES = ("platform_logs", "other_messages")

FUNCTIONS = [
    # props of an object rebuilt from its last whole payload (0001), now also without the
    # properties deleted after that payload was published (issue 9 item 4): tombstones newer
    # than the payload remove their path first, then live properties are merged in as before.
    """
    CREATE OR REPLACE FUNCTION object_props(p_api text, p_origin text, p_id bigint, p_base jsonb,
                                            p_base_ts timestamptz)
    RETURNS jsonb LANGUAGE plpgsql STABLE SET search_path FROM CURRENT AS $$
    DECLARE
        result jsonb := coalesce(p_base, '{}'::jsonb);
        prop record;
    BEGIN
        IF p_base IS NOT NULL AND p_base_ts IS NOT NULL THEN
            FOR prop IN
                SELECT path FROM object_properties_tombstones
                WHERE api = p_api AND origin = p_origin AND id = p_id AND ts > p_base_ts
            LOOP
                result := result #- prop.path;
            END LOOP;
        END IF;
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
    # Apply changed property paths to an object's props without reading its other properties,
    # so one update costs the same for an object with 10 or 10,000 properties (issue 8 item 3).
    # changes: [[path, live, value], ...]; live false removes the path. jsonb is rewritten
    # whole by every change, so changes are grouped by parent path: one rewrite per parent
    # per batch, not one per change (500 changes to a 10,000-key object: 1 copy, not 1,500).
    """
    CREATE FUNCTION {s}.object_patch(props jsonb, changes jsonb)
    RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
    DECLARE
        result jsonb := coalesce(props, '{}'::jsonb);
        grp record;
        parent_value jsonb;
    BEGIN
        FOR grp IN
            SELECT path[1:cardinality(path) - 1] AS parent,
                   coalesce(jsonb_object_agg(path[cardinality(path)], value)
                            FILTER (WHERE live), '{}'::jsonb) AS sets,
                   coalesce(array_agg(path[cardinality(path)]) FILTER (WHERE NOT live),
                            '{}'::text[]) AS drops
            FROM (SELECT ARRAY(SELECT jsonb_array_elements_text(c -> 0)) AS path,
                         (c ->> 1)::boolean AS live, c -> 2 AS value
                  FROM jsonb_array_elements(coalesce(changes, '[]'::jsonb)) AS x(c)) ch
            GROUP BY 1
            ORDER BY cardinality(path[1:cardinality(path) - 1]), 1
        LOOP
            IF cardinality(grp.parent) = 0 THEN
                result := (result - grp.drops) || grp.sets;
                CONTINUE;
            END IF;
            parent_value := result #> grp.parent;
            IF parent_value IS NULL AND grp.sets = '{}'::jsonb THEN
                CONTINUE;  -- removing below a level that is not there: nothing to do
            END IF;
            IF parent_value IS NULL OR jsonb_typeof(parent_value) <> 'object' THEN
                parent_value := '{}'::jsonb;
            END IF;
            result := {s}.jsonb_set_deep(result, grp.parent,
                                         (parent_value - grp.drops) || grp.sets);
        END LOOP;
        RETURN result;
    END $$
    """,
]
OLD_OBJECT_PROPS = """
    CREATE OR REPLACE FUNCTION object_props(p_api text, p_origin text, p_id bigint, p_base jsonb,
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
    """

# The views of 0001 (devices) and 0003 (device_positions) with two changes, each marked
# "0002:" so a later rewrite keeps them: a cid column, and deleted devices left out.
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
           -- 0002: the account the mirror saw the device under, else the one in its properties
           coalesce(o.cid, json_number(o.props -> 'cid')::bigint) AS cid,
           o.props,
           o.ts,
           o.received_at
    FROM objects o
    WHERE o.api = 'gw' AND o.origin = 'devices'
      -- 0002: a deleted device stays out, even if a late property update made a row again
      AND NOT (o.base IS NULL AND EXISTS (
          SELECT 1 FROM objects_tombstones t
          WHERE t.api = o.api AND t.origin = o.origin AND t.id = o.id))
    """,
    # 0003's view on device_position_parts (kept by triggers on telemetry), with cid and
    # without deleted devices. Expired telemetry leaves through the upkeep's DELETE (the
    # triggers then clear the part), within a minute.
    """
    CREATE VIEW device_positions AS
    SELECT p.device_id, p.position_latitude AS latitude, p.position_longitude AS longitude,
           p.position_altitude AS altitude, p.position_speed AS speed, p.position_ts AS ts,
           -- 0002: the device's account, from its object (a primary-key lookup)
           (SELECT o.cid FROM {s}.objects o
            WHERE o.api = 'gw' AND o.origin = 'devices' AND o.id = p.device_id) AS cid
    FROM {s}.device_position_parts p
    WHERE p.position_latitude IS NOT NULL AND p.position_longitude IS NOT NULL
      -- 0002: a device deleted after its last position is gone from the map
      AND NOT EXISTS (
          SELECT 1 FROM {s}.objects_tombstones t
          WHERE t.api = 'gw' AND t.origin = 'devices' AND t.id = p.device_id
            AND t.ts >= p.position_ts)
    """,
]


def _history_table(
    name: str, *columns: sa.Column[object], key: Sequence[str], comment: str
) -> None:
    op.create_table(
        name,
        *columns,
        sa.PrimaryKeyConstraint(*key),
        comment=comment,
        postgresql_partition_by="RANGE (ts)",
    )
    op.create_index(f"{name}_ts_idx", name, ["ts"], unique=False)
    op.create_index(f"{name}_cid_ts_idx", name, ["cid", "ts"], unique=False)
    op.execute(f"CREATE TABLE {name}_default PARTITION OF {name} DEFAULT")


def upgrade() -> None:
    for table in CID_TABLES:
        op.add_column(table, sa.Column("cid", sa.BigInteger(), nullable=True, comment=CID_COMMENT))
    for table, columns in CID_INDEXES:
        op.create_index(f"{table}_{'_'.join(columns)}_idx", table, columns, unique=False)
    op.add_column(
        "telemetry",
        sa.Column(
            "expires_at",
            TS,
            nullable=True,
            comment="when the value expires (MQTT message expiry); NULL: never",
        ),
    )
    op.create_index(
        "telemetry_expires_at_idx",
        "telemetry",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text("expires_at IS NOT NULL"),
    )
    op.create_table(
        "calculator_devices",
        sa.Column("calc_id", sa.BigInteger(), nullable=False, comment="flespi calculator id"),
        sa.Column("device_id", sa.BigInteger(), nullable=False, comment="flespi device id"),
        sa.Column("cid", sa.BigInteger(), nullable=True, comment=CID_COMMENT),
        sa.Column("last", JSONB, nullable=True, comment="the last interval (.../last)"),
        sa.Column("last_ts", TS, nullable=True),
        sa.Column(
            "active",
            JSONB,
            nullable=True,
            comment="the active interval (.../active, activation events); JSON null: none",
        ),
        sa.Column("active_ts", TS, nullable=True),
        sa.Column("synced", JSONB, nullable=True, comment="the sync state (.../synced)"),
        sa.Column("synced_ts", TS, nullable=True),
        sa.Column("ts", TS, nullable=False, comment="newest timestamp of any field"),
        sa.Column("received_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("calc_id", "device_id"),
        comment="A calculator's state for each device assigned to it.",
    )
    op.create_index(
        "calculator_devices_device_id_idx", "calculator_devices", ["device_id"], unique=False
    )
    op.create_index("calculator_devices_cid_idx", "calculator_devices", ["cid"], unique=False)
    _history_table(
        "platform_logs",
        sa.Column("api", sa.Text(), nullable=False, comment="flespi API, e.g. gw, platform"),
        sa.Column(
            "origin",
            sa.Text(),
            nullable=False,
            comment="origin path, e.g. devices/5/commands-queue/1",
        ),
        sa.Column(
            "event_type", sa.Text(), nullable=False, comment="last topic level, e.g. created"
        ),
        sa.Column("cid", sa.BigInteger(), nullable=True, comment=CID_COMMENT),
        sa.Column("ts", TS, nullable=False, comment="the record's timestamp"),
        sa.Column("digest", sa.LargeBinary(), nullable=False, comment="MD5 of the payload"),
        sa.Column("event_code", sa.BigInteger(), nullable=True),
        sa.Column("payload", JSONB, nullable=False, comment="the whole log record"),
        sa.Column("received_at", TS, nullable=False),
        key=("api", "origin", "event_type", "ts", "digest"),
        comment="flespi platform logs (flespi/log/...), each stored once.",
    )
    _history_table(
        "other_messages",
        sa.Column("topic", sa.Text(), nullable=False, comment="the whole MQTT topic"),
        sa.Column("cid", sa.BigInteger(), nullable=True, comment=CID_COMMENT),
        sa.Column("ts", TS, nullable=False, comment="payload 'timestamp', else the property"),
        sa.Column("digest", sa.LargeBinary(), nullable=False, comment="MD5 of the payload"),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("received_at", TS, nullable=False),
        key=("topic", "ts", "digest"),
        comment="flespi/message/... families not modelled yet (chats, containers, abques).",
    )
    s = '"' + op.get_bind().execute(sa.text("SELECT current_schema()")).scalar_one() + '"'
    for statement in FUNCTIONS:
        op.execute(statement.replace("{s}", s))
    op.execute("DROP VIEW device_positions")
    op.execute("DROP VIEW devices")
    for statement in VIEWS:
        op.execute(statement.replace("{s}", s))


def downgrade() -> None:
    s = '"' + op.get_bind().execute(sa.text("SELECT current_schema()")).scalar_one() + '"'
    initial = context.script.get_revision("0001").module  # the views, frozen there and in 0003
    positions = context.script.get_revision("0003").module
    op.execute("DROP VIEW device_positions")
    op.execute("DROP VIEW devices")
    op.execute("DROP FUNCTION object_patch(jsonb, jsonb)")
    op.execute(OLD_OBJECT_PROPS)
    for name in NEW_HISTORY_TABLES:
        op.drop_table(name)
    op.drop_table("calculator_devices")
    op.drop_index("telemetry_expires_at_idx", table_name="telemetry")
    op.drop_column("telemetry", "expires_at")
    for table, columns in CID_INDEXES:
        op.drop_index(f"{table}_{'_'.join(columns)}_idx", table_name=table)
    for table in CID_TABLES:
        op.drop_column(table, "cid")
    op.execute(initial.VIEWS[0])  # type: ignore[union-attr]
    op.execute(positions.POSITIONS_VIEW.format(s=s))  # type: ignore[union-attr]
