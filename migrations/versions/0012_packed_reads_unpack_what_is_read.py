"""Reading packed hours: unpack only what a query reads, and filter only the window's edges.

``device_messages`` and ``channel_messages`` (views and window functions, 0007) turned each
packed row into messages with one ``ROWS FROM`` over every per-message array: the offsets, the
idents, the server times, the receive times, the accounts and the payloads. A function scan
evaluates all of its functions whatever the query reads, so the most common question, one
parameter of one device over a week (``ts`` and ``payload -> 'name'``), unnested four arrays
nobody read: about a third of its time (bench ``history``). And the window function tested
every message of every hour against the window, though only the first and last hour can hold
messages outside it.

Now the lateral unnests only the offsets (the time) and the payloads; the other per-message
columns are read by their index in the hour's arrays, which PostgreSQL evaluates only when a
query uses the column (its unused view columns become NULL in the plan). A query reading every
column pays for that: each subscript decompresses its (small, compressed in line) array again,
so a whole-row read of a device's week takes about 1.3 times as long as before. The window
function reads the hours wholly inside the window without a per-message test, and tests only
the messages of the hours at its edges. The rows are the same; docs/history.md says why.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 04:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# view -> (recent tier, packed hours, group columns, per-message arrays besides offsets and
# payloads as (view column, packed array))
TIERS = {
    "device_messages": (
        "device_messages_recent",
        "device_message_hours",
        ("device_id",),
        (("server_ts", "server_ts"), ("ident", "idents"), ("received_at", "received_at"),
         ("cid", "cids")),
    ),
    "channel_messages": (
        "channel_messages_recent",
        "channel_message_hours",
        ("channel_id", "ident"),
        (("server_ts", "server_ts"), ("received_at", "received_at"), ("cid", "cids")),
    ),
}  # fmt: skip
# The columns of each view, in order (as 0007 made them).
COLUMNS = {
    "device_messages": ("device_id", "ts", "digest", "server_ts", "ident", "payload",
                        "received_at", "cid"),
    "channel_messages": ("channel_id", "ident", "ts", "digest", "server_ts", "payload",
                         "received_at", "cid"),
}  # fmt: skip
TYPES = {
    "device_id": "bigint", "channel_id": "bigint", "ident": "text", "ts": "timestamptz",
    "digest": "bytea", "server_ts": "timestamptz", "payload": "jsonb",
    "received_at": "timestamptz", "cid": "bigint",
}  # fmt: skip


def _schema() -> str:
    return op.get_bind().execute(sa.text("SELECT current_schema()")).scalar_one()


def _packed_select(s: str, view: str, *, by_index: bool) -> str:
    """The packed branch's select list and FROM: ``by_index`` reads the per-message arrays by
    the message's index (this revision), else from one ``ROWS FROM`` of them all (0007)."""
    _recent, packed, group, arrays = TIERS[view]
    if by_index:
        lateral = "ROWS FROM (unnest(h.ts_offsets), jsonb_array_elements(h.payloads))"
        names = "o, payload, i"
        per_message = {column: f"h.{array}[m.i]" for column, array in arrays}
    else:
        unnests = ", ".join(f"unnest(h.{array})" for _c, array in arrays)
        lateral = f"ROWS FROM (unnest(h.ts_offsets), {unnests}, jsonb_array_elements(h.payloads))"
        names = f"o, {', '.join(c for c, _a in arrays)}, payload, i"
        per_message = {column: f"m.{column}" for column, _array in arrays}
    expressions = {
        **{column: f"h.{column}" for column in group},
        "ts": f'"{s}".hour_ts(h.hour, m.o)',
        "digest": "substring(h.digests FROM m.i::int * 16 - 15 FOR 16)",
        "payload": "m.payload",
        **per_message,
    }
    select = ", ".join(expressions[c] for c in COLUMNS[view])
    return (
        f'SELECT {select} FROM "{s}".{packed} h '
        f"CROSS JOIN LATERAL {lateral} WITH ORDINALITY AS m({names})"
    )


def _define(s: str, view: str, *, by_index: bool) -> None:
    recent = TIERS[view][0]
    recent_select = f'SELECT {", ".join(f"r.{c}" for c in COLUMNS[view])} FROM "{s}".{recent} r'
    packed = _packed_select(s, view, by_index=by_index)
    ts = f'"{s}".hour_ts(h.hour, m.o)'
    op.execute(f'CREATE OR REPLACE VIEW "{s}".{view} AS {recent_select} UNION ALL {packed}')
    whole = "h.hour >= since AND h.hour <= until - interval '1 hour'"
    edges = "h.hour > since - interval '1 hour' AND h.hour < until"
    if by_index:  # the hours inside the window whole; only the edge hours' messages tested
        packed_window = (
            f"{packed} WHERE {whole} UNION ALL "
            f"{packed} WHERE {edges} AND NOT ({whole}) AND {ts} >= since AND {ts} < until"
        )
    else:
        packed_window = (
            f"{packed} WHERE {edges} AND (({whole}) OR ({ts} >= since AND {ts} < until))"
        )
    returns = ", ".join(f"{c} {TYPES[c]}" for c in COLUMNS[view])
    op.execute(
        f"""
        CREATE OR REPLACE FUNCTION "{s}".{view}(since timestamptz,
                                                until timestamptz DEFAULT 'infinity')
        RETURNS TABLE ({returns}) LANGUAGE sql STABLE AS $$
            {recent_select} WHERE r.ts >= since AND r.ts < until
            UNION ALL
            {packed_window}
        $$
        """
    )


def upgrade() -> None:
    s = _schema()
    for view in TIERS:
        _define(s, view, by_index=True)


def downgrade() -> None:
    s = _schema()
    for view in TIERS:
        _define(s, view, by_index=False)
