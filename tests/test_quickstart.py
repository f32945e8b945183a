"""The README's quick start: `simulate` + `run` against a local broker fill every table."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess

from mirror.database import create_engine
from mirror.simulate import SimulationOptions, run_simulation
from tests.helpers import (
    ROOT,
    eventually,
    query,
    running_mirror,
    settings_for,
    settle,
    wait_for_log,
)
from tests.launchers import MosquittoBroker

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
    env = {
        **os.environ,
        "MIRROR_DATABASE_URL": database.url,
        "MIRROR_SCHEMA": schema_name,
        "DEVICES": "5",
        "RATE": "300",
        "DURATION": "3",
    }
    env.pop("FLESPI_TOKEN", None)
    log = tmp_path / "quickstart.log"
    with log.open("w") as out:
        script = subprocess.Popen(
            ["make", "--no-print-directory", "quickstart"], cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    engine = create_engine(database.url, schema_name)
    try:
        wait_for_log(log, "the mirror keeps running", timeout=180)
        output = log.read_text()
        assert "mqtt://127.0.0.1:1883" not in output
        assert output.index("the mirror is ready") < output.index("publishing simulated")
        sent = int(re.search(r"device_message=(\d+)", output)[1])
        assert sent > 0
        await eventually(engine, "SELECT count(*) FROM device_messages", [(sent,)], timeout=30)
    finally:
        await engine.dispose()
        os.killpg(script.pid, signal.SIGINT)
        script.wait(timeout=60)
        if occupant is not None:
            occupant.cleanup()


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
