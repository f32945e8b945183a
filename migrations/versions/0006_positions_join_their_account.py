"""``device_positions`` joins each device's account instead of looking it up row by row.

Revision 0002 added ``cid`` to ``device_positions`` as a correlated subquery on ``objects``:
PostgreSQL runs it once per row (100,000 index lookups for all devices), and the plan's
estimated cost crossed ``jit_above_cost``, so every read of all devices also paid ~200 ms of
JIT compilation. Reading all 100,000 positions went from 50 ms (0003) to 367 ms (the issue-11
target is 100 ms). The same column from a LEFT JOIN on the object's primary key is one hash
join for all devices (~80 ms here) and still an index lookup for one device. Same columns,
same rows: the view is replaced in place.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25 22:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEVICE_POSITIONS = """
    CREATE OR REPLACE VIEW device_positions AS
    SELECT p.device_id, p.position_latitude AS latitude, p.position_longitude AS longitude,
           p.position_altitude AS altitude, p.position_speed AS speed, p.position_ts AS ts,
           o.cid  -- the device's account, from its object (primary key: at most one row)
    FROM {s}.device_position_parts p
    LEFT JOIN {s}.objects o ON o.api = 'gw' AND o.origin = 'devices' AND o.id = p.device_id
    WHERE p.position_latitude IS NOT NULL AND p.position_longitude IS NOT NULL
      -- a device deleted after its last position is gone from the map
      AND NOT EXISTS (
          SELECT 1 FROM {s}.objects_tombstones t
          WHERE t.api = 'gw' AND t.origin = 'devices' AND t.id = p.device_id
            AND t.ts >= p.position_ts)
"""


def _schema() -> str:
    return '"' + op.get_bind().execute(sa.text("SELECT current_schema()")).scalar_one() + '"'


def upgrade() -> None:
    op.execute(DEVICE_POSITIONS.replace("{s}", _schema()))


def downgrade() -> None:
    accounts = context.script.get_revision("0002").module
    view = next(v for v in accounts.VIEWS if "VIEW device_positions" in v)
    op.execute("DROP VIEW device_positions")
    op.execute(view.replace("{s}", _schema()))
