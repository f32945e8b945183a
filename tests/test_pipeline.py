"""End to end: real Mosquitto → the daemon → real PostgreSQL, one topic family at a time."""

from __future__ import annotations

import pytest

from tests.helpers import eventually, publisher, running_mirror, settings_for


@pytest.fixture
def settings(broker, database, schema_name):
    return settings_for(broker.url, database.url, schema_name)


async def test_telemetry_lands_in_telemetry_table(broker, settings):
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            pub.publish(
                "flespi/state/gw/devices/42/telemetry/battery.level", 87, ts=1_700_000_000.5
            )
        await eventually(
            running.engine,
            "SELECT device_id, name, value::text, extract(epoch FROM ts) FROM telemetry",
            [(42, "battery.level", "87", pytest.approx(1_700_000_000.5))],
        )
