"""Backfill rate: history fetched over REST-over-MQTT and written through the live path.

``python -m bench --scenario backfill``. A simulated flespi (``mirror.sim.rest_responder`` in
its own process, ``python -m bench.backfill --serve``) holds ``--messages`` device messages
across 100 devices; the benchmark process then measures, in the same run:

- fetch only: every device's messages paged over REST (1,000 a page, 4 devices at once) and
  thrown away: the transport's limit;
- backfill: the same through ``mirror.repair.backfill`` into an empty schema (existence check,
  decode, coalesce, insert, progress saved per page), rows verified;
- backfill again: a new job over the same window, everything already stored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from typing import Any

from bench.daemon import ROOT
from bench.services import services

DEVICES = 100
FIRST_DEVICE = 2_000_000
BASE_TS = 1_760_000_000.0


def _message(device: int, n: int) -> tuple[float, bytes]:
    ts = round(BASE_TS + n * 10 + device * 0.001, 6)
    body = {
        "ident": f"35{device:012d}", "timestamp": ts, "server.timestamp": round(ts + 1.5, 6),
        "channel.id": 5001, "device.id": device, "device.name": f"truck-{device}",
        "device.type.id": 1272, "protocol.id": 200, "peer": f"10.20.0.{device % 250}:45000",
        "position.latitude": 54.6 + n * 1e-5, "position.longitude": 25.2 + n * 1e-5,
        "position.altitude": 120, "position.direction": n % 360, "position.speed": n % 90,
        "position.satellites": 9, "position.valid": True, "battery.level": 80,
        "engine.ignition.status": True, "din": n % 16,
    }  # fmt: skip
    return ts, json.dumps(body, separators=(",", ":")).encode()


def serve(url: str, messages: int) -> None:
    from mirror.sim.rest_responder import AccountRecord, RestResponder

    record = AccountRecord()
    for d in range(DEVICES):
        device = FIRST_DEVICE + d
        record.observe(f"flespi/state/gw/devices/{device}", json.dumps({"id": device}).encode(), 0)
        for n in range(messages // DEVICES):
            ts, payload = _message(device, n)
            record.observe(f"flespi/message/gw/devices/{device}", payload, ts)
    responder = RestResponder(url, record).start()
    print("ready", flush=True)
    try:
        sys.stdin.read()  # until the benchmark closes our stdin
    finally:
        responder.stop()


async def _measure(broker_url: str, database_url: str, messages: int) -> dict[str, Any]:
    from mirror.ops.config import Settings
    from mirror.repair.backfill import Backfill, BackfillJob
    from mirror.repair.rest_carrier import standalone_rest_client
    from mirror.store.database import create_engine, migrate

    schema = "bench_backfill"
    engine = create_engine(database_url, schema, pool_size=4)
    await migrate(engine, schema)
    end = BASE_TS + messages * 10
    try:
        async with standalone_rest_client(Settings(mqtt_url=broker_url)) as rest:
            started = time.perf_counter()
            slots = asyncio.Semaphore(4)

            async def pages(device: int) -> int:
                fetched, begin = 0, BASE_TS
                async with slots:
                    while True:
                        page = await rest.get(
                            f"gw/devices/{device}/messages",
                            {"from": begin, "to": end, "count": 1000},
                        )
                        fetched += len(page) if begin == BASE_TS else len(page) - 1
                        if len(page) < 1000:
                            return fetched
                        begin = page[-1]["timestamp"]

            ids = [FIRST_DEVICE + d for d in range(DEVICES)]
            fetched = sum(await asyncio.gather(*(pages(d) for d in ids)))
            fetch_seconds = time.perf_counter() - started

            runs = []
            for name in ("first", "again"):
                job = BackfillJob(f"bench:{name}", BASE_TS, end, intervals=False)
                started = time.perf_counter()
                report = await Backfill(rest, engine, job).run()
                runs.append((time.perf_counter() - started, report))
        async with engine.connect() as conn:
            stored = (await conn.exec_driver_sql("SELECT count(*) FROM device_messages")).scalar()
    finally:
        await engine.dispose()
    (first_s, first), (again_s, again) = runs
    if int(stored) != messages or first.written != messages or again.written != 0:
        raise RuntimeError(f"stored {stored}, written {first.written} then {again.written}")
    return {
        "messages": messages, "devices": DEVICES,
        "fetch_only": {"seconds": fetch_seconds, "rate": fetched / fetch_seconds},
        "backfill": {"seconds": first_s, "rate": messages / first_s, "written": first.written},
        "backfill_again": {"seconds": again_s, "rate": messages / again_s,
                           "already_stored": again.already_stored},
        "backfill_vs_fetch": (messages / first_s) / (fetched / fetch_seconds),
    }  # fmt: skip


def backfill(opts: Any) -> dict[str, Any]:
    messages = (opts.messages // DEVICES) * DEVICES
    with services() as s:
        server = subprocess.Popen(
            [sys.executable, "-m", "bench.backfill", "--serve", "--url", s.broker.url,
             "--messages", str(messages)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            if server.stdout.readline().strip() != "ready":
                raise RuntimeError("the simulated flespi did not start")
            return asyncio.run(_measure(s.broker.url, s.database_url, messages))
        finally:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(30)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--serve", action="store_true")
    p.add_argument("--url", required=True)
    p.add_argument("--messages", type=int, default=100_000)
    args = p.parse_args()
    serve(args.url, args.messages)
