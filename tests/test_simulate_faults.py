"""`flespi-mirror simulate` streams while the daemon is SIGKILLed five times; the mirror must end
up equal to what an independent witness subscriber on the same broker saw published."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import subprocess
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

from mirror.store.database import create_engine
from tests.helpers import ROOT, KilledDaemon, query

pytestmark = pytest.mark.slow


class Witness:
    """A bare paho subscriber to flespi/#: every publication, in arrival order."""

    def __init__(self, url: str) -> None:
        host, port = url.split("//", 1)[1].split(":")
        self.seen: list[tuple[str, bytes, float]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"witness-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv5,
        )  # fmt: skip
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect(host, int(port))
        self.client.loop_start()
        self.client.subscribe("flespi/#", qos=1)
        assert subscribed.wait(10)

    def _on_message(self, _c, _u, message) -> None:
        props = dict(getattr(message.properties, "UserProperty", []) or [])
        with self.lock:
            self.seen.append((message.topic, bytes(message.payload), float(props["timestamp"])))

    def settled(self, quiet: float = 1.0) -> list[tuple[str, bytes, float]]:
        last = -1
        while True:
            with self.lock:
                count = len(self.seen)
            if count == last:
                break
            last = count
            time.sleep(quiet)
        self.client.loop_stop()
        self.client.disconnect()
        return self.seen


def expected_from(seen: list[tuple[str, bytes, float]]):
    telemetry: dict[tuple[int, str], tuple[float, bytes]] = {}
    devices: set[tuple[int, bytes]] = set()
    channels: set[tuple[int, bytes]] = set()
    for topic, payload, ts in seen:
        parts = topic.split("/")
        if parts[1] == "state" and len(parts) == 7 and parts[5] == "telemetry":
            key = (int(parts[4]), parts[6])
            if key not in telemetry or ts >= telemetry[key][0]:
                telemetry[key] = (ts, payload)
        elif parts[1:4] == ["message", "gw", "devices"]:
            devices.add((int(parts[4]), hashlib.md5(payload).digest()))
        elif parts[1:4] == ["message", "gw", "channels"]:
            channels.add((int(parts[4]), hashlib.md5(payload).digest()))
    live = {key: payload for key, (_ts, payload) in telemetry.items() if payload}
    return live, devices, channels


async def test_simulate_streams_through_five_sigkills_and_the_mirror_equals_the_witness(
    broker, database, schema_name, tmp_path
):
    daemon = KilledDaemon(broker.url, database.url, schema_name, tmp_path / "daemon.log")
    witness = Witness(broker.url)
    simulate = subprocess.Popen(
        [sys.executable, "-m", "mirror.cli", "simulate", "--mqtt-url", broker.url,
         "--devices", "20", "--rate", "1500", "--duration", "8", "--seed", "3"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        await daemon.kill_while(
            lambda: simulate.poll() is None, at_least=5, rng=random.Random(5), pause=(0.3, 1.2)
        )
        assert simulate.wait(60) == 0, simulate.stdout.read().decode() if simulate.stdout else ""
        seen = await asyncio.to_thread(witness.settled)
        telemetry, devices, channels = expected_from(seen)
        engine = create_engine(database.url, schema_name)
        try:
            deadline = time.monotonic() + 60
            while True:
                got = set(await query(engine, "SELECT device_id, digest FROM device_messages"))
                if len(got) >= len(devices) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.3)
            stored = await query(engine, "SELECT device_id, digest FROM device_messages")
            assert len(stored) == len(devices), "a device message is missing or stored twice"
            assert {(d, bytes(h)) for d, h in stored} == devices
            stored = await query(engine, "SELECT channel_id, digest FROM channel_messages")
            assert sorted((c, bytes(h)) for c, h in stored) == sorted(channels)
            rows = await query(engine, "SELECT device_id, name, value::text FROM telemetry")
            mirrored = {(d, n): json.loads(v) for d, n, v in rows}
            assert mirrored == {k: json.loads(v) for k, v in telemetry.items()}
            assert await query(engine, "SELECT count(*) FROM dead_letters") == [(0,)]
        finally:
            await engine.dispose()
    finally:
        if simulate.poll() is None:
            simulate.kill()
        daemon.stop()
    assert daemon.kills >= 5 and len(seen) > 5000
    print(f"[figures] simulate_sigkill: kills={daemon.kills} witnessed={len(seen)} "
          f"device_messages={len(devices)} channel_messages={len(channels)} "
          f"telemetry_keys={len(telemetry)} lost=0 duplicated=0 stale=0")  # fmt: skip
