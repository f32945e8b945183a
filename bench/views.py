"""``--scenario views``: the analyst and dashboard queries, schema-qualified, at fleet scale.

A fresh schema is migrated and filled straight in SQL (no broker: the subject is reading) with
``devices`` devices x 10 telemetry parameters (4 ``position.*`` and 6 others; every other device
also has a ``position`` object), one ``objects`` row per device, and each query is timed from a
session whose search_path does not hold the schema, as a BI tool runs it: median of 7 runs after
one warm-up, client time (query and transfer) and the server's own execution time. The baseline,
in the same run, is revision 0001's ``device_positions`` (computed on read) created beside it.
The write side: telemetry upserts with the position triggers on, against the same with them off.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from typing import Any

from bench.services import services

DEVICES = 100_000
ONE = 77_777
OTHER_PARAMETERS = ("battery.level", "gsm.signal.level", "engine.ignition.status",
                    "can.fuel.level", "din", "external.powersource.voltage")  # fmt: skip

QUERIES = {
    "one device's position": "SELECT * FROM {s}.device_positions WHERE device_id = {one}",
    "all positions": "SELECT * FROM {s}.device_positions",
    "devices online / total": (
        "SELECT count(*) FILTER (WHERE connected), count(*) FROM {s}.devices"
    ),
    "devices silent > 1 h": (
        "SELECT device_id, name, last_active FROM {s}.devices "
        "WHERE last_active < now() - interval '1 hour' ORDER BY last_active"
    ),
    "battery < 20 with names": (
        "SELECT d.name, t.value::numeric, t.ts FROM {s}.telemetry t "
        "JOIN {s}.devices d USING (device_id) WHERE t.name = 'battery.level' "
        "AND jsonb_typeof(t.value) = 'number' AND t.value::numeric < 20"
    ),
    "positions with names": (
        "SELECT d.name, p.latitude, p.longitude FROM {s}.device_positions p "
        "JOIN {s}.devices d USING (device_id)"
    ),
    "baseline: one device's position (0001 view)": (
        "SELECT * FROM {s}.device_positions_0001 WHERE device_id = {one}"
    ),
    "baseline: all positions (0001 view)": "SELECT * FROM {s}.device_positions_0001",
}


def _fill(s: str, devices: int) -> list[str]:
    names = "', '".join(("position.latitude", "position.longitude", "position.altitude",
                         "position.speed", *OTHER_PARAMETERS))  # fmt: skip
    return [
        f"INSERT INTO {s}.telemetry (device_id, name, value, ts, received_at) "
        f"SELECT d, n, to_jsonb(round((random() * 90)::numeric, 5)), "
        f"now() - random() * interval '2 hours', now() "
        f"FROM generate_series(1, {devices}) d, unnest(ARRAY['{names}']) n",
        f"INSERT INTO {s}.telemetry (device_id, name, value, ts, received_at) "
        f"SELECT d, 'position', jsonb_build_object('latitude', 50 + d / 1e6, "
        f"'longitude', 10 + d / 1e6, 'altitude', 120, 'speed', 40), now(), now() "
        f"FROM generate_series(2, {devices}, 2) d",
        f"INSERT INTO {s}.objects (api, origin, id, props, ts, received_at) "
        f"SELECT 'gw', 'devices', d, jsonb_build_object('name', 'device ' || d, "
        f"'connected', d % 3 = 0, 'last_active', extract(epoch FROM now()) - d % 7200, "
        f"'device_type_id', 1, 'cid', 1), now(), now() FROM generate_series(1, {devices}) d",
        f"ANALYZE {s}.telemetry",
        f"ANALYZE {s}.objects",
        f"ANALYZE {s}.device_position_parts",
    ]


async def _time(conn: Any, sql: str, runs: int = 7) -> dict[str, float]:
    await conn.fetch(sql)
    client, server = [], []
    for _ in range(runs):
        started = time.perf_counter()
        await conn.fetch(sql)
        client.append((time.perf_counter() - started) * 1000)
        plan = await conn.fetchval(f"EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) {sql}")
        server.append(float(_json(plan)[0]["Execution Time"]))
    return {"client_ms": statistics.median(client), "server_ms": statistics.median(server)}


def _json(value: Any) -> Any:
    import json

    return json.loads(value) if isinstance(value, str) else value


async def _upserts(conn: Any, s: str, devices: int, batches: int = 20) -> float:
    """Seconds for ``batches`` store-like upserts of 5,000 rows (a fifth of them positions)."""
    started = time.perf_counter()
    for b in range(batches):
        await conn.execute(
            f"INSERT INTO {s}.telemetry AS cur (device_id, name, value, ts, received_at) "
            f"SELECT 1 + (i * 7919 + {b}) % {devices}, "
            f"(ARRAY['position.latitude', 'battery.level', 'din', 'gsm.signal.level', "
            f"'can.fuel.level'])[1 + i % 5], to_jsonb(i), now(), now() "
            f"FROM generate_series(1, 5000) i "
            f"ON CONFLICT (device_id, name) DO UPDATE SET value = EXCLUDED.value, "
            f"ts = EXCLUDED.ts WHERE cur.ts <= EXCLUDED.ts"
        )
    return time.perf_counter() - started


async def _measure(url: str, devices: int) -> dict[str, Any]:
    import asyncpg

    from mirror.store.database import create_engine, migrate

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    engine = create_engine(url, schema)
    await migrate(engine, schema)
    await engine.dispose()
    s = f'"{schema}"'
    conn = await asyncpg.connect(url, server_settings={"search_path": "public"})
    try:
        started = time.perf_counter()
        for statement in _fill(s, devices):
            await conn.execute(statement)
        fill_seconds = time.perf_counter() - started
        rows = await conn.fetchval(f"SELECT count(*) FROM {s}.telemetry")
        await conn.execute(f"SET search_path TO {s}")
        await conn.execute(_baseline_view())
        await conn.execute("SET search_path TO public")
        queries = {
            name: await _time(conn, sql.format(s=s, one=ONE)) for name, sql in QUERIES.items()
        }
        with_triggers = await _upserts(conn, s, devices)
        await conn.execute(f"ALTER TABLE {s}.telemetry DISABLE TRIGGER USER")
        without_triggers = await _upserts(conn, s, devices)
        await conn.execute(f"ALTER TABLE {s}.telemetry ENABLE TRIGGER USER")
    finally:
        await conn.close()
    one = queries["one device's position"]["server_ms"]
    everything = queries["all positions"]["server_ms"]
    return {
        "devices": devices,
        "telemetry_rows": rows,
        "fill_seconds": fill_seconds,
        "queries": queries,
        "upserts_100k_rows_seconds": {"triggers": with_triggers, "no_triggers": without_triggers},
        "write_cost_ratio": with_triggers / without_triggers,
        "one_vs_baseline": queries["baseline: one device's position (0001 view)"]["server_ms"]
        / max(one, 1e-6),
        "all_vs_baseline": queries["baseline: all positions (0001 view)"]["server_ms"]
        / max(everything, 1e-6),
        "targets": {
            "one position <= 1 ms": one <= 1.0,
            "all positions <= 100 ms": everything <= 100,
        },
    }


def _baseline_view() -> str:
    """Revision 0001's device_positions, under another name, for the same-run baseline."""
    import importlib.util

    from mirror.store.database import migrations_dir

    path = migrations_dir() / "versions" / "0001_initial_schema.py"
    spec = importlib.util.spec_from_file_location("bench_revision_0001", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    view: str = module.VIEWS[1]
    return view.replace("CREATE VIEW device_positions", "CREATE VIEW device_positions_0001", 1)


def views(opts: Any) -> dict[str, Any]:
    devices = getattr(opts, "devices", None) or DEVICES
    with services() as svc:
        result = asyncio.run(_measure(svc.database_url, devices))
        result["database"] = svc.note
    return result
