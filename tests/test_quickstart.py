"""The README's quick start: `simulate` + `run` against a local broker fill every table, and
Ctrl-C ends it cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import psutil

from mirror.sim.simulate import SimulationOptions, run_simulation
from mirror.store.database import create_engine
from tests.helpers import (
    ROOT,
    eventually,
    query,
    running_mirror,
    settings_for,
    settle,
    wait_for_log,
)
from tests.launchers import MosquittoBroker, TestDatabase

DATA_TABLES = [
    "telemetry",
    "device_settings",
    "plugin_device_configs",
    "objects",
    "object_properties",
    "intervals",
    "device_messages",
    "channel_messages",
    "modem_messages",
    "calculator_devices",
    "platform_logs",
    "other_messages",
]


async def test_simulated_traffic_fills_every_table_and_view(broker, database, schema_name):
    settings = settings_for(broker.url, database.url, schema_name, logs=True)
    async with running_mirror(settings) as running:
        options = SimulationOptions(
            mqtt_url=broker.url, devices=5, rate=0, duration=5, max_messages=600
        )
        report = await asyncio.to_thread(run_simulation, options)
        await settle(running, quiet=0.5)
        counts = {
            t: (await query(running.engine, f"SELECT count(*) FROM {t}"))[0][0] for t in DATA_TABLES
        }
        assert all(n > 0 for n in counts.values()), counts
        assert await query(running.engine, "SELECT count(*) FROM dead_letters") == [(0,)]
        accounts = await query(running.engine, "SELECT count(DISTINCT cid) FROM telemetry")
        assert accounts == [(3,)]  # a master account and two subaccounts
        devices = await query(
            running.engine,
            "SELECT count(*) FROM devices WHERE name IS NOT NULL AND ident IS NOT NULL",
        )
        assert devices == [(5,)]
        positions = await query(
            running.engine, "SELECT count(*) FROM device_positions WHERE latitude IS NOT NULL"
        )
        assert positions == [(5,)]
        assert running.mirror.committed_messages == report.published


async def test_make_quickstart_works_with_a_broker_already_on_1883(database, schema_name, tmp_path):
    """`make quickstart` word for word: its own broker port, simulate only once ready, so every
    live message published reaches the database."""
    occupant = None
    if _port_free(1883):  # the newcomer's situation: something already listens on 1883
        occupant = MosquittoBroker(port=1883).start()
    log = tmp_path / "quickstart.log"
    command = ["make", "--no-print-directory", "quickstart"]
    script = start_quickstart(command, database, schema_name, log, devices=5, rate=300, duration=3)
    engine = create_engine(database.url, schema_name)
    try:
        wait_for_log(log, "the mirror keeps running", timeout=180)
        output = log.read_text()
        assert "mqtt://127.0.0.1:1883" not in output
        assert output.index("the mirror is ready") < output.index("publishing simulated")
        sent = int(re.search(r"device_message=(\d+)", output)[1])
        assert sent > 0
        await eventually(engine, "SELECT count(*) FROM device_messages", [(sent,)], timeout=30)
        logs = int(re.search(r"platform_log=(\d+)", output)[1])
        assert logs > 0  # the quick start runs the mirror with --logs: platform_logs fills too
        await eventually(engine, "SELECT count(*) FROM platform_logs", [(logs,)], timeout=30)
    finally:
        await engine.dispose()
        os.killpg(script.pid, signal.SIGINT)  # Ctrl-C, as the terminal sends it to the group
        script.wait(timeout=60)
        if occupant is not None:
            occupant.cleanup()
    output = log.read_text()
    assert "quickstart: stopping the mirror and the broker" in output
    assert "make: ***" not in output and "Traceback" not in output, output


def test_ctrl_c_during_the_simulation_stops_every_child_and_exits_0(
    database, schema_name, tmp_path
):
    log = tmp_path / "quickstart.log"
    command = ["bash", "scripts/quickstart.sh"]
    script = start_quickstart(command, database, schema_name, log, devices=2, rate=50, duration=120)
    try:
        wait_for_log(log, "publishing simulated", timeout=180)
        children = psutil.Process(script.pid).children(recursive=True)
        assert len(children) >= 3  # the broker, the mirror, simulate
    finally:
        os.killpg(script.pid, signal.SIGINT)
        status = script.wait(timeout=60)
    assert status == 0, log.read_text()
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert "Traceback" not in log.read_text()


def start_quickstart(
    command: list[str], database: TestDatabase, schema: str, log: Path, **simulation: int
) -> subprocess.Popen[bytes]:
    """The quick start in a session of its own (Ctrl-C goes to the group), without a token,
    its simulation set through the variables the README lists (devices=, rate=, duration=)."""
    env = {**os.environ, "MIRROR_DATABASE_URL": database.url, "MIRROR_SCHEMA": schema}
    env.update({name.upper(): str(value) for name, value in simulation.items()})
    env.pop("FLESPI_TOKEN", None)
    with log.open("w") as out:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
