"""``--scenario floor``: the real limit, PostgreSQL running the mirror's own statements bare.

A mirror cannot be faster than its database absorbing what it writes. This scenario measures
that floor for each of issue 17's three workloads and, in the same run, the mirror doing the
whole job, and prints each ratio:

- **drain**: the ``throughput`` backlog (``--messages``, the benchmark mix: 95 % telemetry over
  50,000 keys, 5 % device messages) drained by ``flespi-mirror run``, start-up taken off (from
  its ``connected to`` line to its last commit), with the CPU the mirror, the broker and
  PostgreSQL each spent per message meanwhile (which of them holds the drain back).
- **first snapshot**: ``--retained`` retained telemetry topics (1,000,000 for issue 17's target)
  taken by a new ``flespi-mirror run``, from process start to its last commit, with its peak
  RSS.
- **backfill**: 100,000 device messages over 100 devices fetched over REST-over-MQTT and written
  (``bench/backfill.py``), against the same fetch alone.

The floor of the first two: the same messages, decoded and coalesced into the very plans the
daemon builds (5,000 messages each; untimed), then their statements (``plan_operations``, and
the history horizon read a plan with device messages begins with) executed from one asyncpg
connection, one transaction per plan, and timed: only PostgreSQL's work and the wire.
Everything the daemon adds (MQTT, decoding, coalescing, building parameters, SQLAlchemy,
savepoints, acknowledgements) is what the ratio measures. The backfill's limit is the fetch
alone (its floor in the database is far above it).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import time
from collections.abc import Iterator
from typing import Any

from bench.scenarios import Options, drain_mirror, retained_snapshot
from bench.services import services
from bench.workload import CID, Mix

BATCH = 5_000


def _plans(mix: Mix, count: int) -> Iterator[Any]:
    """The daemon's write plans for messages 0..count-1 of ``mix``, BATCH messages each, with
    the properties the publisher sends (timestamp ``start + i µs``, cid)."""
    from mirror.decode.records import Inbound
    from mirror.decode.topics import decode
    from mirror.store.batch import coalesce

    rnd = random.Random(1)
    start = time.time()
    for first in range(0, count, BATCH):
        decoded = []
        for i in range(first, min(count, first + BATCH)):
            topic, payload = mix.message(i, rnd, start)
            props = {"cid": CID, "timestamp": repr(start + i * 1e-6)}
            m = Inbound(topic, payload, props, start + 1, retain=mix.retained, qos=1)
            decoded.append((m, decode(m, 1 << 20, int(CID))))
        yield coalesce(decoded)


def _backfill_plans(messages: int) -> Iterator[Any]:
    """The plans a backfill of ``bench/backfill.py``'s account writes: one per device page of
    1,000 messages, each message as the backfill hands it to decoding (untimed)."""
    from bench.backfill import BASE_TS, DEVICES, FIRST_DEVICE, _message
    from mirror.decode.records import Inbound
    from mirror.decode.topics import decode
    from mirror.store.batch import coalesce

    per_device = messages // DEVICES
    for d in range(DEVICES):
        device = FIRST_DEVICE + d
        topic = f"flespi/message/gw/devices/{device}"
        for first in range(0, per_device, 1000):
            decoded = []
            for n in range(first, min(per_device, first + 1000)):
                _, payload = _message(device, n)
                m = Inbound(topic, payload, {}, BASE_TS, retain=False, qos=1)
                decoded.append((m, decode(m, 1 << 20)))
            yield coalesce(decoded)


async def _bare(url: str, schema: str, plans: Iterator[Any], count: int) -> dict[str, Any]:
    """Execute the plans' statements bare; returns seconds spent in PostgreSQL and rows."""
    from mirror.store import partitions
    from mirror.store.database import create_engine, migrate
    from mirror.store.history import READ_HORIZON, TIER_OF_TABLE
    from mirror.store.statements import STATEMENTS, plan_operations

    engine = create_engine(url, schema)
    await migrate(engine, schema)
    await partitions.maintain(engine)
    dialect = engine.sync_engine.dialect
    compiled: dict[str, tuple[str, tuple[str, ...]]] = {}

    def bare(statement: Any) -> tuple[str, tuple[str, ...]]:
        key = str(statement)
        if key not in compiled:
            c = statement.compile(dialect=dialect)
            compiled[key] = (c.string, tuple(c.positiontup or ()))
        return compiled[key]

    seconds = 0.0
    rows = 0
    async with engine.connect() as sa_conn:
        raw = (await sa_conn.get_raw_connection()).driver_connection
        await raw.execute(f"SET search_path TO {schema}")
        for plan in plans:
            ops = plan_operations(plan)
            calls: list[tuple[str, list[Any]]] = []
            history = any(plan.rows(t) for t in TIER_OF_TABLE)
            if history:
                calls.append((bare(READ_HORIZON)[0], []))
            for table, op, params in ops:
                bound = dict(params)
                if table in TIER_OF_TABLE:
                    bound["horizon"] = float("-inf")
                sql, names = bare(STATEMENTS[f"{table}.{op}"])
                calls.append((sql, [bound[n] for n in names]))
                rows += len(next(iter(params.values())))
            began = time.perf_counter()
            async with raw.transaction():
                for sql, args in calls:
                    await raw.fetch(sql, *args)
            seconds += time.perf_counter() - began
    await engine.dispose()
    return {"messages": count, "rows": rows, "seconds": seconds, "rate": count / seconds}


def stages(mix: Mix, count: int) -> dict[str, Any]:
    """The daemon's own Python work per message, stage by stage, in this process: no broker,
    no database. Real PUBLISH bytes (made untimed) are parsed by the session's Inbox, handled as
    the session handles them, decoded and coalesced as the pipeline does (5,000 a batch), turned
    into statement parameters, and acknowledged (the PUBACK bytes). What the drain spends beyond
    these and PostgreSQL is the event loop, SQLAlchemy's execute and the socket."""
    import types

    import mqtt5

    from mirror.decode.topics import decode
    from mirror.ops.config import Settings
    from mirror.pipeline import _inbound, _tune_gc
    from mirror.session.mqtt import Inbox
    from mirror.session.source import MqttSource, puback
    from mirror.store.batch import coalesce
    from mirror.store.statements import plan_operations

    rnd = random.Random(1)
    start = time.time()
    wire = bytearray()
    for i in range(count):
        topic, payload = mix.message(i, rnd, start)
        props = [("cid", CID), ("timestamp", repr(start + i * 1e-6))]
        wire += mqtt5.PublishPacket(
            topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE, retain=mix.retained,
            packet_id=i % 65535 + 1, user_properties=props,
        ).write()  # fmt: skip
    data = bytes(wire)
    spent: dict[str, float] = {}

    def timed(name: str, began: float) -> None:
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - began

    thresholds = gc.get_threshold()
    _tune_gc()  # as the daemon runs (pipeline.py); undone below
    source = MqttSource(Settings(max_unacked=count + 1, max_unacked_bytes=1 << 40))
    link = types.SimpleNamespace(epoch=0)
    inbox = Inbox(1 << 24)
    began = time.perf_counter()
    packets = []
    for at in range(0, len(data), 65536):  # the socket's reads
        packets += inbox.feed(data[at : at + 65536])
    timed("parse (Inbox.feed)", began)
    began = time.perf_counter()
    now = time.time()
    for packet, size in packets:
        source._on_publish(link, packet, size, now)  # type: ignore[arg-type]
    timed("receive (_on_publish)", began)
    received = list(source._buffer)
    for first in range(0, len(received), BATCH):
        part = received[first : first + BATCH]
        began = time.perf_counter()
        decoded = [(m, decode(m, 1 << 20, int(CID))) for m in map(_inbound, part)]
        timed("decode (Inbound, decode)", began)
        began = time.perf_counter()
        plan = coalesce(decoded)
        timed("coalesce", began)
        began = time.perf_counter()
        for _table, _op, params in plan_operations(plan):
            dict(params)
        timed("parameters (plan_operations)", began)
        began = time.perf_counter()
        b"".join(puback(m.packet_id) for m in part)
        timed("ack (PUBACK bytes)", began)
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    per = {name: round(seconds / count * 1e6, 2) for name, seconds in spent.items()}
    return {"messages": count, "us_per_message": per, "total_us": round(sum(per.values()), 2)}


def _floor(mix: Mix, count: int) -> dict[str, Any]:
    with services() as s:
        return asyncio.run(_bare(s.database_url, "floor", _plans(mix, count), count))


def _backfill_floor(messages: int) -> dict[str, Any]:
    with services() as s:
        plans = _backfill_plans(messages)
        return asyncio.run(_bare(s.database_url, "floor_backfill", plans, messages))


def floor(opts: Options) -> dict[str, Any]:
    from bench.backfill import backfill

    python = stages(Mix(), opts.messages)
    drain_floor = _floor(Mix(), opts.messages)
    drain = drain_mirror(opts, cpu=True)
    devices = -(-opts.retained // 50)
    snapshot_floor = _floor(Mix(devices=devices, retained=True), opts.retained)
    snapshot = retained_snapshot(opts, raw_drain=False)
    filled = backfill(opts)
    filled_floor = _backfill_floor(opts.messages)
    drain_ratio = drain["rate"] / drain_floor["rate"]
    snapshot_ratio = snapshot["seconds_from_start"] / snapshot_floor["seconds"]
    backfill_ratio = filled["backfill_vs_fetch"]
    return {
        "drain": {"floor": drain_floor, "mirror": drain, "ratio": drain_ratio, "stages": python},
        "snapshot": {"floor": snapshot_floor, "mirror": snapshot, "ratio": snapshot_ratio},
        "backfill": {"mirror": filled, "ratio": backfill_ratio, "statements_bare": filled_floor},
        "targets": {
            "drain >= 0.8 x floor": drain_ratio >= 0.8,
            "first snapshot <= 1.3 x floor": snapshot_ratio <= 1.3,
            "first snapshot peak RSS <= 150 MB": snapshot["peak_rss_mb"] <= 150,
            "backfill >= 0.8 x fetch alone": backfill_ratio >= 0.8,
        },
    }


def summary(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    d, s, b = result["drain"], result["snapshot"], result["backfill"]
    cpu = d["mirror"].get("cpu_us_per_message") or {"mirror": 0.0, "broker": 0.0, "postgres": 0.0}
    return [
        ("floor: drain", f"{d['ratio']:.2f} x floor",
         f"mirror {d['mirror']['rate']:,.0f} msg/s, statements bare {d['floor']['rate']:,.0f}; "
         "target >= 0.8"),
        ("floor: first snapshot", f"{s['ratio']:.2f} x floor",
         f"mirror {s['mirror']['seconds_from_start']:.1f} s from start, statements bare "
         f"{s['floor']['seconds']:.1f} s, peak RSS {s['mirror']['peak_rss_mb']:.0f} MB; "
         "target <= 1.3"),
        ("floor: drain, Python per message", f"{d['stages']['total_us']:.1f} us",
         ", ".join(f"{k} {v}" for k, v in d["stages"]["us_per_message"].items())
         + f"; the mirror takes {1e6 / d['mirror']['rate']:.1f} us a message, PostgreSQL "
         f"bare {1e6 / d['floor']['rate']:.1f} us"),
        ("floor: drain, CPU per message", f"mirror {cpu['mirror']:.1f} us",
         f"broker {cpu['broker']:.1f} us, PostgreSQL {cpu['postgres']:.1f} us, in a drain of "
         f"{1e6 / d['mirror']['rate']:.1f} us a message on {os.cpu_count()} cores: the mirror "
         f"busy {cpu['mirror'] * d['mirror']['rate'] / 1e6:.0%} of one"),
        ("floor: backfill", f"{b['ratio']:.2f} x fetch",
         f"backfill {b['mirror']['backfill']['rate']:,.0f} msg/s, fetch alone "
         f"{b['mirror']['fetch_only']['rate']:,.0f}, its statements bare "
         f"{b['statements_bare']['rate']:,.0f}; target >= 0.8"),
    ]  # fmt: skip
