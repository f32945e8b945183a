"""The SQL a write plan needs: fixed statement text, and the plan turned into bound arrays.

One multi-row statement per table and operation (``INSERT … SELECT FROM unnest(…)``), with the
newest-wins guard in SQL (``WHERE (cur.ts, cur.value) <= (EXCLUDED.ts, EXCLUDED.value)``: at an
equal time the greater value wins, so ties end the same in any arrival order) and tombstones so
that a deletion is not undone by an older or equally old update. Most statements are generated
from the ``writes`` each family declares in ``families.py``; objects, their properties,
intervals and calculator device state have hand-written ones (registered in ``CUSTOM``).
Statement text is fixed at import: values travel only as bound array parameters, never as SQL
text. Tables are unqualified; the connection's ``search_path`` selects the mirror's schema.
Pure: no connection here (``store.py`` executes).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, TypeAlias

from sqlalchemy import TextClause, text

from mirror.decode.families import (
    FAMILIES,
    AppendWrites,
    Col,
    CustomWrites,
    Kind,
    StateWrites,
)
from mirror.decode.records import ObjectPropertyUpdate, ObjectUpdate, Record
from mirror.store.batch import DeadLetter, WritePlan
from mirror.store.history import DEVICE_MESSAGES, TIER_OF_TABLE, insert_recent
from mirror.store.summaries import insert_with_summaries

Params: TypeAlias = dict[str, list[Any]]
Operation: TypeAlias = tuple[str, str, Params]  # (table, operation, bound arrays)

_TS = Col("ts", Kind.TIME)
_RECEIVED = Col("received_at", Kind.TIME)
_CID = Col("cid", Kind.ID)


# ---------------------------------------------------------------------------------------------
# Generated statements


def _array_type(kind: Kind) -> str:
    return {Kind.JSON: "text", Kind.TIME: "float8"}.get(kind, str(kind))


def _q(name: str) -> str:
    return f'"{name}"'


def _expr(col: Col, alias: str = "u") -> str:
    """The SQL value stored for a column, read from the unnest row ``alias``."""
    ref = f"{alias}.{_q(col.name)}"
    if col.kind == Kind.JSON:
        return f"{ref}::jsonb"
    if col.kind == Kind.TIME:
        return f"to_timestamp({ref})"
    return ref


def _unnest(cols: Sequence[Col], alias: str = "u") -> str:
    args = ", ".join(f"CAST(:{c.name} AS {_array_type(c.kind)}[])" for c in cols)
    return f"unnest({args}) AS {alias}({', '.join(_q(c.name) for c in cols)})"


def _names(cols: Sequence[Col]) -> str:
    return ", ".join(_q(c.name) for c in cols)


def _key_match(keys: Sequence[Col], left: str, right: str) -> str:
    return " AND ".join(f"{left}.{_q(c.name)} = {right}.{_q(c.name)}" for c in keys)


def state_upsert(table: str, w: StateWrites) -> TextClause:
    """Newest wins; at an equal time (to the microsecond) the greatest value (jsonb order) of
    the first of ``values``, in the batch (``DISTINCT ON``) as against the stored row; a
    deletion of that same time wins over both (``tb.ts >=``)."""
    cols = (*w.keys, *w.values, _TS, _RECEIVED)
    updates = ", ".join(f"{_q(c.name)} = EXCLUDED.{_q(c.name)}" for c in cols[len(w.keys) :])
    keys = ", ".join(f"u.{_q(c.name)}" for c in w.keys)
    tie = _q(w.values[0].name)
    return text(
        f"""
        INSERT INTO {table} AS cur ({_names(cols)})
        SELECT DISTINCT ON ({keys}) {", ".join(_expr(c) for c in cols)}
        FROM {_unnest(cols)}
        WHERE NOT EXISTS (
            SELECT 1 FROM {table}_tombstones tb
            WHERE {_key_match(w.keys, "tb", "u")} AND tb.ts >= to_timestamp(u.ts))
        ORDER BY {keys}, to_timestamp(u.ts) DESC, {_expr(w.values[0])} DESC
        ON CONFLICT ({_names(w.keys)}) DO UPDATE SET {updates}
        WHERE (cur.ts, cur.{tie}) <= (EXCLUDED.ts, EXCLUDED.{tie})
        """
    )


def state_delete(table: str, w: StateWrites) -> TextClause:
    return text(
        f"""
        WITH gone AS (
            SELECT * FROM {_unnest((*w.keys, _TS))}
        ), marked AS (
            INSERT INTO {table}_tombstones AS tb ({_names(w.keys)}, ts)
            SELECT {_names(w.keys)}, to_timestamp(ts) FROM gone
            ON CONFLICT ({_names(w.keys)}) DO UPDATE SET ts = EXCLUDED.ts
            WHERE tb.ts < EXCLUDED.ts
        )
        DELETE FROM {table} cur USING gone
        WHERE {_key_match(w.keys, "cur", "gone")} AND cur.ts <= to_timestamp(gone.ts)
        """
    )


def append(table: str, w: AppendWrites) -> TextClause:
    """Each record once (``ON CONFLICT DO NOTHING`` on its identity). A table kept in two tiers
    (history.py) gets its rows in the recent tier, late ones only when not packed already."""
    select = f"SELECT {', '.join(f'{_expr(c)} AS {_q(c.name)}' for c in w.columns)} "
    select += f"FROM {_unnest(w.columns)}"
    tier = TIER_OF_TABLE.get(table)
    if tier is DEVICE_MESSAGES:  # with the summaries of what it inserts; yields that count
        insert = insert_recent(tier, [c.name for c in w.columns], select)
        return text(insert_with_summaries(insert, [c.name for c in w.columns]))
    if tier is not None:
        return text(insert_recent(tier, [c.name for c in w.columns], select))
    return text(f"INSERT INTO {table} ({_names(w.columns)}) {select} ON CONFLICT DO NOTHING")


# ---------------------------------------------------------------------------------------------
# Plan → parameters


def _columns(rows: Sequence[Any], cols: Sequence[Col]) -> Params:
    """One list per column (asyncpg binds each as an array), transposed in C."""
    if not rows:
        return {c.name: [] for c in cols}
    if len(cols) == 1:
        return {cols[0].name: [getattr(r, cols[0].source) for r in rows]}
    values = zip(*map(attrgetter(*(c.source for c in cols)), rows), strict=True)
    return {c.name: list(v) for c, v in zip(cols, values, strict=True)}


def _state_ops(table: str, w: StateWrites, rows: Sequence[Record]) -> list[Operation]:
    """Deletions (``present`` None: keys and ts), then upserts."""
    deletions = [r for r in rows if getattr(r, w.present) is None]
    updates = [r for r in rows if getattr(r, w.present) is not None]
    ops: list[Operation] = []
    if deletions:
        ops.append((table, "delete", _columns(deletions, (*w.keys, _TS))))
    if updates:
        ops.append((table, "upsert", _columns(updates, (*w.keys, *w.values, _TS, _RECEIVED))))
    return ops


# ---------------------------------------------------------------------------------------------
# Objects and their properties: hand-written statements


_OBJECT_KEYS = (Col("api", Kind.TEXT), Col("origin", Kind.TEXT), Col("id", Kind.ID, "object_id"))
_PATH = Col("path", Kind.TEXT)  # a JSON array of the levels, unpacked into text[] in SQL


class _PathRow:
    """An object property record seen with its path as JSON text, for the bound arrays."""

    __slots__ = ("path", "record")

    def __init__(self, record: ObjectPropertyUpdate) -> None:
        self.record = record
        self.path = json.dumps(list(record.path))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.record, name)


def _object_key(r: ObjectUpdate | ObjectPropertyUpdate) -> tuple[str, str, int]:
    return (r.api, r.origin, r.object_id)


def _objects_ops(plan: WritePlan) -> list[Operation]:
    w = StateWrites(_OBJECT_KEYS, (Col("props", Kind.JSON), _CID), "props")
    return _state_ops("objects", w, plan.rows("objects"))


def _object_properties_ops(plan: WritePlan) -> list[Operation]:
    """Property writes, then props brought up to date: rebuilt for objects whose whole payload
    changed, patched path by path for the others (cost independent of the object's size)."""
    props = [_PathRow(r) for r in plan.rows("object_properties")]  # type: ignore[arg-type]
    w = StateWrites((*_OBJECT_KEYS, _PATH), (Col("value", Kind.JSON), _CID), "value")
    ops = _state_ops("object_properties", w, props)  # type: ignore[arg-type]
    whole = sorted({_object_key(r) for r in plan.rows("objects")})  # type: ignore[arg-type]
    if whole:
        keys = {"api": [k[0] for k in whole], "origin": [k[1] for k in whole]}
        ops.append(("objects", "merge_whole", {**keys, "id": [k[2] for k in whole]}))
    rebuilt = set(whole)
    patched = sorted(
        {(*_object_key(r.record), r.path) for r in props if _object_key(r.record) not in rebuilt}
    )
    if patched:
        names = ("api", "origin", "id", "path")
        ops.append(("objects", "merge", {n: [k[i] for k in patched] for i, n in enumerate(names)}))
    return ops


# ---------------------------------------------------------------------------------------------
# Calculator device state: one row per (calc, device), each field guarded by its own time


CALCULATOR_FIELDS = ("last", "active", "synced")
_CALCULATOR_COLUMNS = (
    Col("calc_id", Kind.ID),
    Col("device_id", Kind.ID),
    Col("field", Kind.TEXT),
    Col("value", Kind.TEXT),
    _CID,
    _TS,
    _RECEIVED,
    Col("last_active", Kind.BOOL),
)


def _field_is_newer(f: str) -> str:
    """The incoming field wins: newer, or as new and (a clearing, or the greater value)."""
    return (
        f"EXCLUDED.{f}_ts IS NOT NULL AND (cur.{f}_ts IS NULL OR cur.{f}_ts < EXCLUDED.{f}_ts"
        f" OR (cur.{f}_ts = EXCLUDED.{f}_ts AND (EXCLUDED.{f} IS NULL"
        f" OR (cur.{f} IS NOT NULL AND cur.{f} <= EXCLUDED.{f}))))"
    )


def _calculator_upsert() -> TextClause:
    pivot = ",\n".join(
        f"(array_agg(value) FILTER (WHERE field = '{f}'))[1] AS {f}, "
        f"max(ts) FILTER (WHERE field = '{f}') AS {f}_ts"
        for f in CALCULATOR_FIELDS
    )
    sets = ",\n".join(
        f"{f} = CASE WHEN {_field_is_newer(f)} THEN EXCLUDED.{f} ELSE cur.{f} END, "
        f"{f}_ts = CASE WHEN {_field_is_newer(f)} THEN EXCLUDED.{f}_ts ELSE cur.{f}_ts END"
        for f in CALCULATOR_FIELDS
    )
    columns = ", ".join(f"{f}, {f}_ts" for f in CALCULATOR_FIELDS)
    return text(
        f"""
        WITH w AS (
            SELECT DISTINCT ON (u.calc_id, u.device_id, u.field)
                   u.calc_id, u.device_id, u.field, u.value::jsonb AS value, u.cid,
                   u.last_active,
                   to_timestamp(u.ts) AS ts, to_timestamp(u.received_at) AS received_at
            FROM {_unnest(_CALCULATOR_COLUMNS)}
            ORDER BY u.calc_id, u.device_id, u.field, to_timestamp(u.ts) DESC,
                     u.value IS NULL DESC, u.value::jsonb DESC
        )
        INSERT INTO calculator_devices AS cur (calc_id, device_id, cid, {columns}, last_active,
                                               ts, received_at)
        SELECT calc_id, device_id, max(cid), {pivot},
               (array_agg(last_active) FILTER (WHERE field = 'last'))[1], max(ts),
               max(received_at)
        FROM w GROUP BY calc_id, device_id
        ON CONFLICT (calc_id, device_id) DO UPDATE SET {sets},
            last_active = CASE WHEN {_field_is_newer("last")} THEN EXCLUDED.last_active
                               ELSE cur.last_active END,
            ts = greatest(cur.ts, EXCLUDED.ts),
            received_at = greatest(cur.received_at, EXCLUDED.received_at),
            cid = coalesce(EXCLUDED.cid, cur.cid)
        """
    )


def _calculator_ops(plan: WritePlan) -> list[Operation]:
    rows = plan.rows("calculator_devices")
    if not rows:
        return []
    return [("calculator_devices", "upsert", _columns(rows, _CALCULATOR_COLUMNS))]


# ---------------------------------------------------------------------------------------------
# Intervals: by flespi's id, else by time span (intervals_apply, migration 0004)


_INTERVAL_COLUMNS = (
    Col("calc_id", Kind.ID),
    Col("device_id", Kind.ID),
    Col("key", Kind.TEXT, "interval_key"),
    Col("id", Kind.ID, "interval_id"),
    Col("begin", Kind.NUMBER),
    Col("end", Kind.NUMBER),
    Col("duration", Kind.NUMBER),
    Col("event", Kind.TEXT),
    Col("data", Kind.TEXT),
    _CID,
    Col("ts", Kind.NUMBER),
    Col("received_at", Kind.NUMBER),
)
_INTERVALS_APPLY = text(
    "SELECT * FROM intervals_apply("
    + ", ".join(f"CAST(:{c.name} AS {_array_type(c.kind)}[])" for c in _INTERVAL_COLUMNS)
    + ")"
)


def _interval_ops(plan: WritePlan) -> list[Operation]:
    """Deletions, then updates, as for every state table; each a call of intervals_apply,
    which returns a row per interval deleted or written."""
    rows = plan.rows("intervals")
    deletions = [r for r in rows if r.data is None]  # type: ignore[union-attr]
    updates = [r for r in rows if r.data is not None]  # type: ignore[union-attr]
    return [
        ("intervals", op, _columns(part, _INTERVAL_COLUMNS))
        for op, part in (("delete", deletions), ("upsert", updates))
        if part
    ]


@dataclass(frozen=True)
class Custom:
    statements: dict[str, TextClause]
    operations: Callable[[WritePlan], list[Operation]]


# Whole objects. A deletion drops the object's property rows of that age or older too; an
# object that has newer parts keeps them and only loses its older whole-object payload. A
# deleted device takes its telemetry and settings of that age or older with it (flespi drops
# a deleted device's state); its messages, intervals and plugin configurations stay.
_OBJECTS_DELETE = text(
    """
    WITH gone AS (
        SELECT * FROM unnest(CAST(:api AS text[]), CAST(:origin AS text[]),
                             CAST(:id AS bigint[]), CAST(:ts AS float8[]))
               AS u(api, origin, id, ts)
    ), marked AS (
        INSERT INTO objects_tombstones AS tb (api, origin, id, ts)
        SELECT api, origin, id, to_timestamp(ts) FROM gone
        ON CONFLICT (api, origin, id) DO UPDATE SET ts = EXCLUDED.ts
        WHERE tb.ts < EXCLUDED.ts
    ), props_gone AS (
        DELETE FROM object_properties p USING gone
        WHERE p.api = gone.api AND p.origin = gone.origin AND p.id = gone.id
          AND p.ts <= to_timestamp(gone.ts)
    ), device_telemetry_gone AS (
        DELETE FROM telemetry t USING gone
        WHERE gone.api = 'gw' AND gone.origin = 'devices' AND t.device_id = gone.id
          AND t.ts <= to_timestamp(gone.ts)
    ), device_settings_gone AS (
        DELETE FROM device_settings t USING gone
        WHERE gone.api = 'gw' AND gone.origin = 'devices' AND t.device_id = gone.id
          AND t.ts <= to_timestamp(gone.ts)
    ), base_gone AS (
        UPDATE objects o SET base = NULL, base_ts = NULL FROM gone
        WHERE o.api = gone.api AND o.origin = gone.origin AND o.id = gone.id
          AND o.ts > to_timestamp(gone.ts) AND o.base_ts <= to_timestamp(gone.ts)
    )
    DELETE FROM objects o USING gone
    WHERE o.api = gone.api AND o.origin = gone.origin AND o.id = gone.id
      AND o.ts <= to_timestamp(gone.ts)
    """
)


_OBJECTS_UPSERT = text(
    """
    INSERT INTO objects AS o (api, origin, id, props, base, base_ts, ts, received_at, cid)
    SELECT DISTINCT ON (u.api, u.origin, u.id)
           u.api, u.origin, u.id, u.props::jsonb, u.props::jsonb, to_timestamp(u.ts),
           to_timestamp(u.ts), to_timestamp(u.received_at), u.cid
    FROM unnest(CAST(:api AS text[]), CAST(:origin AS text[]), CAST(:id AS bigint[]),
                CAST(:props AS text[]), CAST(:cid AS bigint[]), CAST(:ts AS float8[]),
                CAST(:received_at AS float8[])) AS u(api, origin, id, props, cid, ts, received_at)
    WHERE NOT EXISTS (
        SELECT 1 FROM objects_tombstones tb
        WHERE tb.api = u.api AND tb.origin = u.origin AND tb.id = u.id
          AND tb.ts >= to_timestamp(u.ts))
    ORDER BY u.api, u.origin, u.id, to_timestamp(u.ts) DESC, u.props::jsonb DESC
    ON CONFLICT (api, origin, id) DO UPDATE
    SET base = EXCLUDED.base, base_ts = EXCLUDED.base_ts, ts = greatest(o.ts, EXCLUDED.ts),
        received_at = EXCLUDED.received_at, cid = coalesce(EXCLUDED.cid, o.cid)
    WHERE o.base_ts IS NULL OR (o.base_ts, o.base) <= (EXCLUDED.base_ts, EXCLUDED.base)
    """
)


_OBJECT_PROPERTIES_DELETE = text(
    """
    WITH gone AS (
        SELECT u.api, u.origin, u.id,
               ARRAY(SELECT jsonb_array_elements_text(u.path::jsonb)) AS path, u.ts
        FROM unnest(CAST(:api AS text[]), CAST(:origin AS text[]), CAST(:id AS bigint[]),
                    CAST(:path AS text[]), CAST(:ts AS float8[]))
             AS u(api, origin, id, path, ts)
    ), marked AS (
        INSERT INTO object_properties_tombstones AS tb (api, origin, id, path, ts)
        SELECT api, origin, id, path, to_timestamp(ts) FROM gone
        ON CONFLICT (api, origin, id, path) DO UPDATE SET ts = EXCLUDED.ts
        WHERE tb.ts < EXCLUDED.ts
    )
    DELETE FROM object_properties p USING gone
    WHERE p.api = gone.api AND p.origin = gone.origin AND p.id = gone.id
      AND p.path = gone.path AND p.ts <= to_timestamp(gone.ts)
    """
)


_OBJECT_PROPERTIES_UPSERT = text(
    """
    WITH u AS (
        SELECT x.api, x.origin, x.id,
               ARRAY(SELECT jsonb_array_elements_text(x.path::jsonb)) AS path,
               x.value, x.cid, x.ts, x.received_at
        FROM unnest(CAST(:api AS text[]), CAST(:origin AS text[]), CAST(:id AS bigint[]),
                    CAST(:path AS text[]), CAST(:value AS text[]), CAST(:cid AS bigint[]),
                    CAST(:ts AS float8[]), CAST(:received_at AS float8[]))
             AS x(api, origin, id, path, value, cid, ts, received_at)
    ), live AS (
        SELECT DISTINCT ON (u.api, u.origin, u.id, u.path) u.* FROM u
        WHERE NOT EXISTS (
            SELECT 1 FROM objects_tombstones tb
            WHERE tb.api = u.api AND tb.origin = u.origin AND tb.id = u.id
              AND tb.ts >= to_timestamp(u.ts))
          AND NOT EXISTS (
            SELECT 1 FROM object_properties_tombstones tb
            WHERE tb.api = u.api AND tb.origin = u.origin AND tb.id = u.id
              AND tb.path = u.path AND tb.ts >= to_timestamp(u.ts))
        ORDER BY u.api, u.origin, u.id, u.path, to_timestamp(u.ts) DESC, u.value::jsonb DESC
    ), parents AS (
        INSERT INTO objects (api, origin, id, props, ts, received_at, cid)
        SELECT DISTINCT ON (api, origin, id) api, origin, id, '{}'::jsonb, to_timestamp(ts),
               to_timestamp(received_at), cid
        FROM live ORDER BY api, origin, id
        ON CONFLICT (api, origin, id) DO NOTHING
    )
    INSERT INTO object_properties AS p (api, origin, id, path, value, ts, received_at, cid)
    SELECT api, origin, id, path, value::jsonb, to_timestamp(ts), to_timestamp(received_at), cid
    FROM live
    ON CONFLICT (api, origin, id, path) DO UPDATE
    SET value = EXCLUDED.value, ts = EXCLUDED.ts, received_at = EXCLUDED.received_at,
        cid = EXCLUDED.cid
    WHERE (p.ts, p.value) <= (EXCLUDED.ts, EXCLUDED.value)
    """
)


# Rebuild props of objects whose whole payload changed: the payload, without the properties
# deleted after it, with each property merged in that is newer than it (or that it does not
# carry). Reads all of the object's properties: paid once per whole-object update.
_OBJECTS_MERGE_WHOLE = text(
    """
    WITH k AS (
        SELECT * FROM unnest(CAST(:api AS text[]), CAST(:origin AS text[]),
                             CAST(:id AS bigint[])) AS k(api, origin, id)
    ), emptied AS (
        DELETE FROM objects o USING k
        WHERE o.api = k.api AND o.origin = k.origin AND o.id = k.id AND o.base IS NULL
          AND NOT EXISTS (SELECT 1 FROM object_properties p
                          WHERE p.api = o.api AND p.origin = o.origin AND p.id = o.id)
    )
    UPDATE objects o
    SET props = object_props(o.api, o.origin, o.id, o.base, o.base_ts),
        ts = coalesce(greatest(o.base_ts,
                               (SELECT max(p.ts) FROM object_properties p
                                WHERE p.api = o.api AND p.origin = o.origin AND p.id = o.id)),
                      o.ts)
    FROM k WHERE o.api = k.api AND o.origin = k.origin AND o.id = k.id
    """
)


# Patch props with the changed paths only: each path's current row (after this transaction's
# writes) is set, or its removal applied, when it is newer than the whole payload or the
# payload does not carry it. Index lookups per changed path: the same cost for an object with
# 10 or 10,000 properties. A level that removals leave empty goes too unless the payload
# carries it (what the rebuild gives: migration 0005). An object known only through
# properties, whose last property is gone, is dropped.
_OBJECTS_MERGE = text(
    """
    WITH k AS (
        SELECT DISTINCT u.api, u.origin, u.id,
               ARRAY(SELECT jsonb_array_elements_text(u.path::jsonb)) AS path
        FROM unnest(CAST(:api AS text[]), CAST(:origin AS text[]), CAST(:id AS bigint[]),
                    CAST(:path AS text[])) AS u(api, origin, id, path)
    ), c AS (
        SELECT o.api, o.origin, o.id,
               jsonb_agg(jsonb_build_array(to_jsonb(k.path), p.path IS NOT NULL, p.value)
                         ORDER BY cardinality(k.path), k.path)
                   FILTER (WHERE o.base IS NULL OR o.base_ts IS NULL
                                 OR coalesce(p.ts, tb.ts) > o.base_ts
                                 OR NOT (o.base ? k.path[1])) AS changes,
               max(p.ts) AS newest,
               max(p.cid) AS cid,
               o.base IS NULL AND bool_and(p.path IS NULL) AS maybe_empty
        FROM k
        JOIN objects o ON o.api = k.api AND o.origin = k.origin AND o.id = k.id
        LEFT JOIN object_properties p
               ON p.api = k.api AND p.origin = k.origin AND p.id = k.id AND p.path = k.path
        LEFT JOIN object_properties_tombstones tb
               ON tb.api = k.api AND tb.origin = k.origin AND tb.id = k.id AND tb.path = k.path
        GROUP BY o.api, o.origin, o.id
    ), emptied AS (
        DELETE FROM objects o USING c
        WHERE o.api = c.api AND o.origin = c.origin AND o.id = c.id AND c.maybe_empty
          AND NOT EXISTS (SELECT 1 FROM object_properties p
                          WHERE p.api = o.api AND p.origin = o.origin AND p.id = o.id)
        RETURNING o.api, o.origin, o.id
    )
    UPDATE objects o
    SET props = object_patch(o.props, c.changes, o.base),
        ts = greatest(o.ts, c.newest),
        cid = coalesce(c.cid, o.cid)
    FROM c
    WHERE o.api = c.api AND o.origin = c.origin AND o.id = c.id
      AND NOT EXISTS (SELECT 1 FROM emptied e
                      WHERE e.api = o.api AND e.origin = o.origin AND e.id = o.id)
    """
)


CUSTOM: dict[str, Custom] = {
    "intervals": Custom(
        {"intervals.delete": _INTERVALS_APPLY, "intervals.upsert": _INTERVALS_APPLY},
        _interval_ops,
    ),
    "calculator_devices": Custom(
        {"calculator_devices.upsert": _calculator_upsert()}, _calculator_ops
    ),
    "objects": Custom(
        {"objects.delete": _OBJECTS_DELETE, "objects.upsert": _OBJECTS_UPSERT},
        _objects_ops,
    ),
    "object_properties": Custom(
        {
            "object_properties.delete": _OBJECT_PROPERTIES_DELETE,
            "object_properties.upsert": _OBJECT_PROPERTIES_UPSERT,
            "objects.merge_whole": _OBJECTS_MERGE_WHOLE,
            "objects.merge": _OBJECTS_MERGE,
        },
        _object_properties_ops,
    ),
}


def _family_statements() -> dict[str, TextClause]:
    statements: dict[str, TextClause] = {}
    for spec in FAMILIES:
        w = spec.writes
        if isinstance(w, StateWrites):
            statements[f"{spec.table}.upsert"] = state_upsert(spec.table, w)
            statements[f"{spec.table}.delete"] = state_delete(spec.table, w)
        elif isinstance(w, AppendWrites):
            statements[f"{spec.table}.append"] = append(spec.table, w)
        else:
            statements.update(CUSTOM[w.name].statements)
    return statements


STATEMENTS: dict[str, TextClause] = {
    **_family_statements(),
    "dead_letters.append": text(
        """
        INSERT INTO dead_letters (topic, payload, payload_size, properties, reason, detail,
                                  received_at, cid)
        SELECT u.topic, u.payload, u.payload_size, u.properties::jsonb, u.reason, u.detail,
               to_timestamp(u.received_at), u.cid
        FROM unnest(CAST(:topic AS text[]), CAST(:payload AS bytea[]),
                    CAST(:payload_size AS int[]), CAST(:properties AS text[]),
                    CAST(:reason AS text[]), CAST(:detail AS text[]),
                    CAST(:received_at AS float8[]), CAST(:cid AS bigint[]))
             AS u(topic, payload, payload_size, properties, reason, detail, received_at, cid)
        """
    ),
}


def plan_operations(plan: WritePlan) -> list[Operation]:
    """The statements a plan needs, in the fixed order of ``FAMILIES`` (so writers lock alike)."""
    ops: list[Operation] = []
    for spec in FAMILIES:
        w = spec.writes
        if isinstance(w, CustomWrites):
            ops += CUSTOM[w.name].operations(plan)
            continue
        rows = plan.rows(spec.table)
        if not rows:
            continue
        if isinstance(w, StateWrites):
            ops += _state_ops(spec.table, w, rows)
        else:
            ops.append((spec.table, "append", _columns(rows, w.columns)))
    return ops


def _no_nul(value: str) -> str:
    return value.replace("\x00", "\ufffd")


def dead_letter_params(letters: Sequence[DeadLetter], max_payload_bytes: int) -> Params:
    """Dead letters keep their payload whole, up to ``--max-payload-bytes`` (a payload over the
    limit is refused for its size and kept cut to the limit), so a replay has all of it."""
    getters: dict[str, Callable[[DeadLetter], Any]] = {
        "topic": lambda d: _no_nul(d.message.topic),
        "payload": lambda d: d.message.payload[:max_payload_bytes],
        "payload_size": lambda d: len(d.message.payload),
        "properties": lambda d: json.dumps(
            {_no_nul(k): _no_nul(v) for k, v in d.message.properties.items()}
        ).replace("\\u0000", "\\ufffd"),
        "reason": lambda d: str(d.rejection.reason),
        "detail": lambda d: _no_nul(d.rejection.detail),
        "received_at": lambda d: d.message.received_at,
        "cid": lambda d: d.rejection.cid,
    }
    return {name: [get(d) for d in letters] for name, get in getters.items()}
