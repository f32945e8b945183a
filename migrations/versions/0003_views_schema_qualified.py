"""Views and functions that work from any search_path; positions kept current by a trigger.

BI tools qualify names (``SELECT * FROM flespi.devices``) from a session whose search_path does
not hold the mirror's schema. A view binds the functions it calls when it is created, but a SQL
function's body is parsed when it runs, with the caller's search_path: ``json_epoch`` called
``json_number`` unqualified and failed. Bodies now name the schema they live in (the schema the
migration runs in); the SQL functions stay inlinable (a ``SET search_path`` clause would stop
the planner inlining them into the views).

``device_positions`` computed every device's position by a FULL JOIN of two aggregates over
``telemetry``: a predicate on one device could not reach the index, and all devices meant
aggregating every position parameter of every device (2.6 s at 100,000 devices). Statement
triggers on ``telemetry`` now keep each device's position parameters (value and ts of
``position``, ``position.latitude``, ...) in ``device_position_parts``, from the rows the
statement changed, without reading ``telemetry`` again; the view applies revision 0001's rule
(the ``position`` object or the ``position.*`` parameters, whichever is newer) to that table:
one device is a primary-key lookup, all devices one scan. Each writer sets only the parts its
statement carries (INSERT ... ON CONFLICT DO UPDATE), so two writers of one device
(shared-subscription workers) cannot undo each other's parts.

Revision ID: 0003
Revises: 0001
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POSITION_NAMES = "('position', 'position.latitude', 'position.longitude', 'position.altitude', 'position.speed')"  # noqa: E501


def qualified_functions(s: str) -> list[str]:
    """The typed jsonb readers and the deep setter, naming schema ``s`` in their bodies."""
    return [
        f"""
        CREATE OR REPLACE FUNCTION {s}.json_epoch(v jsonb) RETURNS timestamptz
        LANGUAGE sql IMMUTABLE AS $$
            SELECT CASE WHEN {s}.json_number(v) BETWEEN 0 AND 4102444800
                        THEN to_timestamp({s}.json_number(v)) END
        $$
        """,
        f"""
        CREATE OR REPLACE FUNCTION {s}.jsonb_set_deep(target jsonb, path text[], new_value jsonb)
        RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
        BEGIN
            IF target IS NULL OR jsonb_typeof(target) <> 'object' THEN
                target := '{{}}'::jsonb;
            END IF;
            IF cardinality(path) <= 1 THEN
                RETURN jsonb_set(target, path, new_value, true);
            END IF;
            RETURN jsonb_set(target, path[1:1],
                             {s}.jsonb_set_deep(target -> path[1], path[2:], new_value), true);
        END $$
        """,
    ]


# One column pair per position parameter: (value, ts) of telemetry's row, NULL when absent.
PARTS = {
    "position": ("whole_latitude", "whole_longitude", "whole_altitude", "whole_speed"),
    "position.latitude": ("latitude",),
    "position.longitude": ("longitude",),
    "position.altitude": ("altitude",),
    "position.speed": ("speed",),
}
PART_TS = {
    "position": "whole_ts",
    "position.latitude": "latitude_ts",
    "position.longitude": "longitude_ts",
    "position.altitude": "altitude_ts",
    "position.speed": "speed_ts",
}


def _value_of(s: str, name: str, column: str) -> str:
    if name == "position":  # the object's field, e.g. whole_latitude <- value -> 'latitude'
        return f"{s}.json_number(value -> '{column.removeprefix('whole_')}')"
    return f"{s}.json_number(value)"


def upsert_parts(s: str, source: str) -> str:
    """Upsert the position parts carried by the telemetry rows of ``source``.

    A part's ts is NULL in EXCLUDED when ``source`` does not carry it, and then the stored part
    stays: two writers of one device (shared-subscription workers) each change only their own
    parts, and ON CONFLICT applies the second on top of what the first committed.
    """
    columns, values, updates = ["device_id"], ["device_id"], []
    for name, parts in PARTS.items():
        ts = PART_TS[name]
        for column in (*parts, ts):
            value = "ts" if column == ts else _value_of(s, name, column)
            columns.append(column)
            values.append(f"max({value}) FILTER (WHERE name = '{name}')")
            updates.append(
                f"{column} = CASE WHEN EXCLUDED.{ts} IS NOT NULL THEN EXCLUDED.{column} "
                f"ELSE p.{column} END"
            )
    return (
        f"INSERT INTO {s}.device_position_parts AS p ({', '.join(columns)}) "
        f"SELECT {', '.join(values)} FROM {source} WHERE name IN {POSITION_NAMES} "
        f"GROUP BY device_id ORDER BY device_id "
        f"ON CONFLICT (device_id) DO UPDATE SET {', '.join(updates)}"
    )


def clear_parts(s: str) -> str:
    """Forget the parts whose telemetry rows a statement deleted (the ``changed`` rows)."""
    sets = []
    for name, parts in PARTS.items():
        gone = f"'{name}' = ANY (gone.names)"
        sets += [f"{c} = CASE WHEN {gone} THEN NULL ELSE p.{c} END" for c in (*parts, PART_TS[name])]
    return (
        f"UPDATE {s}.device_position_parts p SET {', '.join(sets)} "
        f"FROM (SELECT device_id, array_agg(name) AS names FROM changed "
        f"WHERE name IN {POSITION_NAMES} GROUP BY device_id) gone "
        f"WHERE p.device_id = gone.device_id"
    )


def _trigger_function(s: str, name: str, statement: str) -> str:
    return f"""
        CREATE FUNCTION {s}.{name}() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
        BEGIN
            {statement};
            RETURN NULL;
        END $$
    """


def positions(s: str) -> list[str]:
    # SECURITY DEFINER: the triggers write device_position_parts as the schema's owner, so a
    # least-privilege writer role granted before this revision keeps working unchanged.
    return [
        _trigger_function(s, "telemetry_positions_written", upsert_parts(s, "changed")),
        _trigger_function(s, "telemetry_positions_deleted", clear_parts(s)),
        _trigger_function(s, "telemetry_truncated", "TRUNCATE device_position_parts"),
        *(
            f"""
            CREATE TRIGGER telemetry_positions_{event.lower()} AFTER {event} ON {s}.telemetry
            REFERENCING {"OLD" if event == "DELETE" else "NEW"} TABLE AS changed
            FOR EACH STATEMENT EXECUTE FUNCTION {s}.telemetry_positions_{
                "deleted" if event == "DELETE" else "written"}()
            """
            for event in ("INSERT", "UPDATE", "DELETE")
        ),
        f"""
        CREATE TRIGGER telemetry_positions_truncate AFTER TRUNCATE ON {s}.telemetry
        FOR EACH STATEMENT EXECUTE FUNCTION {s}.telemetry_truncated()
        """,
    ]


# Revision 0001's rule, on the stored parts: the whole 'position' object when it has a latitude
# and a longitude and is not older than the newer of position.latitude/longitude. Computed when
# a row is written (stored generated columns), so reading every device is a plain scan.
USE_WHOLE = (
    "(whole_latitude IS NOT NULL AND whole_longitude IS NOT NULL AND "
    "(greatest(latitude_ts, longitude_ts) IS NULL OR latitude IS NULL "
    "OR whole_ts >= greatest(latitude_ts, longitude_ts)))"
)
CHOSEN = {
    "position_latitude": ("whole_latitude", "latitude"),
    "position_longitude": ("whole_longitude", "longitude"),
    "position_altitude": ("coalesce(whole_altitude, altitude)", "altitude"),
    "position_speed": ("coalesce(whole_speed, speed)", "speed"),
    "position_ts": ("whole_ts", "greatest(latitude_ts, longitude_ts)"),
}


def chosen(column: str) -> str:
    whole, parts = CHOSEN[column]
    return f"CASE WHEN {USE_WHOLE} THEN {whole} ELSE {parts} END"


POSITIONS_VIEW = """
    CREATE VIEW device_positions AS
    SELECT device_id, position_latitude AS latitude, position_longitude AS longitude,
           position_altitude AS altitude, position_speed AS speed, position_ts AS ts
    FROM {s}.device_position_parts
    WHERE position_latitude IS NOT NULL AND position_longitude IS NOT NULL
"""


def upgrade() -> None:
    s = '"' + op.get_bind().execute(sa.text("SELECT current_schema()")).scalar_one() + '"'
    for statement in qualified_functions(s):
        op.execute(statement)
    ts = postgresql.TIMESTAMP(timezone=True)
    op.create_table(
        "device_position_parts",
        sa.Column("device_id", sa.BigInteger(), nullable=False),
        *(
            sa.Column(column, ts if column.endswith("_ts") else sa.Double(), nullable=True)
            for name, parts in PARTS.items()
            for column in (*parts, PART_TS[name])
        ),
        *(
            sa.Column(
                column,
                ts if column.endswith("_ts") else sa.Double(),
                sa.Computed(chosen(column), persisted=True),
                nullable=True,
            )
            for column in CHOSEN
        ),
        sa.PrimaryKeyConstraint("device_id"),
        comment="Each device's position parameters, kept by triggers on telemetry "
        "(read them through the device_positions view).",
    )
    for statement in positions(s):
        op.execute(statement)
    op.execute(upsert_parts(s, f"{s}.telemetry"))
    op.execute("DROP VIEW device_positions")
    op.execute(POSITIONS_VIEW.format(s=s))


def downgrade() -> None:
    op.execute("DROP VIEW device_positions")
    op.execute(_revision_0001().VIEWS[1])  # the view computed on read, as it was
    for event in ("insert", "update", "delete", "truncate"):
        op.execute(f"DROP TRIGGER telemetry_positions_{event} ON telemetry")
    for function in (
        "telemetry_truncated()",
        "telemetry_positions_deleted()",
        "telemetry_positions_written()",
    ):
        op.execute(f"DROP FUNCTION {function}")
    op.drop_table("device_position_parts")
    # The schema-qualified bodies of json_epoch and jsonb_set_deep stay: they behave as before.


def _revision_0001() -> ModuleType:
    """Revision 0001's module (its frozen view text), loaded from beside this file."""
    path = Path(__file__).with_name("0001_initial_schema.py")
    spec = importlib.util.spec_from_file_location("flespi_mirror_revision_0001", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
