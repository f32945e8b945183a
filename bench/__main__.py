"""``python -m bench [--scenario NAME ...] [--messages N] [--quick]`` (``make bench``).

Runs the scenarios (each against a Mosquitto and a PostgreSQL it starts itself), prints a table
of rates and ratios and writes every measurement to ``bench/out/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from bench import faults, floor, history, scenarios, views
from bench.backfill import backfill
from bench.scenarios import OUT, Options

SCENARIOS: dict[str, Callable[[Options], dict[str, Any]]] = {
    "throughput": scenarios.throughput,
    "retained": scenarios.retained_snapshot,
    "latency": scenarios.latency,
    "memory": scenarios.memory,
    "profile": scenarios.profile,
    "scale-out": scenarios.scale_out,
    "views": views.views,
    "backfill": backfill,
    "isolation": faults.isolation,
    "batch-limits": faults.batch_limits,
    "object-size": scenarios.object_size,
    "interval-history": scenarios.interval_history,
    "history": history.history,
    "floor": floor.floor,
}
# Opt-in: measures a prototype of a recommended daemon change, not the daemon as shipped.
EXTRA: dict[str, Callable[[Options], dict[str, Any]]] = {}


def options(args: argparse.Namespace) -> Options:
    opts = Options()
    if args.quick:
        opts = Options(
            messages=30_000,
            latency_seconds=10,
            stream_seconds=60,
            outage_seconds=20,
            profile_messages=50_000,
        )
    if args.messages:
        opts.messages = args.messages
    for name in ("latency_seconds", "stream_seconds", "outage_seconds", "retained",
                 "history_devices"):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            setattr(opts, name, value)
    return opts


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    import aiomqtt  # noqa: F401
    import paho.mqtt
    import psutil
    import sqlalchemy

    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "paho-mqtt": paho.mqtt.__version__,
        "aiomqtt": version("aiomqtt"),
        "asyncpg": version("asyncpg"),
        "sqlalchemy": sqlalchemy.__version__,
    }


def _f(value: Any, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str]] = []
    t = results.get("throughput", {})
    if "rate" in t.get("mosquitto_sub", {}):
        rows.append(("drain: mosquitto_sub (C ceiling)", f"{_f(t['mosquitto_sub']['rate'])} msg/s",
                     f"mirror {t['mirror_vs_mosquitto_sub']:.2f} x it (target 0.6)"))  # fmt: skip
    if "raw" in t:
        rows += [
            ("drain: raw paho (limit)", f"{_f(t['raw']['rate'])} msg/s", "1.00 x raw"),
            ("drain: naive peer", f"{_f(t['naive']['rate'])} msg/s",
             f"{t['naive']['rate'] / t['raw']['rate']:.2f} x raw"),
            ("drain: mirror", f"{_f(t['mirror']['rate'])} msg/s",
             f"{t['mirror_vs_raw']:.2f} x raw (target 0.8), "
             f"{t['mirror_vs_naive']:.1f} x naive (target 3)"),
        ]  # fmt: skip
    r = results.get("retained", {})
    if "rows" in r:
        rows.append((
            f"retained snapshot {r['topics']:,}", f"{r['seconds_from_start']:.1f} s from start",
            f"{r['seconds_from_connect']:.1f} s from connect; {r['mirror_vs_raw']:.2f} x raw "
            f"drain ({r['raw_seconds']:.1f} s); peak RSS {r.get('peak_rss_mb', 0):.0f} MB; "
            + ", ".join(r.get("targets", {})),
        ))  # fmt: skip
    lat = results.get("latency", {})
    if "p99_ms" in lat:
        rows.append((
            f"latency @ {lat['rate']:,.0f} msg/s", f"p50 {lat['p50_ms']:.0f} ms, "
            f"p99 {lat['p99_ms']:.0f} ms", f"max {lat['max_ms']:.0f} ms; histogram p50 "
            f"{lat['histogram_p50_ms']:.0f} / p99 {lat['histogram_p99_ms']:.0f} ms; "
            "target p99 <= 250",
        ))  # fmt: skip
    mem = results.get("memory", {})
    if "rss_peak_mb" in mem:
        rows.append((
            "memory (RSS)", f"peak {mem['rss_peak_mb']:.0f} MB",
            f"stream {mem['rss_stream_first_min_avg_mb']:.0f} -> "
            f"{mem['rss_stream_last_min_avg_mb']:.0f} MB (1st/last min avg), outage peak "
            f"{_f(mem['rss_outage_peak_mb'])} MB, catch-up {mem['catch_up_seconds']:.1f} s; "
            "target <= 150 MB",
        ))  # fmt: skip
    prof = results.get("profile", {})
    if "profile" in prof and "self_pct" in prof["profile"]:
        top = ", ".join(f"{n.split(' (')[0]} {p}%" for n, p in prof["profile"]["self_pct"][:4])
        rows.append(("profile (self, event loop)", f"{_f(prof['rate'])} msg/s under py-spy", top))
    scale = results.get("scale-out", {})
    if "two_vs_one" in scale:
        rows.append((
            "scale-out: 2 workers vs 1", f"{scale['two_vs_one']:.2f} x",
            f"{_f(scale['two']['rate'])} vs {_f(scale['one']['rate'])} msg/s; target >= 1.3",
        ))  # fmt: skip
    v = results.get("views", {})
    if "queries" in v:
        one_ms = v["queries"]["one device's position"]["server_ms"]
        all_ms = v["queries"]["all positions"]["server_ms"]
        rows.append((
            f"views @ {v['devices']:,} devices",
            f"one position {one_ms:.2f} ms, all {all_ms:.0f} ms",
            f"{v['one_vs_baseline']:.0f} x / {v['all_vs_baseline']:.0f} x the 0001 view; "
            f"writes {v['write_cost_ratio']:.2f} x; targets <= 1 ms, <= 100 ms",
        ))  # fmt: skip
    fill = results.get("backfill", {})
    if "backfill" in fill:
        rows.append((
            f"backfill {fill['messages']:,} msgs / {fill['devices']} devices",
            f"{_f(fill['backfill']['rate'])} msg/s",
            f"{fill['backfill_vs_fetch']:.2f} x fetch only ({_f(fill['fetch_only']['rate'])} "
            f"msg/s); again, all stored: {_f(fill['backfill_again']['rate'])} msg/s",
        ))  # fmt: skip
    iso = results.get("isolation", {})
    if "halving_vs_clean" in iso:
        rates = iso["rows_per_second"]
        rows.append((
            "1 refused row in 1,000", f"{iso['halving_vs_clean']:.2f} x clean",
            f"{_f(rates['one_in_1000_halving'])} vs {_f(rates['clean'])} rows/s; savepoint per "
            f"row (before) {iso['savepoint_per_row_vs_clean']:.2f} x; target >= 10 x before",
        ))  # fmt: skip
    size = results.get("object-size", {})
    if "props_big_vs_small" in size:
        sec = size["seconds"]
        rows.append((
            f"object size: {size['updates']:,} updates",
            f"props {size['props_big_vs_small']:.2f} x, calc {size['calc_big_vs_small']:.2f} x, "
            f"whole {size['whole_big_vs_small']:.2f} x",
            f"big vs small ({sec['props_big']:.1f} vs "
            f"{sec['props_small']:.1f} s; {sec['calc_big']:.1f} vs {sec['calc_small']:.1f} s; "
            f"{sec['whole_big']:.1f} vs {sec['whole_small']:.1f} s); target <= 2.5",
        ))  # fmt: skip
    spans = results.get("interval-history", {})
    if "spans_big_vs_small" in spans:
        sec = spans["seconds"]
        rows.append((
            f"interval history: {spans['updates']:,} updates",
            f"spans {spans['spans_big_vs_small']:.2f} x, ids {spans['ids_big_vs_small']:.2f} x",
            f"10,000 vs 10 stored per device ({sec['spans_big']:.1f} vs {sec['spans_small']:.1f} s;"
            f" {sec['ids_big']:.1f} vs {sec['ids_small']:.1f} s); target <= 2.5",
        ))  # fmt: skip
    if "questions" in results.get("history", {}):
        rows += history.summary(results["history"])
    if "drain" in results.get("floor", {}):
        rows += floor.summary(results["floor"])
    for name, value in results.items():
        if isinstance(value, dict) and "error" in value and name != "machine":
            rows.append((name, "FAILED", value["error"][:100]))
    width = max(len(r[0]) for r in rows) if rows else 10
    value_width = max(len(r[1]) for r in rows) if rows else 10
    return "\n".join(f"{a:<{width}}  {b:<{value_width}}  {c}" for a, b, c in rows)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--scenario", action="append", choices=[*SCENARIOS, *EXTRA],
                   help="run only this scenario (repeatable); default: all")  # fmt: skip
    p.add_argument("--messages", type=int, help="backlog size of the drain scenarios")
    p.add_argument("--quick", action="store_true", help="smaller and shorter (under 4 minutes)")
    p.add_argument("--retained", type=int, help="retained topics of the snapshot (100000)")
    p.add_argument("--latency-seconds", type=float)
    p.add_argument("--stream-seconds", type=float, help="memory: stream before the outage")
    p.add_argument("--outage-seconds", type=float, help="memory: database outage")
    p.add_argument("--history-devices", type=int,
                   help="history: devices reporting once a minute for a week (1000: 10M "
                   "messages; 10000: 100M)")  # fmt: skip
    p.add_argument("--out", default=str(OUT / "results.json"), help="where to write results")
    args = p.parse_args()
    opts = options(args)
    chosen = args.scenario or list(SCENARIOS)
    results: dict[str, Any] = {"machine": machine(), "options": vars(opts), "quick": args.quick}
    OUT.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        print(f"== {name}", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            results[name] = {**SCENARIOS, **EXTRA}[name](opts)
        except Exception as exc:
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["wall_seconds"] = round(time.monotonic() - started, 1)
        print(f"   {name} took {results[name]['wall_seconds']} s", file=sys.stderr, flush=True)
        with open(args.out, "w") as out:
            json.dump(results, out, indent=2, default=str)
    print(table(results))
    print(f"\nall measurements: {args.out}")
    return 1 if any(isinstance(v, dict) and "error" in v for v in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
