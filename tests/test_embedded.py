"""Without a database URL, `run` starts an embedded PostgreSQL that keeps data between runs."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time

import asyncpg
import psutil
import pytest

from mirror.ops.config import asyncpg_connect_kwargs
from mirror.sim.simulate import SimulationOptions, run_simulation
from tests.helpers import ROOT, Publisher, daemon_process, stop_process, wait_for_log
from tests.launchers import embedded_postgres_refused

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        embedded_postgres_refused() is not None, reason=embedded_postgres_refused() or ""
    ),
]


def run_embedded(broker_url: str, data_dir, log):
    """`run` without a database URL: the embedded PostgreSQL, data in ``data_dir``."""
    return daemon_process(broker_url, None, "flespi", "--data-dir", str(data_dir), log_path=log)


def postgres_running(data_dir) -> bool:
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "postgres" and str(data_dir) in " ".join(
            proc.info["cmdline"] or []
        ):
            return True
    return False


async def count_rows(url: str) -> int:
    conn = await asyncpg.connect(**asyncpg_connect_kwargs(url))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM flespi.telemetry"))
    finally:
        await conn.close()


async def wait_rows(url: str, expected: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (n := await count_rows(url)) < expected:
        assert time.monotonic() < deadline, f"{n} of {expected} rows"
        await asyncio.sleep(0.1)


async def test_embedded_postgres_starts_persists_across_runs_and_stops(broker, tmp_path):
    data_dir = tmp_path / "pgdata"
    log = tmp_path / "daemon.log"
    for run, device in enumerate((1, 2), start=1):
        proc = run_embedded(broker.url, data_dir, log)
        try:
            wait_for_log(log, "subscribed to", count=run, timeout=120)
            url = re.findall(r"connect with: psql '([^']+)'", log.read_text())[-1]
            assert "flespi_mirror" in url
            pub = Publisher(broker.url)
            pub.publish(f"flespi/state/gw/devices/{device}/telemetry/x", device, 1_731_990_000.0)
            pub.close()
            await wait_rows(url, run)  # run 2 still sees run 1's row: data persisted
        finally:
            assert stop_process(proc, signal.SIGTERM, timeout=60) == 0
        deadline = time.monotonic() + 20
        while postgres_running(data_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not postgres_running(data_dir), "the embedded PostgreSQL was left running"
    assert (data_dir / "PG_VERSION").exists()
    # A start says what it does, without library noise (alembic plug-ins, platformdirs).
    noise = [
        line for line in log.read_text().splitlines() if "Warning" in line or "alembic" in line
    ]
    assert noise == []


def readme_sql(after: str) -> list[str]:
    """The statements of the first ```sql block after the heading ``after`` in README.md."""
    text = (ROOT / "README.md").read_text()
    block = text.split(after, 1)[1].split("```sql", 1)[1].split("```", 1)[0]
    code = "\n".join(line for line in block.splitlines() if not line.startswith("--"))
    return [s.strip() for s in code.split(";") if s.strip()]


def psql(url: str, sql: str) -> subprocess.CompletedProcess[str]:
    """``psql URL`` as a reader types it (no ~/.psqlrc, stop at the first error)."""
    return subprocess.run(
        ["psql", url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def test_readme_sql_runs_as_pasted_into_the_printed_psql_string(broker, tmp_path):
    """`run` prints a psql string; README's quick-start and example queries, unqualified, work
    through it as they are, on a mirror filled by `simulate`."""
    log = tmp_path / "daemon.log"
    proc = run_embedded(broker.url, tmp_path / "pgdata", log)
    try:
        wait_for_log(log, "subscribed to", timeout=120)
        url = re.findall(r"connect with: psql '([^']+)'", log.read_text())[-1]
        options = SimulationOptions(mqtt_url=broker.url, devices=3, rate=0, duration=2)
        await asyncio.to_thread(run_simulation, options)
        deadline = time.monotonic() + 30
        while "(1 row)" not in psql(url, "SELECT 1 FROM flespi.device_track LIMIT 1").stdout:
            assert time.monotonic() < deadline, "the simulated traffic never reached the tables"
            await asyncio.sleep(0.2)
        statements = readme_sql("## Quick start") + readme_sql("## Example SQL")
        assert len(statements) > 10 and any("FROM devices" in s for s in statements)
        for statement in statements:
            result = psql(url, statement)
            assert result.returncode == 0, f"{statement}\n{result.stderr}"
    finally:
        assert stop_process(proc, signal.SIGTERM, timeout=60) == 0
