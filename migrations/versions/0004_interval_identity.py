"""Intervals keep one row when flespi sends no id: identity by time span, not by a changing key.

An interval without ``id`` was keyed by its ``begin``; an update that moved ``begin`` made a
second row and orphaned the first, and a ``deleted`` event naming neither ``id`` nor ``begin``
could not say which row went. Intervals are now written by ``intervals_apply`` (one call per
batch, events in time order per calculator and device): an event with an ``id`` is the row of
that id; where either side has no id, the event is the stored interval whose time span it
shares. A calculator splits a device's messages into intervals that do not overlap, so two
intervals of one calculator and device are the same one when they share their begin, their
end, or any stretch of time (touching at one instant is not enough: with
``merge_message_after`` a boundary message can end one interval and begin the next). A stored
row keeps the key it was created with, whatever its begin becomes.

Tombstones record the span (and id) of what they deleted, so an older update of a deleted
interval is refused even when its begin has moved. Indexes on (calc_id, device_id, begin) and
(…, end) make a lookup cost the same whatever number of intervals a device has: the spans an
event can share are found by equality, by a range of begins inside the event, and by the one
interval that begins before it.

Adds columns, indexes and functions only: rows of a 0002 database stay as they are.

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-25 21:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = postgresql.TIMESTAMP(timezone=True)
SPAN_INDEXES = (("begin", "span_begin"), ("end", "span_end"))
OLD_KEY_COMMENT = "'id:<flespi id>' or 'begin:<begin>'"
KEY_COMMENT = "'id:<flespi id>', else 'begin:<begin>' of the interval as first seen"

# The stored rows (of intervals or of intervals_tombstones) an interval event is about: the
# row of its key; and, where the event or the row has no flespi id, the rows whose span it
# shares (same begin, same end, a begin inside the event, or the interval just before it that
# reaches into it). Each branch is an index range bounded by the rows it finds.
MATCHING = """
    CREATE FUNCTION {s}.{table}_matching(p_calc bigint, p_device bigint, p_key text,
                                         p_id bigint, p_begin timestamptz,
                                         p_end timestamptz)
    RETURNS SETOF {s}.{table} LANGUAGE sql STABLE AS $$
        SELECT * FROM {s}.{table} x
        WHERE x.calc_id = p_calc AND x.device_id = p_device AND x.interval_key = p_key
        UNION
        SELECT spans.* FROM (
            SELECT * FROM {s}.{table} x
            WHERE x.calc_id = p_calc AND x.device_id = p_device AND x."begin" = p_begin
            UNION ALL
            SELECT * FROM {s}.{table} x
            WHERE x.calc_id = p_calc AND x.device_id = p_device AND x."end" = p_end
            UNION ALL
            SELECT * FROM {s}.{table} x
            WHERE x.calc_id = p_calc AND x.device_id = p_device
              AND x."begin" > p_begin AND x."begin" < p_end
            UNION ALL
            SELECT * FROM (
                SELECT * FROM {s}.{table} x
                WHERE x.calc_id = p_calc AND x.device_id = p_device AND x."begin" < p_begin
                ORDER BY x."begin" DESC LIMIT 1
            ) earlier
            WHERE earlier."end" > p_begin AND p_end IS NOT NULL
        ) spans
        WHERE p_id IS NULL OR spans.interval_id IS NULL
    $$
"""

# Apply a batch's interval events of one kind (all updates, or all deletions; store.py runs
# the deletions first, as for every state table): per calculator and device in time order, at
# one time the greater payload last. A deletion removes every matching row not newer than it
# and leaves tombstones; an update is refused by a matching tombstone as new or newer and by
# a matching row that is newer (at one time, greater), else it becomes the first matching row
# (the row of its key, else one with a flespi id, else the earliest) and the other matching
# rows without an id, now known to be the same interval, are merged into it. Returns a row per
# interval deleted or written.
APPLY = """
    CREATE FUNCTION {s}.intervals_apply(
        p_calc_id bigint[], p_device_id bigint[], p_key text[], p_id bigint[],
        p_begin float8[], p_end float8[], p_duration float8[], p_event text[], p_data text[],
        p_cid bigint[], p_ts float8[], p_received_at float8[])
    RETURNS SETOF integer LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
    DECLARE
        ev record;
        locked text := NULL;
        targets {s}.intervals[];
        primary_row {s}.intervals;
        gone {s}.intervals;
    BEGIN
        FOR ev IN
            SELECT u.calc_id, u.device_id, u.key, u.id, to_timestamp(u.b) AS b,
                   to_timestamp(u.e) AS e, u.duration, u.event, u.data::jsonb AS data, u.cid,
                   to_timestamp(u.ts) AS ts, to_timestamp(u.received_at) AS received_at
            FROM unnest(p_calc_id, p_device_id, p_key, p_id, p_begin, p_end, p_duration,
                        p_event, p_data, p_cid, p_ts, p_received_at)
                 AS u(calc_id, device_id, key, id, b, e, duration, event, data, cid, ts,
                      received_at)
            ORDER BY u.calc_id, u.device_id, to_timestamp(u.ts), u.data::jsonb
        LOOP
            -- Writers of one calculator and device take turns (shared-subscription workers
            -- would otherwise both insert an interval neither has seen); the loop's order
            -- is the lock order, so they cannot deadlock.
            IF locked IS DISTINCT FROM ev.calc_id || ':' || ev.device_id THEN
                locked := ev.calc_id || ':' || ev.device_id;
                PERFORM pg_advisory_xact_lock(hashtextextended('intervals:' || locked, 0));
            END IF;
            targets := ARRAY(
                SELECT m FROM {s}.intervals_matching(ev.calc_id, ev.device_id, ev.key, ev.id,
                                                     ev.b, ev.e) m
                ORDER BY m.interval_key = ev.key DESC, m.interval_id IS NULL, m."begin",
                         m.interval_key);
            IF ev.data IS NULL THEN
                FOREACH gone IN ARRAY targets LOOP
                    CONTINUE WHEN gone.ts > ev.ts;
                    DELETE FROM {s}.intervals i
                    WHERE i.calc_id = gone.calc_id AND i.device_id = gone.device_id
                      AND i.interval_key = gone.interval_key;
                    INSERT INTO {s}.intervals_tombstones AS tb
                        (calc_id, device_id, interval_key, interval_id, "begin", "end", ts)
                    VALUES (gone.calc_id, gone.device_id, gone.interval_key, gone.interval_id,
                            gone."begin", gone."end", ev.ts)
                    ON CONFLICT (calc_id, device_id, interval_key) DO UPDATE
                    SET ts = EXCLUDED.ts, interval_id = EXCLUDED.interval_id,
                        "begin" = EXCLUDED."begin", "end" = EXCLUDED."end"
                    WHERE tb.ts < EXCLUDED.ts;
                    RETURN NEXT 1;
                END LOOP;
                INSERT INTO {s}.intervals_tombstones AS tb
                    (calc_id, device_id, interval_key, interval_id, "begin", "end", ts)
                VALUES (ev.calc_id, ev.device_id, ev.key, ev.id, ev.b, ev.e, ev.ts)
                ON CONFLICT (calc_id, device_id, interval_key) DO UPDATE
                SET ts = EXCLUDED.ts WHERE tb.ts < EXCLUDED.ts;
                CONTINUE;
            END IF;
            CONTINUE WHEN EXISTS (
                SELECT 1 FROM {s}.intervals_tombstones_matching(ev.calc_id, ev.device_id,
                                                                ev.key, ev.id, ev.b, ev.e) tb
                WHERE tb.ts >= ev.ts);
            CONTINUE WHEN EXISTS (
                SELECT 1 FROM unnest(targets) t WHERE (t.ts, t.data) > (ev.ts, ev.data));
            IF cardinality(targets) = 0 THEN
                INSERT INTO {s}.intervals AS cur
                    (calc_id, device_id, interval_key, interval_id, "begin", "end", duration,
                     event, data, cid, ts, received_at)
                VALUES (ev.calc_id, ev.device_id, ev.key, ev.id, ev.b, ev.e, ev.duration,
                        ev.event, ev.data, ev.cid, ev.ts, ev.received_at)
                ON CONFLICT (calc_id, device_id, interval_key) DO NOTHING;
                IF FOUND THEN
                    RETURN NEXT 1;
                END IF;
                CONTINUE;
            END IF;
            primary_row := targets[1];
            -- Merged: the other matching rows without an id (two intervals with flespi ids
            -- are two intervals, whatever an event without one says).
            DELETE FROM {s}.intervals i
            USING unnest(targets[2:]) AS merged
            WHERE i.calc_id = merged.calc_id AND i.device_id = merged.device_id
              AND i.interval_key = merged.interval_key AND merged.interval_id IS NULL;
            UPDATE {s}.intervals i
            SET interval_key = CASE WHEN ev.id IS NULL THEN i.interval_key ELSE ev.key END,
                interval_id = coalesce(ev.id, i.interval_id), "begin" = ev.b, "end" = ev.e,
                duration = ev.duration, event = ev.event, data = ev.data,
                cid = coalesce(ev.cid, i.cid), ts = ev.ts, received_at = ev.received_at
            WHERE i.calc_id = primary_row.calc_id AND i.device_id = primary_row.device_id
              AND i.interval_key = primary_row.interval_key;
            RETURN NEXT 1;
        END LOOP;
    END $$
"""

DROPPED_FUNCTIONS = (
    "intervals_apply(bigint[], bigint[], text[], bigint[], float8[], float8[], float8[], "
    "text[], text[], bigint[], float8[], float8[])",
    "intervals_matching(bigint, bigint, text, bigint, timestamptz, timestamptz)",
    "intervals_tombstones_matching(bigint, bigint, text, bigint, timestamptz, timestamptz)",
)


def _key_comment(comment: str, existing: str) -> None:
    op.alter_column(
        "intervals",
        "interval_key",
        existing_type=sa.Text(),
        existing_nullable=False,
        comment=comment,
        existing_comment=existing,
    )


def upgrade() -> None:
    _key_comment(KEY_COMMENT, OLD_KEY_COMMENT)
    op.add_column(
        "intervals_tombstones",
        sa.Column("interval_id", sa.BigInteger(), nullable=True, comment="flespi's id, if any"),
    )
    op.add_column(
        "intervals_tombstones",
        sa.Column("begin", TS, nullable=True, comment="begin of the deleted interval"),
    )
    op.add_column(
        "intervals_tombstones",
        sa.Column("end", TS, nullable=True, comment="end of the deleted interval"),
    )
    for table in ("intervals", "intervals_tombstones"):
        for column, suffix in SPAN_INDEXES:
            op.create_index(
                f"{table}_{suffix}_idx", table, ["calc_id", "device_id", column], unique=False
            )
    s = '"' + op.get_bind().execute(sa.text("SELECT current_schema()")).scalar_one() + '"'
    for table in ("intervals", "intervals_tombstones"):
        op.execute(MATCHING.replace("{s}", s).replace("{table}", table))
    op.execute(APPLY.replace("{s}", s))


def downgrade() -> None:
    for function in DROPPED_FUNCTIONS:
        op.execute(f"DROP FUNCTION {function}")
    for table in ("intervals", "intervals_tombstones"):
        for _, suffix in SPAN_INDEXES:
            op.drop_index(f"{table}_{suffix}_idx", table_name=table)
    for column in ("end", "begin", "interval_id"):
        op.drop_column("intervals_tombstones", column)
    _key_comment(OLD_KEY_COMMENT, KEY_COMMENT)
