"""The SQL a write plan needs: fixed statement text, and the plan turned into bound arrays.

One multi-row statement per table and operation (``INSERT … SELECT FROM unnest(…)``), with the
newest-wins guard in SQL (``WHERE cur.ts <= EXCLUDED.ts``) and tombstones so that a deletion is
not undone by an older update. Statement text is fixed at import: values travel only as bound
array parameters, never as SQL text. Tables are unqualified; the connection's ``search_path``
selects the mirror's schema. Pure: no connection here (``store.py`` executes).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import TextClause, text

from mirror.batch import DeadLetter, WritePlan
from mirror.records import ObjectPropertyUpdate, ObjectUpdate

DEAD_LETTER_PAYLOAD_BYTES = 64 * 1024


# ---------------------------------------------------------------------------------------------
# Statements


@dataclass(frozen=True)
class _KeyedState:
    """A state table keyed by a few scalar columns with one jsonb value column."""

    table: str
    keys: tuple[tuple[str, str], ...]  # (column, PostgreSQL array element type)
    value: str

    def _unnest(self, extra: Sequence[tuple[str, str]]) -> str:
        cols = [*self.keys, *extra]
        args = ", ".join(f"CAST(:{c} AS {t}[])" for c, t in cols)
        names = ", ".join(c for c, _ in cols)
        return f"unnest({args}) AS u({names})"

    def _key_match(self, left: str, right: str) -> str:
        return " AND ".join(f"{left}.{c} = {right}.{c}" for c, _ in self.keys)

    @property
    def key_list(self) -> str:
        return ", ".join(c for c, _ in self.keys)

    def upsert(self) -> TextClause:
        u_keys = ", ".join(f"u.{c}" for c, _ in self.keys)
        return text(
            f"""
            INSERT INTO {self.table} AS cur ({self.key_list}, {self.value}, ts, received_at)
            SELECT {u_keys}, u.v::jsonb, to_timestamp(u.ts), to_timestamp(u.received_at)
            FROM {self._unnest([("v", "text"), ("ts", "float8"), ("received_at", "float8")])}
            WHERE NOT EXISTS (
                SELECT 1 FROM {self.table}_tombstones tb
                WHERE {self._key_match("tb", "u")} AND tb.ts > to_timestamp(u.ts))
            ON CONFLICT ({self.key_list}) DO UPDATE
            SET {self.value} = EXCLUDED.{self.value}, ts = EXCLUDED.ts,
                received_at = EXCLUDED.received_at
            WHERE cur.ts <= EXCLUDED.ts
            """
        )

    def delete(self) -> TextClause:
        return text(
            f"""
            WITH gone AS (
                SELECT * FROM {self._unnest([("ts", "float8")])}
            ), marked AS (
                INSERT INTO {self.table}_tombstones AS tb ({self.key_list}, ts)
                SELECT {self.key_list}, to_timestamp(ts) FROM gone
                ON CONFLICT ({self.key_list}) DO UPDATE SET ts = EXCLUDED.ts
                WHERE tb.ts < EXCLUDED.ts
            )
            DELETE FROM {self.table} cur USING gone
            WHERE {self._key_match("cur", "gone")} AND cur.ts <= to_timestamp(gone.ts)
            """
        )


TELEMETRY = _KeyedState("telemetry", (("device_id", "bigint"), ("name", "text")), "value")
SETTINGS = _KeyedState("device_settings", (("device_id", "bigint"), ("name", "text")), "value")
PLUGIN_CONFIGS = _KeyedState(
    "plugin_device_configs", (("plugin_id", "bigint"), ("device_id", "bigint")), "config"
)
INTERVAL_KEYS = _KeyedState(
    "intervals",
    (("calc_id", "bigint"), ("device_id", "bigint"), ("interval_key", "text")),
    "data",
)

STATEMENTS: dict[str, TextClause] = {
    "telemetry.upsert": TELEMETRY.upsert(),
    "telemetry.delete": TELEMETRY.delete(),
    "device_settings.upsert": SETTINGS.upsert(),
    "device_settings.delete": SETTINGS.delete(),
    "plugin_device_configs.upsert": PLUGIN_CONFIGS.upsert(),
    "plugin_device_configs.delete": PLUGIN_CONFIGS.delete(),
    "intervals.delete": INTERVAL_KEYS.delete(),
    "intervals.upsert": text(
        """
        INSERT INTO intervals AS cur (calc_id, device_id, interval_key, interval_id, begin, "end",
                                      duration, event, data, ts, received_at)
        SELECT u.calc_id, u.device_id, u.interval_key, u.interval_id, to_timestamp(u.begin),
               to_timestamp(u.end_ts), u.duration, u.event, u.data::jsonb, to_timestamp(u.ts),
               to_timestamp(u.received_at)
        FROM unnest(CAST(:calc_id AS bigint[]), CAST(:device_id AS bigint[]),
                    CAST(:interval_key AS text[]), CAST(:interval_id AS bigint[]),
                    CAST(:begin AS float8[]), CAST(:end_ts AS float8[]),
                    CAST(:duration AS float8[]), CAST(:event AS text[]), CAST(:data AS text[]),
                    CAST(:ts AS float8[]), CAST(:received_at AS float8[]))
             AS u(calc_id, device_id, interval_key, interval_id, begin, end_ts, duration, event,
                  data, ts, received_at)
        WHERE NOT EXISTS (
            SELECT 1 FROM intervals_tombstones tb
            WHERE tb.calc_id = u.calc_id AND tb.device_id = u.device_id
              AND tb.interval_key = u.interval_key AND tb.ts > to_timestamp(u.ts))
        ON CONFLICT (calc_id, device_id, interval_key) DO UPDATE
        SET interval_id = EXCLUDED.interval_id, begin = EXCLUDED.begin, "end" = EXCLUDED."end",
            duration = EXCLUDED.duration, event = EXCLUDED.event, data = EXCLUDED.data,
            ts = EXCLUDED.ts, received_at = EXCLUDED.received_at
        WHERE cur.ts <= EXCLUDED.ts
        """
    ),
    # Whole objects. A deletion drops the object's property rows of that age or older too; an
    # object that has newer parts keeps them and only loses its older whole-object payload.
    "objects.delete": text(
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
        ), base_gone AS (
            UPDATE objects o SET base = NULL, base_ts = NULL FROM gone
            WHERE o.api = gone.api AND o.origin = gone.origin AND o.id = gone.id
              AND o.ts > to_timestamp(gone.ts) AND o.base_ts <= to_timestamp(gone.ts)
        )
        DELETE FROM objects o USING gone
        WHERE o.api = gone.api AND o.origin = gone.origin AND o.id = gone.id
          AND o.ts <= to_timestamp(gone.ts)
        """
    ),
    "objects.upsert": text(
        """
        INSERT INTO objects AS o (api, origin, id, props, base, base_ts, ts, received_at)
        SELECT u.api, u.origin, u.id, u.props::jsonb, u.props::jsonb, to_timestamp(u.ts),
               to_timestamp(u.ts), to_timestamp(u.received_at)
        FROM unnest(CAST(:api AS text[]), CAST(:origin AS text[]), CAST(:id AS bigint[]),
                    CAST(:props AS text[]), CAST(:ts AS float8[]),
                    CAST(:received_at AS float8[])) AS u(api, origin, id, props, ts, received_at)
        WHERE NOT EXISTS (
            SELECT 1 FROM objects_tombstones tb
            WHERE tb.api = u.api AND tb.origin = u.origin AND tb.id = u.id
              AND tb.ts > to_timestamp(u.ts))
        ON CONFLICT (api, origin, id) DO UPDATE
        SET base = EXCLUDED.base, base_ts = EXCLUDED.base_ts, ts = greatest(o.ts, EXCLUDED.ts),
            received_at = EXCLUDED.received_at
        WHERE o.base_ts IS NULL OR o.base_ts <= EXCLUDED.base_ts
        """
    ),
    "object_properties.delete": text(
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
    ),
    "object_properties.upsert": text(
        """
        WITH u AS (
            SELECT x.api, x.origin, x.id,
                   ARRAY(SELECT jsonb_array_elements_text(x.path::jsonb)) AS path,
                   x.value, x.ts, x.received_at
            FROM unnest(CAST(:api AS text[]), CAST(:origin AS text[]), CAST(:id AS bigint[]),
                        CAST(:path AS text[]), CAST(:value AS text[]), CAST(:ts AS float8[]),
                        CAST(:received_at AS float8[]))
                 AS x(api, origin, id, path, value, ts, received_at)
        ), live AS (
            SELECT u.* FROM u
            WHERE NOT EXISTS (
                SELECT 1 FROM objects_tombstones tb
                WHERE tb.api = u.api AND tb.origin = u.origin AND tb.id = u.id
                  AND tb.ts > to_timestamp(u.ts))
              AND NOT EXISTS (
                SELECT 1 FROM object_properties_tombstones tb
                WHERE tb.api = u.api AND tb.origin = u.origin AND tb.id = u.id
                  AND tb.path = u.path AND tb.ts > to_timestamp(u.ts))
        ), parents AS (
            INSERT INTO objects (api, origin, id, props, ts, received_at)
            SELECT DISTINCT ON (api, origin, id) api, origin, id, '{}'::jsonb, to_timestamp(ts),
                   to_timestamp(received_at)
            FROM live ORDER BY api, origin, id
            ON CONFLICT (api, origin, id) DO NOTHING
        )
        INSERT INTO object_properties AS p (api, origin, id, path, value, ts, received_at)
        SELECT api, origin, id, path, value::jsonb, to_timestamp(ts), to_timestamp(received_at)
        FROM live
        ON CONFLICT (api, origin, id, path) DO UPDATE
        SET value = EXCLUDED.value, ts = EXCLUDED.ts, received_at = EXCLUDED.received_at
        WHERE p.ts <= EXCLUDED.ts
        """
    ),
    # Rebuild props of the objects a plan touched: the whole object, with each property merged
    # in that is newer than it (or that the whole object does not carry). An object known only
    # through properties, whose last property is gone, is dropped.
    "objects.merge": text(
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
    ),
    "device_messages.append": text(
        """
        INSERT INTO device_messages (device_id, ts, digest, server_ts, ident, payload, received_at)
        SELECT u.device_id, to_timestamp(u.ts), u.digest, to_timestamp(u.server_ts), u.ident,
               u.payload::jsonb, to_timestamp(u.received_at)
        FROM unnest(CAST(:device_id AS bigint[]), CAST(:ts AS float8[]),
                    CAST(:digest AS bytea[]), CAST(:server_ts AS float8[]),
                    CAST(:ident AS text[]), CAST(:payload AS text[]),
                    CAST(:received_at AS float8[]))
             AS u(device_id, ts, digest, server_ts, ident, payload, received_at)
        ON CONFLICT DO NOTHING
        """
    ),
    "channel_messages.append": text(
        """
        INSERT INTO channel_messages (channel_id, ident, ts, digest, server_ts, payload,
                                      received_at)
        SELECT u.channel_id, u.ident, to_timestamp(u.ts), u.digest, to_timestamp(u.server_ts),
               u.payload::jsonb, to_timestamp(u.received_at)
        FROM unnest(CAST(:channel_id AS bigint[]), CAST(:ident AS text[]),
                    CAST(:ts AS float8[]), CAST(:digest AS bytea[]),
                    CAST(:server_ts AS float8[]), CAST(:payload AS text[]),
                    CAST(:received_at AS float8[]))
             AS u(channel_id, ident, ts, digest, server_ts, payload, received_at)
        ON CONFLICT DO NOTHING
        """
    ),
    "modem_messages.append": text(
        """
        INSERT INTO modem_messages (modem_id, phone, ts, digest, payload, received_at)
        SELECT u.modem_id, u.phone, to_timestamp(u.ts), u.digest, u.payload::jsonb,
               to_timestamp(u.received_at)
        FROM unnest(CAST(:modem_id AS bigint[]), CAST(:phone AS text[]), CAST(:ts AS float8[]),
                    CAST(:digest AS bytea[]), CAST(:payload AS text[]),
                    CAST(:received_at AS float8[]))
             AS u(modem_id, phone, ts, digest, payload, received_at)
        ON CONFLICT DO NOTHING
        """
    ),
    "dead_letters.append": text(
        """
        INSERT INTO dead_letters (topic, payload, payload_size, properties, reason, detail,
                                  received_at)
        SELECT u.topic, u.payload, u.payload_size, u.properties::jsonb, u.reason, u.detail,
               to_timestamp(u.received_at)
        FROM unnest(CAST(:topic AS text[]), CAST(:payload AS bytea[]),
                    CAST(:payload_size AS int[]), CAST(:properties AS text[]),
                    CAST(:reason AS text[]), CAST(:detail AS text[]),
                    CAST(:received_at AS float8[]))
             AS u(topic, payload, payload_size, properties, reason, detail, received_at)
        """
    ),
}


# ---------------------------------------------------------------------------------------------
# Plan → parameters


def _columns(rows: Sequence[Any], **getters: Any) -> dict[str, list[Any]]:
    return {name: [get(r) for r in rows] for name, get in getters.items()}


def _no_nul(value: str) -> str:
    return value.replace("\x00", "\ufffd")


def dead_letter_params(letters: Sequence[DeadLetter]) -> dict[str, list[Any]]:
    return _columns(
        letters,
        topic=lambda d: _no_nul(d.message.topic),
        payload=lambda d: d.message.payload[:DEAD_LETTER_PAYLOAD_BYTES],
        payload_size=lambda d: len(d.message.payload),
        properties=lambda d: json.dumps(
            {_no_nul(k): _no_nul(v) for k, v in d.message.properties.items()}
        ).replace("\\u0000", "\\ufffd"),
        reason=lambda d: str(d.rejection.reason),
        detail=lambda d: _no_nul(d.rejection.detail),
        received_at=lambda d: d.message.received_at,
    )


def _split(rows: Sequence[Any], field_name: str) -> tuple[list[Any], list[Any]]:
    """(updates, deletions): a record whose value field is None is a deletion."""
    updates = [r for r in rows if getattr(r, field_name) is not None]
    deletions = [r for r in rows if getattr(r, field_name) is None]
    return updates, deletions


def _state_ops(
    table: str,
    rows: Sequence[Any],
    field_name: str,
    keys: dict[str, Any],
    values: dict[str, Any],
) -> list[tuple[str, str, dict[str, list[Any]]]]:
    """Deletions (``field_name`` None: keys and ts), then upserts (keys, ``values``, ts and
    received_at) of one state table."""
    updates, deletions = _split(rows, field_name)
    ops = []
    if deletions:
        ops.append((table, "delete", _columns(deletions, **keys, ts=_ts)))
    if updates:
        params = _columns(updates, **keys, **values, ts=_ts, received_at=_received_at)
        ops.append((table, "upsert", params))
    return ops


def _ts(r: Any) -> float:
    return float(r.ts)


def _received_at(r: Any) -> float:
    return float(r.received_at)


def _object_key(r: ObjectUpdate | ObjectPropertyUpdate) -> tuple[str, str, int]:
    return (r.api, r.origin, r.object_id)


def plan_operations(plan: WritePlan) -> list[tuple[str, str, dict[str, list[Any]]]]:
    """The statements a plan needs, in a fixed table order (so writers lock alike)."""
    device_name = {"device_id": lambda r: r.device_id, "name": lambda r: r.name}
    obj_keys = {"api": lambda r: r.api, "origin": lambda r: r.origin, "id": lambda r: r.object_id}
    ops: list[tuple[str, str, dict[str, list[Any]]]] = []
    ops += _state_ops("telemetry", plan.telemetry, "value", device_name, {"v": lambda r: r.value})
    ops += _state_ops(
        "device_settings", plan.settings, "value", device_name, {"v": lambda r: r.value}
    )
    ops += _state_ops(
        "plugin_device_configs",
        plan.plugin_configs,
        "config",
        {"plugin_id": lambda r: r.plugin_id, "device_id": lambda r: r.device_id},
        {"v": lambda r: r.config},
    )
    ops += _state_ops("objects", plan.objects, "props", obj_keys, {"props": lambda r: r.props})
    ops += _state_ops(
        "object_properties",
        plan.object_properties,
        "value",
        {**obj_keys, "path": lambda r: json.dumps(list(r.path))},
        {"value": lambda r: r.value},
    )
    touched = sorted(
        {_object_key(r) for r in plan.objects} | {_object_key(r) for r in plan.object_properties}
    )
    if touched:
        ops.append(
            (
                "objects",
                "merge",
                {
                    "api": [k[0] for k in touched],
                    "origin": [k[1] for k in touched],
                    "id": [k[2] for k in touched],
                },
            )
        )
    ops += _state_ops(
        "intervals",
        plan.intervals,
        "data",
        {
            "calc_id": lambda r: r.calc_id,
            "device_id": lambda r: r.device_id,
            "interval_key": lambda r: r.interval_key,
        },
        {
            "interval_id": lambda r: r.interval_id,
            "begin": lambda r: r.begin,
            "end_ts": lambda r: r.end,
            "duration": lambda r: r.duration,
            "event": lambda r: r.event,
            "data": lambda r: r.data,
        },
    )
    if plan.device_messages:
        ops.append(
            (
                "device_messages",
                "append",
                _columns(
                    plan.device_messages,
                    device_id=lambda r: r.device_id,
                    ts=_ts,
                    digest=lambda r: r.digest,
                    server_ts=lambda r: r.server_ts,
                    ident=lambda r: r.ident,
                    payload=lambda r: r.payload,
                    received_at=_received_at,
                ),
            )
        )
    if plan.channel_messages:
        ops.append(
            (
                "channel_messages",
                "append",
                _columns(
                    plan.channel_messages,
                    channel_id=lambda r: r.channel_id,
                    ident=lambda r: r.ident,
                    ts=_ts,
                    digest=lambda r: r.digest,
                    server_ts=lambda r: r.server_ts,
                    payload=lambda r: r.payload,
                    received_at=_received_at,
                ),
            )
        )
    if plan.modem_messages:
        ops.append(
            (
                "modem_messages",
                "append",
                _columns(
                    plan.modem_messages,
                    modem_id=lambda r: r.modem_id,
                    phone=lambda r: r.phone,
                    ts=_ts,
                    digest=lambda r: r.digest,
                    payload=lambda r: r.payload,
                    received_at=_received_at,
                ),
            )
        )
    return ops
