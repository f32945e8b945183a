"""``calculator_devices.last_active``: the ``active`` user property of a calculator's ``last``.

One revision of flespi's knowledge base documents a user property ``active`` (``true`` or
``false``) on ``flespi/state/gw/calcs/{calc}/devices/{dev}/last``: whether the last interval is
still open. The mirror dropped it; it is now kept beside ``last``, updated with it (NULL when
flespi did not send it).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 14:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "calculator_devices",
        sa.Column(
            "last_active",
            sa.Boolean(),
            comment="the 'active' user property of .../last: the last interval is still open",
        ),
    )


def downgrade() -> None:
    op.drop_column("calculator_devices", "last_active")
