"""The benchmark scenarios. Each returns a dict of measurements (see bench/README.md)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.daemon import ROOT, MirrorProcess
from bench.services import Services, fetch, services
from bench.workload import MIRROR_TOPICS, Mix, host_port, prime_session, session_queue_ready

OUT = ROOT / "bench" / "out"


@dataclass
class Options:
    messages: int = 100_000
    retained: int = 100_000
    latency_seconds: float = 30.0
    latency_rate: float = 2000.0
    stream_seconds: float = 300.0
    outage_seconds: float = 60.0
    stream_rate: float = 2000.0
    profile_messages: int = 100_000
    history_devices: int = 1_000  # history: 1,000 x 7 days x 1/min = 10M messages


def _python_module(module: str, *args: str, timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def publish_backlog(url: str, count: int, *, retained: bool = False, devices: int = 1000) -> float:
    """Publish ``count`` messages of the mix at full speed; returns the rate it reached."""
    args = ["--url", url, "--count", str(count), "--devices", str(devices)]
    if retained:
        args.append("--retained")
    result = _python_module("bench.publish", *args, timeout=600)
    session_queue_ready(url)
    return count / max(result["elapsed"], 1e-9)


def start_stream(url: str, count: int, rate: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.publish", "--url", url, "--count", str(count),
         "--rate", str(rate)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _log(name: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.log"
    path.unlink(missing_ok=True)
    return path


def _mirror_counts(database_url: str, schema: str) -> dict[str, int]:
    rows = fetch(
        database_url,
        f"SELECT (SELECT count(*) FROM {schema}.telemetry) AS telemetry, "
        f"(SELECT count(*) FROM {schema}.device_messages) AS device_messages, "
        f"(SELECT count(*) FROM {schema}.dead_letters) AS dead_letters",
    )
    return {k: int(v) for k, v in dict(rows[0]).items()}


# ---------------------------------------------------------------------------------------------
# Drain of a queued backlog: the limit, the naive peer, the mirror


def _drained_rows(
    database_url: str, schema: str, messages: int, prefilled_device_messages: int = 0
) -> dict[str, int]:
    """The mirror's rows after draining ``messages`` of the mix; raises unless exactly those."""
    counts = _mirror_counts(database_url, schema)
    expected = Mix().expected(messages)
    expected["device_messages"] += prefilled_device_messages
    if any(counts[k] != v for k, v in expected.items()):
        raise RuntimeError(f"mirror rows {counts} != expected {expected}")
    return counts


def _with_backlog(s: Services, client_id: str, count: int) -> float:
    prime_session(s.broker.url, client_id)
    return publish_backlog(s.broker.url, count)


def drain_raw(opts: Options) -> dict[str, Any]:
    with services() as s:
        client_id = f"raw-{uuid.uuid4().hex[:6]}"
        publish_rate = _with_backlog(s, client_id, opts.messages)
        r = _python_module(
            "bench.rawdrain", "--url", s.broker.url, "--client-id", client_id,
            "--expect", str(opts.messages), timeout=600,
        )  # fmt: skip
        if "error" in r:
            raise RuntimeError(f"raw drain: {r['error']}")
        return {"messages": opts.messages, "seconds": r["seconds"], "rate": r["rate"],
                "publish_rate": publish_rate, "ack": "paho automatic ack on receipt"}  # fmt: skip


def drain_mosquitto_sub(opts: Options) -> dict[str, Any]:
    """The C client that only counts: Mosquitto's own mosquitto_sub, QoS 1, persistent session,
    payloads to /dev/null. The client-side ceiling of a backlog drain on this machine."""
    binary = shutil.which("mosquitto_sub")
    if binary is None:
        return {"skipped": "mosquitto_sub is not installed (Debian: mosquitto-clients)"}
    with services() as s:
        client_id = f"sub-{uuid.uuid4().hex[:6]}"
        publish_rate = _with_backlog(s, client_id, opts.messages)
        host, port = host_port(s.broker.url)
        topics = [arg for topic in MIRROR_TOPICS for arg in ("-t", topic)]
        command = [
            binary, "-h", host, "-p", str(port), "-V", "mqttv5", "-i", client_id, "-c",
            "-x", "3600", "-q", "1", "-C", str(opts.messages), "-W", "600", "-N", *topics,
        ]  # fmt: skip
        started = time.monotonic()
        proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            raise RuntimeError(f"mosquitto_sub failed ({proc.returncode}): {proc.stderr[-500:]!r}")
        return {"messages": opts.messages, "seconds": seconds, "rate": opts.messages / seconds,
                "publish_rate": publish_rate, "ack": "libmosquitto, PUBACK on receipt"}  # fmt: skip


def drain_naive(opts: Options) -> dict[str, Any]:
    with services() as s:
        client_id = f"naive-{uuid.uuid4().hex[:6]}"
        publish_rate = _with_backlog(s, client_id, opts.messages)
        r = _python_module(
            "bench.naive", "--url", s.broker.url, "--client-id", client_id,
            "--database-url", s.database_url, "--schema", "naive",
            "--expect", str(opts.messages), timeout=900,
        )  # fmt: skip
        if "error" in r:
            raise RuntimeError(f"naive peer: {r['error']}")
        rows = fetch(s.database_url, "SELECT (SELECT count(*) FROM naive.telemetry) "
                     "+ (SELECT count(*) FROM naive.messages) AS n")[0]["n"]  # fmt: skip
        return {"messages": opts.messages, "seconds": r["seconds"], "rate": r["rate"],
                "rows": int(rows), "publish_rate": publish_rate}  # fmt: skip


class CpuShares:
    """CPU time the mirror, the broker and PostgreSQL spend between :meth:`start` and
    :meth:`per_message` (PostgreSQL: every ``postgres`` process of the machine, so the system
    server's other clients count too; nothing else runs here during a benchmark)."""

    def __init__(self, mirror_pid: int) -> None:
        self.mirror_pid = mirror_pid
        self.before: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        spent = {"mirror": 0.0, "broker": 0.0, "postgres": 0.0}
        for p in psutil.process_iter(["name", "pid", "cpu_times"]):
            name, times = p.info["name"] or "", p.info["cpu_times"]
            if times is None:
                continue
            group = ("mirror" if p.info["pid"] == self.mirror_pid else
                     "broker" if "mosquitto" in name else
                     "postgres" if "postgres" in name else None)  # fmt: skip
            if group is not None:
                spent[group] += times.user + times.system
        return spent

    def start(self) -> None:
        self.before = self._now()

    def per_message(self, count: int) -> dict[str, float]:
        """Microseconds of CPU per message, by process (backends that started and ended in
        between are missed: the daemon's connections live through a drain)."""
        after = self._now()
        return {k: round((after[k] - self.before.get(k, 0.0)) / count * 1e6, 2) for k in after}


def drain_mirror(
    opts: Options,
    *,
    profile: bool = False,
    count: int | None = None,
    module: str = "mirror.cli",
    cpu: bool = False,
) -> dict[str, Any]:
    """``cpu``: also the CPU per message of the mirror, the broker and PostgreSQL during the
    drain, counted from the daemon's ``connected to`` line (seen within 20 ms)."""
    count = count or opts.messages
    name = "profile" if profile else ("drain_" + module.replace(".", "_"))
    with services() as s:
        schema = "mirror_drain"
        client_id = f"mirror-{uuid.uuid4().hex[:6]}"
        publish_rate = _with_backlog(s, client_id, count)
        mirror = MirrorProcess(
            s.broker.url, s.database_url, schema, client_id, _log(name), module=module
        )
        spy = _start_profiler(mirror.pid) if profile else None
        shares = CpuShares(mirror.pid) if cpu else None
        try:
            if shares is not None:
                deadline = time.monotonic() + 120
                while mirror.log_time("connected to") is None and time.monotonic() < deadline:
                    time.sleep(0.02)
                shares.start()
            m = mirror.wait_committed(count, timeout=600)
            cpu_per_message = shares.per_message(count) if shares is not None else None
        finally:
            if spy is not None:
                _stop_profiler(spy)
            mirror.stop()
        connected = mirror.connected_at()
        counts = _mirror_counts(s.database_url, schema)
        expected = Mix().expected(count)
        complete = all(counts[k] == v for k, v in expected.items())
        seconds = m.last_commit - connected
        result: dict[str, Any] = {
            "messages": count, "seconds": seconds, "rate": count / seconds,
            "start_to_connect": connected - mirror.started, "rows": counts,
            "expected_rows": expected, "complete": complete, "publish_rate": publish_rate,
        }  # fmt: skip
        if not complete:
            raise RuntimeError(f"mirror rows {counts} != expected {expected}")
        if profile:
            result["profile"] = summarize_profile(OUT / "profile.speedscope.json")
        if cpu_per_message is not None:
            result["cpu_us_per_message"] = cpu_per_message
        return result


def throughput(opts: Options) -> dict[str, Any]:
    sub = drain_mosquitto_sub(opts)
    raw = drain_raw(opts)
    naive = drain_naive(opts)
    mirror = drain_mirror(opts)
    result: dict[str, Any] = {
        "mosquitto_sub": sub,
        "raw": raw,
        "naive": naive,
        "mirror": mirror,
        "mirror_vs_raw": mirror["rate"] / raw["rate"],
        "mirror_vs_naive": mirror["rate"] / naive["rate"],
        "targets": {
            "mirror >= 0.8 x raw": mirror["rate"] / raw["rate"] >= 0.8,
            "mirror >= 3 x naive": mirror["rate"] / naive["rate"] >= 3.0,
        },
    }
    if "rate" in sub:
        result["mirror_vs_mosquitto_sub"] = mirror["rate"] / sub["rate"]
        result["targets"]["mirror >= 0.6 x mosquitto_sub"] = mirror["rate"] / sub["rate"] >= 0.6
    return result


# ---------------------------------------------------------------------------------------------
# Retained snapshot


def retained_snapshot(
    opts: Options, module: str = "mirror.cli", *, raw_drain: bool = True
) -> dict[str, Any]:
    count = opts.retained
    limit = 15.0 if count >= 1_000_000 else 10.0  # issue 10: 1M topics in 15 s
    devices = -(-count // 50)
    with services() as s:
        publish_rate = publish_backlog(s.broker.url, count, retained=True, devices=devices)
        raw = {"seconds": float("nan"), "rate": float("nan")}
        if raw_drain:
            raw = _python_module(
                "bench.rawdrain", "--url", s.broker.url, "--client-id",
                f"raw-{uuid.uuid4().hex[:6]}", "--expect", str(count), "--subscribe", timeout=600,
            )  # fmt: skip
        if "error" in raw:
            raise RuntimeError(f"raw drain of the retained state: {raw['error']}")
        schema = "mirror_snapshot"
        mirror = MirrorProcess(
            s.broker.url, s.database_url, schema, f"snap-{uuid.uuid4().hex[:6]}",
            _log("retained_" + module.replace(".", "_")), module=module,
        )  # fmt: skip
        peak = PeakRss(mirror.pid).start()
        try:
            m = mirror.wait_committed(count, timeout=600)
        finally:
            peak_mb = peak.stop()
            mirror.stop()
        connected = mirror.connected_at()
        rows = _mirror_counts(s.database_url, schema)["telemetry"]
        if rows != min(count, devices * 50):
            raise RuntimeError(f"{rows} telemetry rows after the snapshot, expected {count}")
        from_start = m.last_commit - mirror.started
        from_connect = m.last_commit - connected
        return {
            "topics": count, "rows": rows, "seconds_from_start": from_start,
            "seconds_from_connect": from_connect, "rate": count / from_connect,
            "raw_seconds": raw["seconds"], "raw_rate": raw["rate"],
            "mirror_vs_raw": raw["seconds"] / from_connect, "publish_rate": publish_rate,
            "peak_rss_mb": peak_mb,
            "targets": {
                f"snapshot <= {limit:.0f} s (from process start)": from_start <= limit,
                "peak RSS <= 150 MB": peak_mb <= 150.0,
            },
        }  # fmt: skip


class PeakRss:
    """The highest RSS of a process, sampled every 50 ms on a thread."""

    def __init__(self, pid: int) -> None:
        self._proc = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak_mb = 0.0

    def start(self) -> PeakRss:
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            try:
                rss = self._proc.memory_info().rss / 2**20
            except psutil.Error:
                return
            self.peak_mb = max(self.peak_mb, rss)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(5)
        return round(self.peak_mb, 1)


# ---------------------------------------------------------------------------------------------
# Latency at a steady rate


def latency(opts: Options) -> dict[str, Any]:
    """The mirror in this process, so every message's publish→commit time can be recorded.

    The publisher is a separate process; this process does nothing but run the mirror while
    it measures. Latency of a message = the time ``Mirror.write`` returns for its batch
    (after COMMIT and PUBACK) minus its ``timestamp`` user property (set at publish time).
    """
    with services() as s:
        return asyncio.run(_latency(s, opts))


async def _latency(s: Services, opts: Options) -> dict[str, Any]:
    from mirror.ops import metrics
    from mirror.ops.config import Secret, Settings
    from mirror.pipeline import Mirror, Prepared
    from mirror.store.database import create_engine
    from mirror.store.writer import Store, Turn, WriteResult

    latencies: list[float] = []

    class MeasuredMirror(Mirror):
        async def write(
            self, prepared: Prepared, turn: Turn | None = None, store: Store | None = None
        ) -> WriteResult:
            result = await super().write(prepared, turn, store)  # committed and acknowledged
            now = time.time()
            for message in prepared.batch:
                stamp = message.properties.get("timestamp")
                if stamp is not None:
                    latencies.append(now - float(stamp))
            return result

    schema = "mirror_latency"
    settings = Settings(
        mqtt_url=s.broker.url,
        database_url=Secret(s.database_url),
        schema=schema,
        client_id=f"lat-{uuid.uuid4().hex[:6]}",
        metrics_port=0,
    )
    before = _histogram(metrics.LAG)
    engine = create_engine(s.database_url, schema)
    mirror = MeasuredMirror(settings, engine)
    task = asyncio.create_task(mirror.run())
    deadline = time.monotonic() + 30
    while not (mirror.source.connected and mirror.source.subscribed):
        if task.done() or time.monotonic() > deadline:
            task.result()
            raise TimeoutError("the mirror did not subscribe")
        await asyncio.sleep(0.05)
    count = int(opts.latency_rate * opts.latency_seconds)
    publisher = start_stream(s.broker.url, count, opts.latency_rate)
    try:
        while mirror.committed_messages < count:
            if publisher.poll() not in (None, 0):
                raise RuntimeError(f"publisher failed: {publisher.communicate()[1][-1000:]}")
            if time.monotonic() > deadline + opts.latency_seconds + 60:
                raise TimeoutError(f"committed {mirror.committed_messages} of {count}")
            await asyncio.sleep(0.1)
        out, _ = publisher.communicate(timeout=30)
    finally:
        mirror.request_stop()
        await asyncio.wait_for(task, 30)
        await engine.dispose()
    published = json.loads(out.strip().splitlines()[-1])
    after = _histogram(metrics.LAG)
    buckets = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
    lat = sorted(latencies)
    p50, p99 = _pct(lat, 0.50), _pct(lat, 0.99)
    return {
        "rate": opts.latency_rate, "seconds": opts.latency_seconds, "messages": len(lat),
        "achieved_publish_rate": published["published"] / published["elapsed"],
        "p50_ms": p50 * 1000, "p90_ms": _pct(lat, 0.90) * 1000, "p99_ms": p99 * 1000,
        "max_ms": lat[-1] * 1000,
        "histogram_p50_ms": _bucket_quantile(buckets, 0.50) * 1000,
        "histogram_p99_ms": _bucket_quantile(buckets, 0.99) * 1000,
        "batches": mirror.committed_batches,
        "targets": {"p99 <= 250 ms": p99 <= 0.250},
    }  # fmt: skip


def _histogram(hist: Any) -> list[tuple[float, float]]:
    """Cumulative (le, count) pairs of a prometheus_client Histogram in this process."""
    pairs = []
    for metric in hist.collect():
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                pairs.append((float(sample.labels["le"]), float(sample.value)))
    return pairs


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def _bucket_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket."""
    total = buckets[-1][1] if buckets else 0
    if not total:
        return float("nan")
    rank = q * total
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower_le
            inside = count - lower_count
            return lower_le + (le - lower_le) * ((rank - lower_count) / inside if inside else 0)
        lower_le, lower_count = le, count
    return lower_le


# ---------------------------------------------------------------------------------------------
# Memory over a stream and a database outage


def memory(opts: Options) -> dict[str, Any]:
    with services(need_private=True) as s:
        assert s.postgres is not None
        schema = "mirror_memory"
        mirror = MirrorProcess(
            s.broker.url, s.database_url, schema, f"mem-{uuid.uuid4().hex[:6]}", _log("memory")
        )
        proc = psutil.Process(mirror.pid)
        samples: list[tuple[float, float, str]] = []  # (seconds, rss MB, phase)
        phase = ["start"]
        stop = threading.Event()
        t0 = time.monotonic()

        def sample() -> None:
            while not stop.wait(1.0):
                try:
                    rss = proc.memory_info().rss / 2**20
                except psutil.Error:
                    return
                samples.append((time.monotonic() - t0, rss, phase[0]))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            mirror.wait_committed(0, 30)
            while mirror.log_time("subscribed to") is None:
                time.sleep(0.05)
            total_seconds = opts.stream_seconds + opts.outage_seconds
            count = int(opts.stream_rate * total_seconds)
            phase[0] = "stream"
            publisher = start_stream(s.broker.url, count, opts.stream_rate)
            time.sleep(opts.stream_seconds)
            phase[0] = "outage"
            s.postgres.stop("fast")
            outage_started = time.monotonic()
            time.sleep(opts.outage_seconds)
            s.postgres.start()
            outage = time.monotonic() - outage_started
            phase[0] = "recovery"
            recovered_at = time.monotonic()
            mirror.wait_committed(count, timeout=300)
            catch_up = time.monotonic() - recovered_at
            phase[0] = "after"
            publisher.communicate(timeout=60)
            time.sleep(3)
        finally:
            stop.set()
            sampler.join(5)
            mirror.stop()
        counts = _mirror_counts(s.database_url, schema)
    (OUT / "memory_rss.json").write_text(json.dumps(samples))

    def rss(ph: str) -> list[float]:
        return [r for _, r, p in samples if p == ph]

    stream, outage_rss = rss("stream"), rss("outage")
    first_minute = [r for t, r, p in samples if p == "stream"][:60]
    last_minute = stream[-60:]
    peak = max(r for _, r, _ in samples)
    return {
        "stream_rate": opts.stream_rate, "stream_seconds": opts.stream_seconds,
        "outage_seconds": round(outage, 1), "messages": count,
        "rss_start_mb": stream[0], "rss_stream_first_min_avg_mb": _avg(first_minute),
        "rss_stream_last_min_avg_mb": _avg(last_minute), "rss_stream_peak_mb": max(stream),
        "rss_outage_start_mb": outage_rss[0] if outage_rss else None,
        "rss_outage_peak_mb": max(outage_rss) if outage_rss else None,
        "rss_outage_end_mb": outage_rss[-1] if outage_rss else None,
        "rss_peak_mb": peak, "rss_end_mb": samples[-1][1],
        "catch_up_seconds": catch_up, "rows": counts,
        "targets": {"peak RSS <= 150 MB": peak <= 150.0},
    }  # fmt: skip


def _avg(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------
# Profile


def _start_profiler(pid: int) -> subprocess.Popen[bytes] | None:
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return None
    return subprocess.Popen(
        [str(spy), "record", "--pid", str(pid), "--rate", "100", "--nonblocking", "--threads",
         "--format", "speedscope", "-o", str(OUT / "profile.speedscope.json")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _stop_profiler(spy: subprocess.Popen[bytes]) -> None:
    import signal

    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()


def profile(opts: Options) -> dict[str, Any]:
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return {"skipped": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    return drain_mirror(opts, profile=True, count=opts.profile_messages)


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive shares of the busiest thread (the event loop), idle time excluded."""
    if not path.exists():
        return {"error": "py-spy wrote no profile (ptrace not permitted?)"}
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    busiest = max(data["profiles"], key=lambda p: len(p["samples"]))
    self_count: dict[str, float] = {}
    inclusive: dict[str, float] = {}
    total = 0.0
    idle = 0.0

    def label(i: int) -> str:
        f = frames[i]
        where = str(f.get("file", "")).split("site-packages/")[-1].replace(str(ROOT) + "/", "")
        return f"{f['name']} ({where})"

    for stack, weight in zip(busiest["samples"], busiest["weights"], strict=True):
        if not stack:
            continue
        leaf = frames[stack[-1]]["name"]
        if leaf.startswith("thread ("):
            continue
        if leaf in ("select", "poll", "epoll") or leaf.endswith(".select"):
            idle += weight
            continue
        total += weight
        self_count[label(stack[-1])] = self_count.get(label(stack[-1]), 0) + weight
        for name in {label(i) for i in stack if not frames[i]["name"].startswith("thread (")}:
            inclusive[name] = inclusive.get(name, 0) + weight

    def ranked(counts: dict[str, float]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in
                sorted(counts.items(), key=lambda kv: -kv[1])[:top]]  # fmt: skip

    return {
        "thread": busiest.get("name"),
        "busy_share": round(total / (total + idle), 3) if total + idle else None,
        "self_pct": ranked(self_count),
        "inclusive_pct": ranked(inclusive),
    }


def _drain_with_workers(opts: Options, workers: int, group: str) -> dict[str, Any]:
    """The backlog queued for a share group's members, drained by ``run --workers N``."""
    with services() as s:
        schema = f"mirror_w{workers}"
        base = f"scale-{uuid.uuid4().hex[:6]}"
        members = [base] if workers == 1 else [f"{base}-w{i}" for i in range(workers)]
        shared = tuple(f"$share/{group}/{t}" for t in MIRROR_TOPICS)
        for member in members:
            prime_session(s.broker.url, member, topics=shared)
        publish_rate = publish_backlog(s.broker.url, opts.messages)
        mirror = MirrorProcess(
            s.broker.url, s.database_url, schema, base, _log(f"scale_w{workers}"),
            "--workers", str(workers), "--share-group", group,
        )  # fmt: skip
        try:
            m = mirror.wait_committed(opts.messages, timeout=600)
        finally:
            mirror.stop()
        counts = _drained_rows(s.database_url, schema, opts.messages)
        seconds = m.last_commit - mirror.connected_at()
        return {
            "workers": workers,
            "messages": opts.messages,
            "seconds": seconds,
            "rate": opts.messages / seconds,
            "rows": counts,
            "publish_rate": publish_rate,
        }


def scale_out(opts: Options) -> dict[str, Any]:
    """The same backlog, queued for the members of one shared subscription group, drained by
    one worker and by two (``run --workers N --share-group G``)."""
    one = _drain_with_workers(opts, 1, "bench")
    two = _drain_with_workers(opts, 2, "bench")
    ratio = two["rate"] / one["rate"]
    return {
        "one": one,
        "two": two,
        "two_vs_one": ratio,
        "targets": {"2 workers >= 1.3 x 1": ratio >= 1.3},
    }


# ---------------------------------------------------------------------------------------------
# Cost independent of an object's size (issue 8 items 2 and 3): the same number of updates
# written through the store, spread over many small objects or aimed at one big one.


def _state_batches(topics: Sequence[str], updates: int, batch: int, ts: float) -> list[list[Any]]:
    """``updates`` retained publications cycling over ``topics``, cut into batches."""
    from mirror.decode.records import Inbound

    messages = [
        Inbound(
            topics[i % len(topics)],
            json.dumps({"n": i}).encode(),
            {"timestamp": repr(ts + i)},
            ts + i,
        )
        for i in range(updates)
    ]
    return [messages[i : i + batch] for i in range(0, len(messages), batch)]


async def _timed_writes(
    url: str, schema: str, prime: list[list[Any]], timed: list[list[Any]], *, analyze: bool = False
) -> float:
    """Write ``prime`` (untimed: builds the objects), then ``timed``; seconds for ``timed``.
    ``analyze``: gather statistics after ``prime``, as autovacuum does for a table that grew
    (within a minute), so the planner sees the stored rows it will search."""
    from sqlalchemy import text

    from mirror.decode.topics import decode
    from mirror.store.batch import coalesce
    from mirror.store.database import create_engine, migrate
    from mirror.store.writer import Store

    engine = create_engine(url, schema)
    try:
        await migrate(engine, schema)
        store = Store(engine)
        for batch in prime:
            await store.write(coalesce((m, decode(m)) for m in batch))
        if analyze:
            async with engine.begin() as conn:
                await conn.execute(text("ANALYZE"))
        started = time.perf_counter()
        for batch in timed:
            await store.write(coalesce((m, decode(m)) for m in batch))
        return time.perf_counter() - started
    finally:
        await engine.dispose()


def _size_case(url: str, name: str, topics: Sequence[str], updates: int, batch: int) -> float:
    prime = _state_batches(topics, len(topics), batch, 1_700_000_000.0)
    timed = _state_batches(topics, updates, batch, 1_700_100_000.0)
    schema = f"b_{name}_{uuid.uuid4().hex[:6]}"
    return asyncio.run(_timed_writes(url, schema, prime, timed))


def _whole_case(url: str, name: str, objects: int, properties: int, batch: int) -> float:
    """Seconds to write ``objects`` x ``properties`` property rows and then one whole-object
    update of each object (which rebuilds its props from all its rows)."""
    from mirror.decode.records import Inbound

    ts = 1_700_000_000.0
    messages = [
        Inbound(f"flespi/state/gw/devices/{1 + o}/counters/c{p}", b"1", {"timestamp": repr(ts)}, ts)
        for o in range(objects)
        for p in range(properties)
    ]
    whole = json.dumps({"name": "renamed"}).encode()
    messages += [
        Inbound(f"flespi/state/gw/devices/{1 + o}", whole, {"timestamp": repr(ts + 1)}, ts + 1)
        for o in range(objects)
    ]
    timed = [messages[i : i + batch] for i in range(0, len(messages), batch)]
    return asyncio.run(_timed_writes(url, f"b_{name}_{uuid.uuid4().hex[:6]}", [], timed))


def object_size(opts: Options) -> dict[str, Any]:
    """One property update of an object with 10,000 properties against objects with 10
    (object properties), and one calculator with 2,000 devices against 200 calculators with
    10 (calculator device state), for the same number of updates in batches of 500; and one
    object with 25,000 property rows and a whole-object update against 25,000 objects with one
    each (props rebuilt from every row)."""
    updates, batch = 20_000, 500
    big_object = [f"flespi/state/gw/devices/1/counters/c{i}" for i in range(10_000)]
    small_objects = [
        f"flespi/state/gw/devices/{1 + i // 10}/counters/c{i % 10}" for i in range(10_000)
    ]
    big_calc = [f"flespi/state/gw/calcs/1/devices/{d}/last" for d in range(2_000)]
    small_calcs = [f"flespi/state/gw/calcs/{1 + d // 10}/devices/{d}/last" for d in range(2_000)]
    with services() as s:
        seconds = {
            "props_small": _size_case(s.database_url, "ps", small_objects, updates, batch),
            "props_big": _size_case(s.database_url, "pb", big_object, updates, batch),
            "calc_small": _size_case(s.database_url, "cs", small_calcs, updates, batch),
            "calc_big": _size_case(s.database_url, "cb", big_calc, updates, batch),
            # issue 18 item 1: whole-object updates rebuild props from every property row
            "whole_small": _whole_case(s.database_url, "ws", 25_000, 1, batch),
            "whole_big": _whole_case(s.database_url, "wb", 1, 25_000, batch),
        }
    return {
        "updates": updates,
        "batch": batch,
        "seconds": seconds,
        "rate": {k: updates / v for k, v in seconds.items()},
        "props_big_vs_small": seconds["props_big"] / seconds["props_small"],
        "calc_big_vs_small": seconds["calc_big"] / seconds["calc_small"],
        "whole_big_vs_small": seconds["whole_big"] / seconds["whole_small"],
        "target": "big within 2.5x of small, for the same number of updates",
    }


# ---------------------------------------------------------------------------------------------
# Cost independent of a device's interval history (issue 8 item 4): interval events without a
# flespi id are matched to stored intervals by time span (intervals_apply); the index lookups
# must cost the same for a device with 10 stored intervals as for one with 10,000.


def _interval_batches(
    intervals: Sequence[tuple[int, int]], updates: int, batch: int, ts: float, *, ids: bool
) -> list[list[Any]]:
    """``updates`` events cycling over ``intervals`` ((device, n): the device's n-th interval,
    begin n * 10,000): the first round creates them, later rounds move their end (never as
    far as the next interval's begin)."""
    from mirror.decode.records import Inbound

    messages = []
    for i in range(updates):
        device, n = intervals[i % len(intervals)]
        rounds = i // len(intervals)
        begin, end = n * 10_000, n * 10_000 + 50 + rounds
        payload: dict[str, Any] = {"begin": begin, "end": end, "duration": end - begin}
        if ids:
            payload["id"] = n
        event = "created" if rounds == 0 else "updated"
        messages.append(
            Inbound(
                f"flespi/interval/gw/calcs/1/devices/{device}/{event}",
                json.dumps(payload).encode(),
                {"timestamp": repr(ts + i)},
                ts + i,
            )
        )
    return [messages[i : i + batch] for i in range(0, len(messages), batch)]


def _history_case(url: str, name: str, stored: Sequence[tuple[int, int]], *, ids: bool) -> float:
    updates, batch = 4_000, 500
    prime = _interval_batches(stored, len(stored), batch, 1_700_000_000.0, ids=ids)
    # The timed updates touch the newest intervals (as live traffic does), the same number of
    # distinct intervals in both cases; their first round is already stored by ``prime``.
    touched = list(stored[-200:])
    timed = _interval_batches(touched, updates + len(touched), batch, 1_700_100_000.0, ids=ids)
    timed = [m for b in timed for m in b][len(touched) :]
    timed_batches = [timed[i : i + batch] for i in range(0, len(timed), batch)]
    schema = f"b_{name}_{uuid.uuid4().hex[:6]}"
    return asyncio.run(_timed_writes(url, schema, prime, timed_batches, analyze=True))


def interval_history(opts: Options) -> dict[str, Any]:
    """4,000 interval updates in batches of 500, on devices holding 10 stored intervals each
    (1,000 devices) and on one device holding 10,000, without and with flespi ids."""
    small = [(1 + d, n) for d in range(1_000) for n in range(10)]
    big = [(1, n) for n in range(10_000)]
    with services() as s:
        seconds = {
            "spans_small": _history_case(s.database_url, "hs", small, ids=False),
            "spans_big": _history_case(s.database_url, "hb", big, ids=False),
            "ids_small": _history_case(s.database_url, "is", small, ids=True),
            "ids_big": _history_case(s.database_url, "ib", big, ids=True),
        }
    return {
        "updates": 4_000,
        "batch": 500,
        "seconds": seconds,
        "rate": {k: 4_000 / v for k, v in seconds.items()},
        "spans_big_vs_small": seconds["spans_big"] / seconds["spans_small"],
        "ids_big_vs_small": seconds["ids_big"] / seconds["ids_small"],
        "spans_vs_ids": seconds["spans_small"] / seconds["ids_small"],
        "target": "big within 2.5x of small, for the same number of updates",
    }
