"""The simulator's flespi REST API over MQTT, answered from its own record of the account.

:class:`AccountRecord` keeps what the simulated account holds, built from every publication
the simulator makes (also those made while no mirror was subscribed): each device's messages
(flespi's message storage), calculator intervals, and the current state (devices, telemetry,
settings, plugin configurations). :class:`RestResponder` answers requests published to
``flespi/rest/{method}/{api-uri}`` from it, following flespi's public REST docs for the
endpoints the mirror calls (see ``docs/flespi-shapes.md``): the ``{"result": [...]}`` envelope,
``{"errors": [{"code", "reason"}]}`` with an HTTP code, the answer on the Response Topic with the
Correlation Data echoed, ``response_chunked`` answers cut into pieces whose last carries the
user property ``http_code``. Its ``behaviour`` can turn it into a faulty flespi for tests:
errors, slow answers, no answers.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mirror.sim.traffic import Publication

log = logging.getLogger(__name__)

REQUEST_FILTER = "flespi/rest/#"


class _NotFound(Exception):
    pass


@dataclass
class _Device:
    props: bytes | None = None  # the whole-object JSON, None until published
    telemetry: dict[str, tuple[Any, float]] = field(default_factory=dict)  # param -> (value, ts)
    settings: dict[str, Any] = field(default_factory=dict)
    messages: dict[float, bytes] = field(default_factory=dict)  # timestamp -> payload


class AccountRecord:
    """What the simulated flespi account holds. Thread-safe: the publisher and the responder
    run in different threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[int, _Device] = {}
        self._plugin_configs: dict[tuple[int, int], Any] = {}  # (plugin, device) -> config
        self._intervals: dict[tuple[int, int], dict[int, bytes]] = {}  # (calc, dev) -> id -> json

    # -- recording -------------------------------------------------------------------------

    def observe(
        self, topic: str, payload: bytes, timestamp: float, interval: int | None = None
    ) -> None:
        """Record one publication the account made (``timestamp``: its user property;
        ``interval``: the simulator's identity of an interval its event does not name)."""
        levels = topic.split("/")
        with self._lock:
            if levels[:4] == ["flespi", "message", "gw", "devices"] and len(levels) >= 5:
                value = json.loads(payload)
                self._device(int(levels[4])).messages[float(value["timestamp"])] = payload
            elif levels[:4] == ["flespi", "interval", "gw", "calcs"] and len(levels) == 8:
                self._interval(int(levels[4]), int(levels[6]), levels[7], payload, interval)
            elif levels[:4] == ["flespi", "state", "gw", "devices"] and len(levels) >= 5:
                self._device_state(int(levels[4]), levels[5:], payload, timestamp)
            elif levels[:4] == ["flespi", "state", "gw", "plugins"] and len(levels) == 7:
                key = (int(levels[4]), int(levels[6]))
                if payload:
                    self._plugin_configs[key] = json.loads(payload)
                else:
                    self._plugin_configs.pop(key, None)

    def published(self, publication: Publication, timestamp: float) -> None:
        """A ``run_simulation`` observer: what the simulator publishes goes into the record."""
        self.observe(publication.topic, publication.payload, timestamp, publication.interval)

    def _device(self, device_id: int) -> _Device:
        return self._devices.setdefault(device_id, _Device())

    def _interval(
        self, calc_id: int, device_id: int, event: str, payload: bytes, identity: int | None
    ) -> None:
        """Intervals are kept by flespi's id, or by the simulator's identity of one whose
        events carry none; the REST answer lists each as it was last published (without an
        id when its events have none: what flespi lists for such a calculator is
        UNCONFIRMED)."""
        if event == "finished":  # a legacy name for the interval's last update
            event = "updated"
        if event not in ("created", "updated", "deleted"):
            return  # activation events: the calculator's state, not an interval
        interval = json.loads(payload)
        intervals = self._intervals.setdefault((calc_id, device_id), {})
        key = interval.get("id", identity)
        if key is None and event == "deleted":  # a deletion published by hand: by its span
            span = (interval.get("begin"), interval.get("end"))
            key = next((k for k, p in intervals.items() if _span(p) == span), None)
        if key is None:
            raise ValueError(f"an interval event without an id or the simulator's: {payload!r}")
        if event == "deleted":
            intervals.pop(int(key), None)
        else:
            intervals[int(key)] = payload

    def _device_state(
        self, device_id: int, rest: list[str], payload: bytes, timestamp: float
    ) -> None:
        if not rest:  # the device object itself
            if payload:
                self._device(device_id).props = payload
            else:  # the device is deleted, with its state (its stored messages too)
                self._devices.pop(device_id, None)
                for key in [k for k in self._plugin_configs if k[1] == device_id]:
                    del self._plugin_configs[key]
            return
        device = self._device(device_id)
        if rest[0] == "telemetry" and len(rest) == 2:
            if payload:
                device.telemetry[rest[1]] = (json.loads(payload), timestamp)
            else:
                device.telemetry.pop(rest[1], None)
        elif rest[0] == "settings" and len(rest) == 2:
            if payload:
                device.settings[rest[1]] = json.loads(payload)
            else:
                device.settings.pop(rest[1], None)

    # -- what the account holds ------------------------------------------------------------

    def message_count(self) -> int:
        with self._lock:
            return sum(len(d.messages) for d in self._devices.values())

    def messages(self) -> list[tuple[int, bytes]]:
        """Every stored message as (device id, payload)."""
        with self._lock:
            return [(i, p) for i, d in self._devices.items() for p in d.messages.values()]

    def intervals(self) -> list[tuple[int, int, int | tuple[float, float]]]:
        """Every current interval as (calc id, device id, identity): flespi's interval id, or
        (begin, end) of an interval published without one."""
        listed: list[tuple[int, int, int | tuple[float, float]]] = []
        with self._lock:
            for (calc, device), found in self._intervals.items():
                for key, payload in found.items():
                    has_id = "id" in json.loads(payload)
                    listed.append((calc, device, key if has_id else _span(payload)))
        return listed

    # -- answering -------------------------------------------------------------------------

    def answer(self, method: str, uri: str, data: dict[str, Any]) -> tuple[int, bytes]:
        """(HTTP code, body) of one REST call."""
        if method != "get":
            return _error(405, f"method {method.upper()} is not simulated")
        levels = uri.strip("/").split("/")
        try:
            with self._lock:
                if levels[:2] == ["gw", "devices"]:
                    return 200, self._devices_answer(levels[2:], data)
                if levels[:2] == ["gw", "plugins"] and len(levels) == 5:
                    return 200, self._plugin_devices(levels[2], levels[4])
                if levels[:2] == ["gw", "calcs"] and len(levels) == 7:
                    return 200, self._intervals_answer(levels[2], levels[4], data)
                if levels == ["gw", "calcs", "all"]:
                    return 200, _result({"id": c} for c in sorted({c for c, _ in self._intervals}))
                if levels[:1] == ["gw"] and len(levels) == 3:
                    return 200, _result([])  # channels, modems, ...: none are items here
        except _NotFound as exc:
            return _error(404, str(exc))
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"bad request: {exc}")
        return _error(404, f"unknown REST path {uri[:100]!r}")

    def _select(self, selector: str) -> list[int]:
        if selector == "all":
            return sorted(i for i, d in self._devices.items() if d.props is not None)
        if selector.startswith("cid="):  # flespi's field selector, on the account id
            cid = int(selector[4:])
            return sorted(
                i
                for i, d in self._devices.items()
                if d.props is not None and json.loads(d.props).get("cid") == cid
            )
        return [int(part) for part in selector.split(",")]

    def _devices_answer(self, rest: list[str], data: dict[str, Any]) -> bytes:
        if not rest:
            raise _NotFound("no device selector")
        ids = self._select(rest[0])
        tail = rest[1:]
        if not tail:
            return _result_raw(self._devices[i].props or b"{}" for i in ids if i in self._devices)
        if tail == ["messages"]:
            return _result_raw(self._message_page(ids, data))
        if tail == ["telemetry", "all"]:
            return _result(
                {
                    "id": i,
                    "telemetry": {
                        name: {"value": value, "ts": ts}
                        for name, (value, ts) in self._devices[i].telemetry.items()
                    },
                }
                for i in ids
                if i in self._devices
            )
        if tail == ["settings", "all"]:
            return _result(
                {"device_id": i, "name": name, "current": value}
                for i in ids
                if i in self._devices
                for name, value in self._devices[i].settings.items()
            )
        raise _NotFound(f"unknown device path {'/'.join(tail)[:100]!r}")

    def _message_page(self, ids: list[int], data: dict[str, Any]) -> list[bytes]:
        begin = float(data.get("from", 0))
        end = float(data.get("to", 2**32))
        count = int(data.get("count", 0)) or None
        found = sorted(
            (ts, i, payload)
            for i in ids
            if i in self._devices
            for ts, payload in self._devices[i].messages.items()
            if begin <= ts <= end
        )
        return [payload for _, _, payload in found[:count]]

    def _plugin_devices(self, plugin_selector: str, device_selector: str) -> bytes:
        plugins = None if plugin_selector == "all" else {int(p) for p in plugin_selector.split(",")}
        devices = None if device_selector == "all" else set(self._select(device_selector))
        return _result(
            {"plugin_id": plugin, "id": device, "config": config}
            for (plugin, device), config in sorted(self._plugin_configs.items())
            if (plugins is None or plugin in plugins) and (devices is None or device in devices)
        )

    def _intervals_answer(self, calc: str, device: str, data: dict[str, Any]) -> bytes:
        begin = float(data.get("begin", 0))
        end = float(data.get("end", 2**32))
        calc_id, device_id = int(calc), int(device)
        intervals = self._intervals.get((calc_id, device_id), {})
        picked = []
        for payload in intervals.values():
            interval = json.loads(payload)
            if float(interval["end"]) >= begin and float(interval["begin"]) <= end:
                picked.append(payload)
        return _result_raw(picked)


def _span(payload: bytes) -> tuple[Any, Any]:
    interval = json.loads(payload)
    return interval.get("begin"), interval.get("end")


def _result(items: Iterable[Any]) -> bytes:
    return json.dumps({"result": list(items)}, separators=(",", ":")).encode()


def _result_raw(payloads: Iterable[bytes]) -> bytes:
    """The envelope around JSON texts kept as they were published."""
    return b'{"result":[' + b",".join(payloads) + b"]}"


def _error(code: int, reason: str) -> tuple[int, bytes]:
    return code, json.dumps({"errors": [{"code": code, "reason": reason}]}).encode()


# ------------------------------------------------------------------------------------------------
# The MQTT side


@dataclass
class Behaviour:
    """How the simulated flespi answers; tests change it to play a faulty flespi."""

    error_code: int | None = None  # answer every request with this HTTP error
    errors_left: int | None = None  # ... only this many times (None: always)
    delay: float = 0.0  # seconds before answering
    silent: bool = False  # never answer
    chunk_bytes: int = 64 * 1024  # size of the pieces of a chunked answer


class RestResponder:
    """A paho MQTT 5 client that answers ``flespi/rest/...`` requests from an AccountRecord."""

    def __init__(
        self,
        mqtt_url: str,
        record: AccountRecord,
        behaviour: Behaviour | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        parts = urlsplit(mqtt_url)
        tls = parts.scheme == "mqtts"
        self._address = (parts.hostname or "127.0.0.1", parts.port or (8883 if tls else 1883))
        self.record = record
        self.behaviour = behaviour or Behaviour()
        self.requests = 0
        self.asked: list[str] = []  # the URI of every request, in arrival order
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"flespi-rest-sim-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        if tls:
            self.client.tls_set()
        if username is not None or password is not None:
            self.client.username_pw_set(username or "", password)
        self._stopped = threading.Event()
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *_args: self._subscribed.set()
        self.client.on_connect = lambda c, *_args: c.subscribe(REQUEST_FILTER, qos=1)

    def start(self) -> RestResponder:
        self.client.connect(*self._address, keepalive=30, clean_start=True)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.stop()
            raise RuntimeError("the REST responder could not subscribe to flespi/rest/#")
        return self

    def stop(self) -> None:
        self._stopped.set()
        self.client.disconnect()
        self.client.loop_stop()

    def serve_forever(self) -> None:
        """Block, answering in paho's thread, until stopped (or interrupted)."""
        self._stopped.wait()

    def _on_message(self, client: mqtt.Client, _userdata: Any, message: Any) -> None:
        self.requests += 1
        levels = message.topic.split("/", 3)
        if len(levels) < 4:
            return
        method, uri = levels[2], levels[3]
        self.asked.append(uri)
        props = message.properties
        user = dict(getattr(props, "UserProperty", []) or [])
        response_topic = getattr(props, "ResponseTopic", None) or message.topic
        correlation = getattr(props, "CorrelationData", None)
        behaviour = self.behaviour
        if behaviour.silent:
            return
        try:
            data = json.loads(message.payload) if message.payload else {}
        except ValueError:
            code, body = _error(400, "data is not JSON")
        else:
            code, body = self.record.answer(method, uri, data if isinstance(data, dict) else {})
        if behaviour.error_code is not None and behaviour.errors_left != 0:
            code, body = _error(behaviour.error_code, "simulated failure")
            if behaviour.errors_left is not None:
                behaviour.errors_left -= 1
        chunked = user.get("response_chunked") == "true"
        answer = (response_topic, correlation, code, body, chunked)
        if behaviour.delay > 0:
            threading.Timer(behaviour.delay, self._send, answer).start()
        else:
            self._send(*answer)

    def _send(
        self, topic: str, correlation: bytes | None, code: int, body: bytes, chunked: bool
    ) -> None:
        size = max(1, self.behaviour.chunk_bytes) if chunked else max(1, len(body))
        pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
        for n, piece in enumerate(pieces):
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if correlation is not None:
                properties.CorrelationData = correlation
            if n == len(pieces) - 1:
                properties.UserProperty = [("http_code", str(code))]
            self.client.publish(topic, piece, qos=1, properties=properties)


__all__ = ["AccountRecord", "Behaviour", "RestResponder"]
