"""The README's quick start: `simulate` + `run` against a local broker fill every table."""

from __future__ import annotations

import asyncio

from mirror.simulate import SimulationOptions, run_simulation
from tests.helpers import query, running_mirror, settings_for, settle

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
]


async def test_simulated_traffic_fills_every_table_and_view(broker, database, schema_name):
    settings = settings_for(broker.url, database.url, schema_name)
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
