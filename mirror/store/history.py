"""Device and channel messages in two tiers, declared once: recent rows and packed hours.

A message lands in a ``*_recent`` table, one row per message (what ``device_messages`` was).
Rows take about 1,400 bytes there, most of it the jsonb payload, which TOAST does not compress
below 2 kB. Once an hour is older than ``--compact-after``, the maintainer (compaction.py) moves
its rows into a ``*_hours`` table: one row per device (channel and ident) and UTC hour, each
per-message column an array in (ts, digest) order, the payloads one JSON array that PostgreSQL
compresses with lz4 as one value. An hour of one device's messages then shares one copy of
everything its messages repeat (keys, ident, ids), about a tenth of the size (bench ``history``).

The views ``device_messages`` and ``channel_messages`` (migration 0007) union the tiers, so
readers see one table with the columns it always had; ``device_messages(since, until)`` is the
same rows limited to a time window, with the window applied to both tiers' indexes.

Idempotence across the tiers: a message for an hour already packed (a redelivery, a backfill)
is checked against the packed row before it is inserted into the recent tier, and compaction
merges any such late row into its hour again. Two things keep that exact under concurrency:

- The **horizon** (``sync_state`` row ``history:horizon``) is the start of the oldest hour the
  maintainer may not pack. Every writer reads it ``FOR SHARE`` at the start of its transaction;
  the maintainer moves it with an ``UPDATE``, which waits for the writers in flight. So a writer
  knows which of its rows are late (``ts`` before the horizon), and no hour at or after the
  horizon is packed while it writes.
- Writers of late rows take a shared advisory lock per day bucket of those rows before their
  insert; a compaction step takes its hour's bucket exclusively. The writer's insert therefore
  sees either the packed row committed, or the recent rows not yet moved: never neither.

Pure: SQL text and small helpers; ``store.py`` and ``compaction.py`` run it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import TextClause, text

HORIZON = "history:horizon"  # the sync_state row holding the horizon
LOCK_BUCKETS = 64  # day buckets of the late-row locks (a bounded number of locks per batch)
HOUR = 3600.0
DAY = 86400.0
OFFSET_BIAS = 1_800_000_000  # ts_offsets hold microseconds after the hour minus this: an int4


@dataclass(frozen=True)
class Tier:
    """A message history kept in two tiers.

    ``group`` is what one packed row is about besides its hour; ``columns`` are the per-message
    columns besides the identity (ts, digest) and the payload, each stored as an array named
    ``packed`` (a name, or the column's); ``track`` adds the typed position arrays.
    """

    name: str  # the view (and the family's table in families.py)
    recent: str
    hours: str
    group: tuple[str, ...]
    columns: tuple[tuple[str, str], ...]  # (column in recent, array in hours)
    track: bool


_COMMON = (("server_ts", "server_ts"), ("received_at", "received_at"), ("cid", "cids"))
DEVICE_MESSAGES = Tier(
    "device_messages",
    "device_messages_recent",
    "device_message_hours",
    ("device_id",),
    (("ident", "idents"), *_COMMON),
    track=True,
)
CHANNEL_MESSAGES = Tier(
    "channel_messages",
    "channel_messages_recent",
    "channel_message_hours",
    ("channel_id", "ident"),
    _COMMON,
    track=False,
)
TIERS = (DEVICE_MESSAGES, CHANNEL_MESSAGES)
TIER_OF_TABLE = {tier.name: tier for tier in TIERS}

# The typed position of a message, read from its payload (flespi's dotted parameters): the
# column, its SQL type, and the expression over the payload ``p`` (guarded, so no value can
# make the statement fail: anything but a number in range, or a boolean, is NULL).
TRACK: tuple[tuple[str, str, str], ...] = (
    ("latitude", "double precision", "json_number(p -> 'position.latitude')"),
    ("longitude", "double precision", "json_number(p -> 'position.longitude')"),
    ("altitude", "real", "json_real(p -> 'position.altitude')"),
    ("speed", "real", "json_real(p -> 'position.speed')"),
    ("direction", "real", "json_real(p -> 'position.direction')"),
    ("satellites", "smallint", "json_smallint(p -> 'position.satellites')"),
    ("valid", "boolean", "json_bool(p -> 'position.valid')"),
)


def track_expression(column: str, payload: str) -> str:
    """The SQL reading one typed track column from the payload expression ``payload``."""
    expression = next(sql for name, _type, sql in TRACK if name == column)
    return expression.replace("p ->", f"{payload} ->")


# ---------------------------------------------------------------------------------------------
# Writers: the horizon, the late rows' locks, and the insert into the recent tier


READ_HORIZON = text(
    "SELECT extract(epoch FROM (value ->> 'horizon')::timestamptz) FROM sync_state "
    f"WHERE name = '{HORIZON}' FOR SHARE"
)
ENSURE_HORIZON = text(
    "INSERT INTO sync_state (name, value, updated_at) "
    f"VALUES ('{HORIZON}', '{{\"horizon\": \"-infinity\"}}', now()) ON CONFLICT (name) DO NOTHING"
)
LOCK_LATE_BUCKETS = text(
    "SELECT count(*) FROM (SELECT pg_advisory_xact_lock_shared(hashtext('flespi-mirror:history:'"
    " || current_schema()), b) FROM unnest(CAST(:buckets AS int[])) AS b) AS locked"
)
LOCK_BUCKET = text(
    "SELECT pg_advisory_xact_lock(hashtext('flespi-mirror:history:' || current_schema()), :b)"
)


def lock_bucket(ts: float) -> int:
    """The advisory lock bucket of the UTC day holding the Unix time ``ts``."""
    return math.floor(ts / DAY) % LOCK_BUCKETS


def late_buckets(times: Iterable[float], horizon: float) -> list[int]:
    """The sorted lock buckets of the times before the horizon (rows that may be packed)."""
    return sorted({lock_bucket(ts) for ts in times if ts < horizon})


def hour_start(ts: float) -> float:
    return math.floor(ts / HOUR) * HOUR


def _key_match(group: Sequence[str], left: str, right: str) -> str:
    return " AND ".join(f"{left}.{c} = {right}.{c}" for c in group)


def stored_in_hours(tier: Tier, row: str, ts: str, digest: str) -> str:
    """SQL: whether the message (``row``'s group columns, ``ts``, ``digest``) is in its packed
    hour. An index lookup of the hour's row, then a search of its offsets."""
    return (
        f"EXISTS (SELECT 1 FROM {tier.hours} h WHERE {_key_match(tier.group, 'h', row)} "
        f"AND h.hour = hour_of({ts}) "
        f"AND hour_holds(h.ts_offsets, h.digests, ts_offset({ts}, h.hour), {digest}))"
    )


def insert_recent(tier: Tier, columns: Sequence[str], select: str) -> str:
    """``INSERT`` of the rows ``select`` yields (named ``columns``) into the recent tier: each
    once, and a late one only when its packed hour does not hold it already. ``:horizon`` is the
    Unix time the writer read (late rows are before it)."""
    names = ", ".join(columns)
    return f"""
        INSERT INTO {tier.recent} ({names})
        SELECT {names} FROM ({select}) AS n
        WHERE n.ts >= to_timestamp(CAST(:horizon AS float8))
           OR NOT {stored_in_hours(tier, "n", "n.ts", "n.digest")}
        ON CONFLICT DO NOTHING
    """


# ---------------------------------------------------------------------------------------------
# Reading packed hours back as rows


def _per_message(tier: Tier) -> list[tuple[str, str]]:
    """(column of the recent tier, array of the packed tier) of every per-message column but
    the identity (ts, digest) and the payload: the tier's own, then the typed position."""
    return [*tier.columns, *((name, name) for name, _t, _sql in (TRACK if tier.track else ()))]


def unpacked(tier: Tier, alias: str = "h", *, payload: bool = True) -> str:
    """``FROM`` items yielding one row per message of the packed rows ``alias``: the lateral
    ``m`` with ``o`` (the ts offset), each per-message column (and ``payload``), and ``i``."""
    arrays = [f"unnest({alias}.ts_offsets)"]
    names = ["o"]
    for column, packed in _per_message(tier):
        arrays.append(f"unnest({alias}.{packed})")
        names.append(column)
    if payload:
        arrays.append(f"jsonb_array_elements({alias}.payloads)")
        names.append("payload")
    return (
        f"CROSS JOIN LATERAL ROWS FROM ({', '.join(arrays)}) WITH ORDINALITY "
        f"AS m({', '.join(names)}, i)"
    )


def unpacked_columns(tier: Tier, alias: str = "h") -> list[str]:
    """Select-list items of the rows of :func:`unpacked`, as the recent table names them."""
    return [
        *(f"{alias}.{c}" for c in tier.group),
        f"hour_ts({alias}.hour, m.o) AS ts",
        f"substring({alias}.digests FROM m.i::int * 16 - 15 FOR 16) AS digest",
        *(f"m.{c}" for c, _ in _per_message(tier)),
        "m.payload",
    ]


# ---------------------------------------------------------------------------------------------
# Compaction: one step packs up to :limit recent rows of one hour


def _aggregates(tier: Tier) -> list[tuple[str, str]]:
    """(packed column, aggregate over the ordered messages ``x``) of a packed row. A typed
    position the recent row lacks (stored before the writer read it) is read from its payload.
    """
    order = "ORDER BY x.ts, x.digest"
    aggregates = [
        ("messages", "count(*)"),
        ("first_ts", "min(x.ts)"),
        ("last_ts", "max(x.ts)"),
        ("ts_offsets", f"array_agg(ts_offset(x.ts, CAST(:hour AS timestamptz)) {order})"),
        ("digests", f"string_agg(x.digest, ''::bytea {order})"),
        *((packed, f"array_agg(x.{column} {order})") for column, packed in tier.columns),
    ]
    if tier.track:
        typed = {name: f"coalesce(x.{name}, {track_expression(name, 'x.payload')})"
                 for name, _type, _sql in TRACK}  # fmt: skip
        aggregates += [(name, f"array_agg({sql} {order})") for name, sql in typed.items()]
        lon, lat = typed["longitude"], typed["latitude"]
        aggregates.append(
            ("bbox", f"box(point(min({lon}), min({lat})), point(max({lon}), max({lat})))")
        )
    aggregates.append(("payloads", f"jsonb_agg(x.payload {order})"))
    return aggregates


def compaction_step(tier: Tier) -> TextClause:
    """Move up to ``:limit`` rows of the hour starting at ``:hour`` (the first in the order of
    the recent table's key) into their packed rows, merged with what those rows already hold
    (a late message packed again), each message once. Returns the number of rows moved.

    Rows come in key order, so a step ends inside at most one group; the next step merges the
    rest of that group into the row this one wrote."""
    group = ", ".join(tier.group)
    recent_columns = [*tier.group, "ts", "digest", *(c for c, _ in _per_message(tier)), "payload"]
    names = ", ".join(recent_columns)
    aggregates = _aggregates(tier)
    packed_names = ", ".join(name for name, _ in aggregates)
    updates = ", ".join(f"{name} = EXCLUDED.{name}" for name, _ in aggregates)
    return text(
        f"""
        WITH picked AS (
            SELECT {group}, ts, digest FROM {tier.recent}
            WHERE ts >= CAST(:hour AS timestamptz)
              AND ts < CAST(:hour AS timestamptz) + interval '1 hour'
            ORDER BY {group}, ts, digest
            LIMIT :limit
        ), moved AS (
            DELETE FROM {tier.recent} r USING picked p
            WHERE {_key_match((*tier.group, "ts", "digest"), "r", "p")}
            RETURNING {", ".join(f"r.{c}" for c in recent_columns)}
        ), kept AS (
            SELECT {", ".join(unpacked_columns(tier))}
            FROM {tier.hours} h {unpacked(tier)}
            WHERE h.hour = CAST(:hour AS timestamptz)
              AND ({group}) IN (SELECT DISTINCT {group} FROM moved)
        ), merged AS (
            SELECT DISTINCT ON ({group}, ts, digest) {names}
            FROM (SELECT {names} FROM moved UNION ALL SELECT {names} FROM kept) AS a
            ORDER BY {group}, ts, digest
        ), packed AS (
            INSERT INTO {tier.hours} AS c ({group}, hour, {packed_names})
            SELECT {", ".join(f"x.{c}" for c in tier.group)}, CAST(:hour AS timestamptz),
                   {", ".join(sql for _, sql in aggregates)}
            FROM merged x
            GROUP BY {", ".join(f"x.{c}" for c in tier.group)}
            ON CONFLICT ({group}, hour) DO UPDATE SET {updates}
        )
        SELECT count(*) FROM moved
        """
    )


def oldest_recent_before(tier: Tier) -> TextClause:
    """The oldest ``ts`` of the recent tier before ``:horizon`` (an index lookup), or NULL."""
    return text(
        f"SELECT extract(epoch FROM min(ts)) FROM {tier.recent} "
        "WHERE ts < to_timestamp(CAST(:horizon AS float8))"
    )


def existing_times(tier: Tier) -> TextClause:
    """Which of ``:ts`` (Unix times) a device already has a message at, in either tier (the
    backfill's rule: flespi's storage keys a device's messages by timestamp)."""
    assert tier.group == ("device_id",)
    return text(
        f"""
        SELECT u.i FROM unnest(CAST(:ts AS float8[])) WITH ORDINALITY AS u(ts, i)
        WHERE EXISTS (SELECT 1 FROM {tier.recent} d
                      WHERE d.device_id = :device_id AND d.ts = to_timestamp(u.ts))
           OR EXISTS (SELECT 1 FROM {tier.hours} h
                      WHERE h.device_id = :device_id AND h.hour = hour_of(to_timestamp(u.ts))
                        AND ts_offset(to_timestamp(u.ts), h.hour) = ANY (h.ts_offsets))
        """
    )
