"""`run --workers N`: worker processes in one shared subscription group, one /metrics."""

from __future__ import annotations

import asyncio
import signal
import time

import psutil
import pytest

from mirror.store.database import create_engine
from tests.helpers import Publisher, daemon_process, http_get, query, stop_process, wait_for_log
from tests.launchers import free_port

pytestmark = pytest.mark.slow
BASE_TS = 1_731_990_000.0


def counter_total(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def wait_ready(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _ = await asyncio.to_thread(http_get, port, "/readyz")
        if status == 200:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not ready: {http_get(port, '/readyz')}")


async def test_two_workers_share_the_stream_and_one_restarts_after_a_crash(
    broker, database, schema_name, tmp_path
):
    port = free_port()
    log = tmp_path / "daemon.log"
    proc = daemon_process(
        broker.url,
        database.url,
        schema_name,
        "--workers",
        "2",
        "--metrics-port",
        str(port),
        log_path=log,
    )
    engine = create_engine(database.url, schema_name)
    try:
        wait_for_log(log, "subscribed to", count=2)
        await wait_ready(port)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        pub = Publisher(broker.url)
        total = 400
        for i in range(total):
            pub.publish(
                f"flespi/message/gw/devices/{i % 7}",
                {"timestamp": BASE_TS + i, "seq": i},
                BASE_TS + i,
            )
            if i == total // 2:
                workers[0].send_signal(signal.SIGKILL)  # a worker crashes mid-stream
        pub.close()
        wait_for_log(log, "restarting in")
        wait_for_log(log, "subscribed to", count=3)
        deadline = time.monotonic() + 60
        while (await query(engine, "SELECT count(*) FROM device_messages"))[0][0] < total:
            assert time.monotonic() < deadline, "messages missing after the worker restart"
            await asyncio.sleep(0.2)
        seqs = sorted(
            r[0] for r in await query(engine, "SELECT (payload->>'seq')::int FROM device_messages")
        )
        assert seqs == list(range(total))
        status, metrics = await asyncio.to_thread(http_get, port, "/metrics")
        assert status == 200
        assert 'flespi_mirror_build_info{version="0.1.0"} 1.0' in metrics
        # Counters of every worker, the killed one included, add up; redeliveries of what the
        # killed worker had not committed count again, so the sum is at least every message.
        assert counter_total(metrics, "flespi_mirror_messages_received_total") >= total
        await wait_ready(port)
    finally:
        await engine.dispose()
        assert stop_process(proc, signal.SIGTERM, timeout=60) == 0
    assert not [
        p
        for p in psutil.process_iter(["cmdline"])
        if f"{schema_name}-w" in " ".join(p.info["cmdline"] or [])
    ]


async def test_workers_from_the_environment_do_not_spawn_workers_of_their_own(
    broker, database, schema_name, tmp_path
):
    """MIRROR_WORKERS is inherited by the workers; only the supervisor may act on it."""
    port = free_port()
    log = tmp_path / "daemon.log"
    proc = daemon_process(
        broker.url, database.url, schema_name, "--metrics-port", str(port),
        env={"MIRROR_WORKERS": "2"}, log_path=log,
    )  # fmt: skip
    try:
        wait_for_log(log, "subscribed to", count=2)
        await wait_ready(port)
        await asyncio.sleep(1.0)
        supervisor = psutil.Process(proc.pid)
        assert len(supervisor.children()) == 2
        assert supervisor.children(recursive=True) == supervisor.children()
    finally:
        assert stop_process(proc, signal.SIGTERM, timeout=60) == 0
