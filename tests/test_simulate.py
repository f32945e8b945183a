"""The simulator, end to end: what a real MQTT 5 subscriber on a real Mosquitto receives from it."""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from mirror.sim.simulate import SimulationOptions, SimulationReport, run_simulation
from mirror.sim.traffic import FAMILIES, TrafficGenerator
from tests.launchers import MosquittoBroker, free_port


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool  # as published: the subscription asks for retain-as-published
    user_properties: dict[str, str]
    received_at: float
    expiry: int | None = None


class Subscriber:
    """A plain paho MQTT 5 client that records everything it receives on one filter."""

    def __init__(self, url: str, topic_filter: str = "flespi/#") -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-subscriber-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.connect(host, int(port), clean_start=True)
        self.client.loop_start()
        self.client.subscribe(topic_filter, options=SubscribeOptions(qos=1, retainAsPublished=True))
        assert self._subscribed.wait(10), "no SUBACK"

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        properties = getattr(message.properties, "UserProperty", [])
        expiry = getattr(message.properties, "MessageExpiryInterval", None)
        received = Received(
            message.topic,
            bytes(message.payload),
            message.retain,
            dict(properties),
            time.time(),
            expiry,
        )
        with self._lock:
            self.messages.append(received)

    def received(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Give the broker a moment to deliver, then a little more to catch any extras."""
        deadline = time.monotonic() + timeout
        while len(self.received()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        return self.received()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber(broker: MosquittoBroker) -> Iterator[Subscriber]:
    sub = Subscriber(broker.url)
    try:
        yield sub
    finally:
        sub.close()


def family_of(message: Received) -> str:
    """The family a topic belongs to, read straight from flespi's topic layout."""
    parts = message.topic.split("/")
    if parts[:2] == ["flespi", "state"] and (message.payload == b"" or parts[-1] == "deleted"):
        return "deletion"
    if parts[:4] == ["flespi", "state", "gw", "devices"]:
        if len(parts) == 5:
            return "object"
        return {"telemetry": "telemetry", "settings": "setting"}.get(parts[5], "object_property")
    if parts[:4] == ["flespi", "state", "gw", "plugins"]:
        return "plugin_config"
    if parts[:4] == ["flespi", "state", "gw", "calcs"]:
        return "calculator_device"
    if parts[:4] == ["flespi", "state", "platform", "customer"]:
        return "object_property"
    if parts[:2] == ["flespi", "interval"]:
        return "calculator_device" if parts[-1] in ("activated", "deactivated") else "interval"
    if parts[:2] == ["flespi", "log"]:
        return "platform_log"
    if parts[:3] == ["flespi", "message", "gw"]:
        return {"devices": "device_message", "channels": "channel_message"}.get(
            parts[3], "modem_message"
        )
    if parts[:3] == ["flespi", "message", "storage"]:
        return "other_message"
    raise AssertionError(f"unexpected topic {message.topic}")


def simulate(url: str, **overrides: Any) -> SimulationReport:
    options: dict[str, Any] = {
        "mqtt_url": url,
        "devices": 3,
        "rate": 0,
        "duration": 5,
        "max_messages": 400,
    }
    return run_simulation(SimulationOptions(**(options | overrides)))


def test_every_family_reaches_a_subscriber_with_flespi_payloads_and_properties(
    broker: MosquittoBroker, subscriber: Subscriber
) -> None:
    report = simulate(broker.url)
    messages = subscriber.wait_for(report.published)

    assert report.published == len(messages)
    assert sum(report.by_family.values()) == report.published
    assert set(report.by_family) == set(FAMILIES)
    seen = Counter(family_of(m) for m in messages)
    assert set(seen) == set(FAMILIES), f"missing {set(FAMILIES) - set(seen)}"
    assert seen == Counter({k: v for k, v in report.by_family.items() if v})

    for m in messages:
        stamp = float(m.user_properties["timestamp"])
        assert "." in m.user_properties["timestamp"]
        assert abs(stamp - m.received_at) < 10, m.topic
        assert m.user_properties["cid"].isdigit()
        if family_of(m) == "telemetry":  # flespi expires telemetry (370 days at most)
            assert m.expiry is not None and 0 < m.expiry <= 370 * 86_400, m.topic
        state = m.topic.startswith("flespi/state/")
        assert m.retain == state, m.topic

    by_topic: dict[str, list[Any]] = {}
    for m in messages:
        if m.payload:
            by_topic.setdefault(m.topic, []).append(json.loads(m.payload))

    battery = by_topic["flespi/state/gw/devices/1000001/telemetry/battery.level"]
    assert all(type(v) in (int, float) for v in battery), battery
    assert isinstance(by_topic["flespi/state/gw/devices/1000001/telemetry/ident"][0], str)
    ignition = by_topic["flespi/state/gw/devices/1000001/telemetry/engine.ignition.status"]
    assert all(isinstance(v, bool) for v in ignition)
    position = by_topic["flespi/state/gw/devices/1000001/telemetry/position"][-1]
    assert {"latitude", "longitude", "altitude", "satellites", "valid"} <= set(position)
    assert by_topic["flespi/state/gw/devices/1000001"][0]["configuration"] == {
        "ident": "35000000000001"
    }
    assert by_topic["flespi/state/gw/devices/1000001/settings/report_interval"][0] == {
        "interval": 30
    }

    for m in messages:
        if family_of(m) in ("device_message", "channel_message"):
            message = json.loads(m.payload)
            assert isinstance(message, dict)
            assert isinstance(message["ident"], str)
            assert isinstance(message["timestamp"], float)
            if "device.id" in message:  # a channel also sees unregistered devices
                assert message["device.id"] == int(message["ident"][-6:]) + 1_000_000
            assert {"server.timestamp", "channel.id", "position.latitude", "peer"} <= set(message)
        if family_of(m) == "modem_message":
            sms = json.loads(m.payload)
            assert sms["phone"] == "+" + m.topic.rsplit("/", 1)[1]
            assert isinstance(sms["text"], str)

    deletions = [m for m in messages if m.payload == b""]
    assert deletions
    assert all(m.retain and m.topic.startswith("flespi/state/") for m in deletions)
    accounts = {m.user_properties["cid"] for m in messages}
    assert len(accounts) == 3, accounts  # a master account and two subaccounts
    device_times = [json.loads(m.payload)["timestamp"] for m in messages
                    if family_of(m) == "device_message"]  # fmt: skip
    assert min(device_times) < time.time() - 1000 * 7 * 86_400  # a GPS week rollover


def test_interval_updates_and_deletions_refer_to_a_created_interval(
    broker: MosquittoBroker, subscriber: Subscriber
) -> None:
    report = simulate(broker.url, retained_snapshot=False, max_messages=2000)
    messages = subscriber.wait_for(report.published)

    created: dict[int, int] = {}
    spans: dict[str, tuple[int, int]] = {}  # the open id-less interval of each device topic
    events = Counter[str]()
    for m in messages:
        if family_of(m) != "interval":
            continue
        *base, event = m.topic.split("/")
        device = "/".join(base)
        interval = json.loads(m.payload)
        events[event] += 1
        if "id" not in interval:  # the calculator without ids: intervals found by their span
            assert base[4] == "8002", m.topic
            if event == "deleted":
                assert set(interval) & {"begin", "end"}, m.payload
                spans.pop(device, None)
                continue
            assert interval["duration"] == interval["end"] - interval["begin"]
            if event in ("updated", "finished"):  # finished: the legacy name of an update
                begin, end = spans[device]
                assert interval["begin"] <= begin and interval["end"] >= end, m.payload
            elif device in spans:
                assert interval["begin"] > spans[device][1], "intervals of a device overlap"
            spans[device] = (interval["begin"], interval["end"])
            continue
        assert interval["duration"] == interval["end"] - interval["begin"]
        assert {"mileage", "max_speed", "timestamp"} <= set(interval)
        if event == "created":
            created[interval["id"]] = interval["begin"]
        else:
            assert created[interval["id"]] == interval["begin"], m.payload
    assert events["created"] and events["updated"] and events["deleted"]
    assert spans, "the id-less calculator's intervals are missing"


def test_the_calculator_without_ids_moves_begin_and_deletes_by_any_field() -> None:
    """The generator alone (no I/O), long enough to see every id-less shape."""
    generator = TrafficGenerator(devices=4, seed=3)
    open_: dict[str, tuple[int, int]] = {}
    moved, finished, shapes = 0, 0, set()
    for p in itertools.islice(generator.live(), 60_000):
        if p.family != "interval" or "/calcs/8002/" not in p.topic:
            continue
        device, event = p.topic.rsplit("/", 1)
        interval = json.loads(p.payload)
        assert "id" not in interval
        if event == "deleted":
            shapes.add(tuple(sorted(set(interval) & {"begin", "end"})))
            open_.pop(device, None)
            continue
        finished += event == "finished"
        if event in ("updated", "finished"):
            moved += interval["begin"] < open_[device][0]
        elif device in open_:
            assert interval["begin"] > open_[device][1], "intervals of a device overlap"
        open_[device] = (interval["begin"], interval["end"])
    assert moved, "no update moved an interval's begin"
    assert finished, "no update came by the legacy name 'finished'"
    assert shapes == {("begin", "end"), ("end",), ("begin",)}, shapes


def test_retained_snapshot_stays_on_the_broker_for_later_subscribers(
    broker: MosquittoBroker,
) -> None:
    simulate(broker.url, max_messages=0)
    later = Subscriber(broker.url, "flespi/state/gw/devices/+")
    try:
        objects = later.wait_for(3)
    finally:
        later.close()
    assert sorted(json.loads(m.payload)["id"] for m in objects) == [1000001, 1000002, 1000003]
    assert all(m.retain for m in objects)


def test_same_seed_publishes_same_topics_in_same_order(
    broker: MosquittoBroker, subscriber: Subscriber
) -> None:
    first = simulate(broker.url, seed=7, retained_snapshot=False, max_messages=300)
    one = [m.topic for m in subscriber.wait_for(first.published)]
    second = simulate(broker.url, seed=7, retained_snapshot=False, max_messages=300)
    both = [m.topic for m in subscriber.wait_for(first.published + second.published)]
    assert first.by_family == second.by_family
    assert both[len(one) :] == one


def test_unreachable_broker_raises_runtime_error_quickly() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}") as raised:
        run_simulation(
            SimulationOptions(mqtt_url=f"mqtt://127.0.0.1:{port}", password="s3cret-token")
        )
    assert time.monotonic() - started < 5
    assert "s3cret-token" not in str(raised.value)


class RefusingBroker(MosquittoBroker):
    def config_text(self) -> str:
        return super().config_text().replace("allow_anonymous true", "allow_anonymous false")


def test_refused_connection_raises_runtime_error_without_the_password() -> None:
    refusing = RefusingBroker().start()
    try:
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{refusing.port}") as raised:
            run_simulation(
                SimulationOptions(
                    mqtt_url=refusing.url, username="FlespiToken x", password="s3cret-token"
                )
            )
    finally:
        refusing.cleanup()
    assert "refused" in str(raised.value)
    assert "s3cret-token" not in str(raised.value)


def test_rate_pacing_roughly_holds(broker: MosquittoBroker) -> None:
    report = simulate(broker.url, rate=200, duration=2, retained_snapshot=False, max_messages=None)
    assert 200 <= report.published <= 700
    assert 1.5 <= report.elapsed < 10


def test_stop_event_ends_live_traffic_early(broker: MosquittoBroker) -> None:
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    options = SimulationOptions(mqtt_url=broker.url, devices=3, rate=100, duration=60)
    report = run_simulation(options, stop=stop)
    assert report.elapsed < 5
    assert report.published > 0
