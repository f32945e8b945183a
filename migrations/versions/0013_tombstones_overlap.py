"""A deleted interval's tombstone is found however many older tombstones overlap it.

``intervals_tombstones_matching`` (0004) looked for a tombstone that begins before an event
as live intervals are looked for: only the one that begins last before it (live rows of one
calculator and device do not overlap). Tombstones do: a deletion of 100-190 and a later one
of 90-200 both stay. An update of 105-190 at the second deletion's time met the first
tombstone only, so it was refused or not depending on the order the events came in (the
hypothesis test of tests/test_intervals.py found it: an update and a deletion at one time,
the deletion winning only in some orders). Now every tombstone that begins before the event
and ends inside or after its begin is found, through the index on ``end`` (tombstones that end
after the event's begin: the recent ones).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 05:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MATCHING = """
    CREATE OR REPLACE FUNCTION {s}.intervals_tombstones_matching(
        p_calc bigint, p_device bigint, p_key text, p_id bigint, p_begin timestamptz,
        p_end timestamptz)
    RETURNS SETOF {s}.intervals_tombstones LANGUAGE sql STABLE AS $$
        SELECT * FROM {s}.intervals_tombstones x
        WHERE x.calc_id = p_calc AND x.device_id = p_device AND x.interval_key = p_key
        UNION
        SELECT spans.* FROM (
            SELECT * FROM {s}.intervals_tombstones x
            WHERE x.calc_id = p_calc AND x.device_id = p_device AND x."begin" = p_begin
            UNION ALL
            SELECT * FROM {s}.intervals_tombstones x
            WHERE x.calc_id = p_calc AND x.device_id = p_device AND x."end" = p_end
            UNION ALL
            SELECT * FROM {s}.intervals_tombstones x
            WHERE x.calc_id = p_calc AND x.device_id = p_device
              AND x."begin" > p_begin AND x."begin" < p_end
            UNION ALL
            {earlier}
        ) spans
        WHERE p_id IS NULL OR spans.interval_id IS NULL
    $$
"""
EVERY_EARLIER = """
            SELECT * FROM {s}.intervals_tombstones x
            WHERE x.calc_id = p_calc AND x.device_id = p_device AND x."end" > p_begin
              AND x."begin" < p_begin AND p_end IS NOT NULL
"""
LAST_EARLIER = """
            SELECT * FROM (
                SELECT * FROM {s}.intervals_tombstones x
                WHERE x.calc_id = p_calc AND x.device_id = p_device AND x."begin" < p_begin
                ORDER BY x."begin" DESC LIMIT 1
            ) earlier
            WHERE earlier."end" > p_begin AND p_end IS NOT NULL
"""


def _define(earlier: str) -> None:
    s = '"' + op.get_bind().execute(sa.text("SELECT current_schema()")).scalar_one() + '"'
    op.execute(MATCHING.replace("{earlier}", earlier).replace("{s}", s))


def upgrade() -> None:
    _define(EVERY_EARLIER)


def downgrade() -> None:
    _define(LAST_EARLIER)
