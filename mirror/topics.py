"""flespi topics and payloads → typed records, or a rejection saying why.

Pure: ``decode(message) -> Record | Rejection``. No I/O, no globals that change, no SQL. Every
fact about flespi's topic families lives here (see ``shared/flespi-mqtt.md``):

* telemetry payloads are bare JSON values; their time is the MQTT 5 user property ``timestamp``;
* a zero-length payload on a state topic means the thing was deleted;
* ``.../{id}/deleted`` = ``true`` deletes the whole object.

Records live in ``records.py``, payload and timestamp checks in ``payloads.py``; this module
routes a topic to its family through a declarative table and builds the record.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mirror.payloads import (
    Invalid,
    checked_timestamp,
    digest,
    optional_number,
    parse_json,
    parse_timestamp,
)
from mirror.records import (
    ChannelMessage,
    DeviceMessage,
    Family,
    Inbound,
    IntervalEvent,
    ModemMessage,
    ObjectPropertyUpdate,
    ObjectUpdate,
    PluginConfigUpdate,
    Reason,
    Record,
    Rejection,
    SettingUpdate,
    TelemetryUpdate,
)

MAX_ID = 2**63 - 1


# ---------------------------------------------------------------------------------------------
# Routes: a declarative table of topic shapes. A pattern segment is a literal, ``{name}`` (one
# segment), ``{name:int}`` (one segment, a flespi id) or ``{name*}`` (the rest, one or more).


@dataclass(frozen=True)
class Route:
    pattern: tuple[str, ...]
    family: Family
    build: Callable[[dict[str, Any], Inbound], Record]

    def match(self, segments: Sequence[str]) -> dict[str, Any] | None:
        """Captured fields, or None when the literal shape differs. Raises on a bad id."""
        pattern = self.pattern
        rest = pattern[-1].endswith("*}")
        if rest:
            if len(segments) < len(pattern):
                return None
        elif len(segments) != len(pattern):
            return None
        fields: dict[str, Any] = {}
        for i, part in enumerate(pattern):
            if not part.startswith("{"):
                if segments[i] != part:
                    return None
                continue
            name = part[1:-1]
            if name.endswith("*"):
                tail = segments[i:]
                if any(s == "" for s in tail):
                    return None
                fields[name[:-1]] = tuple(tail)
                break
            if name.endswith(":int"):
                fields[name[:-4]] = segments[i]  # converted after the shape matched
            else:
                if segments[i] == "":
                    return None
                fields[name] = segments[i]
        for part in pattern:
            if part.endswith(":int}"):
                name = part[1:-5]
                fields[name] = _parse_id(fields[name], name)
        return fields


_ID_TEXT = re.compile(r"^[0-9]{1,19}$")


def _parse_id(text: str, name: str) -> int:
    if not _ID_TEXT.match(text) or int(text) > MAX_ID:
        raise Invalid(Reason.INVALID_ID, f"{name} {text[:40]!r} is not a numeric flespi id")
    return int(text)


def _state_value(msg: Inbound) -> str | None:
    """JSON text of a state payload, or None for the zero-length 'deleted' payload."""
    if not msg.payload:
        return None
    return parse_json(msg.payload)[0]


def _telemetry(f: dict[str, Any], msg: Inbound) -> Record:
    ts = parse_timestamp(msg.properties, msg.received_at)
    return TelemetryUpdate(f["device_id"], f["name"], _state_value(msg), ts, msg.received_at)


def _setting(f: dict[str, Any], msg: Inbound) -> Record:
    ts = parse_timestamp(msg.properties, msg.received_at)
    name = "/".join(f["path"])
    return SettingUpdate(f["device_id"], name, _state_value(msg), ts, msg.received_at)


def _plugin_config(f: dict[str, Any], msg: Inbound) -> Record:
    ts = parse_timestamp(msg.properties, msg.received_at)
    return PluginConfigUpdate(
        f["plugin_id"], f["device_id"], _state_value(msg), ts, msg.received_at
    )


def _object_json(msg: Inbound) -> str | None:
    if not msg.payload:
        return None
    text, value = parse_json(msg.payload)
    if not isinstance(value, dict):
        raise Invalid(Reason.WRONG_SHAPE, "a whole-object payload must be a JSON object")
    return text


def _object(f: dict[str, Any], msg: Inbound) -> Record:
    ts = parse_timestamp(msg.properties, msg.received_at)
    return ObjectUpdate(
        f["api"], f["origin"], f["object_id"], _object_json(msg), ts, msg.received_at
    )


def _object_property(f: dict[str, Any], msg: Inbound) -> Record:
    ts = parse_timestamp(msg.properties, msg.received_at)
    path: tuple[str, ...] = f["path"]
    value = _state_value(msg)
    if path == ("deleted",) and value is not None and json.loads(value) is True:
        # The object itself is gone: same as a zero-length payload on the object topic.
        return ObjectUpdate(f["api"], f["origin"], f["object_id"], None, ts, msg.received_at)
    return ObjectPropertyUpdate(
        f["api"], f["origin"], f["object_id"], path, value, ts, msg.received_at
    )


def _customer_id(msg: Inbound) -> int:
    cid = msg.properties.get("cid")
    if cid is None:
        raise Invalid(Reason.INVALID_ID, "account state topic without a cid user property")
    return _parse_id(cid, "cid")


def _customer(f: dict[str, Any], msg: Inbound) -> Record:
    """``flespi/state/platform/customer[/...]``: the account itself, keyed by its cid."""
    fields = {"api": "platform", "origin": "customer", "object_id": _customer_id(msg)}
    if "path" in f:
        return _object_property({**fields, "path": f["path"]}, msg)
    return _object(fields, msg)


_UPSERT_EVENTS = frozenset({"created", "updated", "activated", "deactivated", "active"})


def _interval(f: dict[str, Any], msg: Inbound) -> Record:
    event: str = f["event"]
    if event not in _UPSERT_EVENTS and event != "deleted":
        raise Invalid(Reason.UNKNOWN_TOPIC, f"unknown interval event {event[:40]!r}")
    if not msg.payload:
        raise Invalid(Reason.EMPTY_PAYLOAD, f"interval {event} event without a payload")
    text, value = parse_json(msg.payload)
    if not isinstance(value, dict):
        raise Invalid(Reason.WRONG_SHAPE, "an interval payload must be a JSON object")
    raw_id = value.get("id")
    begin = optional_number(value, "begin")
    if raw_id is not None:
        if isinstance(raw_id, bool) or not isinstance(raw_id, int) or not 0 <= raw_id <= MAX_ID:
            raise Invalid(Reason.WRONG_SHAPE, "interval field 'id' is not an integer id")
        interval_key = f"id:{raw_id}"
    elif begin is not None:
        interval_key = f"begin:{begin!r}"
    else:
        raise Invalid(Reason.WRONG_SHAPE, "an interval needs an 'id' or a 'begin'")
    if begin is not None:
        checked_timestamp(begin, "interval begin")
    end = optional_number(value, "end")
    if end is not None:
        checked_timestamp(end, "interval end")
    fallback = msg.received_at
    if "timestamp" in value:
        fallback = checked_timestamp(value["timestamp"], "interval timestamp")
    ts = parse_timestamp(msg.properties, fallback)
    return IntervalEvent(
        calc_id=f["calc_id"],
        device_id=f["device_id"],
        interval_key=interval_key,
        interval_id=raw_id,
        begin=begin,
        end=end,
        duration=optional_number(value, "duration"),
        event=event,
        data=None if event == "deleted" else text,
        ts=ts,
        received_at=msg.received_at,
    )


def _message_fields(msg: Inbound) -> tuple[str, dict[str, Any], float, float | None]:
    """(text, object, ts, server_ts) of a device/channel/modem message payload."""
    if not msg.payload:
        raise Invalid(Reason.EMPTY_PAYLOAD, "a message topic carried an empty payload")
    text, value = parse_json(msg.payload)
    if not isinstance(value, dict):
        raise Invalid(Reason.WRONG_SHAPE, "a message payload must be a JSON object")
    fallback = parse_timestamp(msg.properties, msg.received_at)
    ts = fallback
    if value.get("timestamp") is not None:
        ts = checked_timestamp(value["timestamp"], "message timestamp")
    server_ts = None
    if value.get("server.timestamp") is not None:
        server_ts = checked_timestamp(value["server.timestamp"], "message server.timestamp")
    return text, value, ts, server_ts


def _ident(value: dict[str, Any]) -> str | None:
    ident = value.get("ident")
    return ident if isinstance(ident, str) else None


def _device_message(f: dict[str, Any], msg: Inbound) -> Record:
    text, value, ts, server_ts = _message_fields(msg)
    return DeviceMessage(
        f["device_id"], ts, server_ts, _ident(value), text, digest(msg.payload), msg.received_at
    )


def _channel_message(f: dict[str, Any], msg: Inbound) -> Record:
    text, _value, ts, server_ts = _message_fields(msg)
    ident = "/".join(f["ident"])
    return ChannelMessage(
        f["channel_id"], ident, ts, server_ts, text, digest(msg.payload), msg.received_at
    )


def _modem_message(f: dict[str, Any], msg: Inbound) -> Record:
    text, _value, ts, _server_ts = _message_fields(msg)
    return ModemMessage(f["modem_id"], f["phone"], ts, text, digest(msg.payload), msg.received_at)


# Order matters: the first route whose shape matches wins, so specific shapes come first.
ROUTES: tuple[Route, ...] = (
    Route(
        ("flespi", "state", "gw", "devices", "{device_id:int}", "telemetry", "{name}"),
        Family.TELEMETRY,
        _telemetry,
    ),
    Route(
        ("flespi", "state", "gw", "devices", "{device_id:int}", "settings", "{path*}"),
        Family.SETTING,
        _setting,
    ),
    Route(
        ("flespi", "state", "gw", "plugins", "{plugin_id:int}", "devices", "{device_id:int}"),
        Family.PLUGIN_CONFIG,
        _plugin_config,
    ),
    Route(("flespi", "state", "platform", "customer"), Family.OBJECT, _customer),
    Route(
        ("flespi", "state", "platform", "customer", "{path*}"), Family.OBJECT_PROPERTY, _customer
    ),
    Route(("flespi", "state", "{api}", "{origin}", "{object_id:int}"), Family.OBJECT, _object),
    Route(
        ("flespi", "state", "{api}", "{origin}", "{object_id:int}", "{path*}"),
        Family.OBJECT_PROPERTY,
        _object_property,
    ),
    Route(
        (
            "flespi",
            "interval",
            "gw",
            "calcs",
            "{calc_id:int}",
            "devices",
            "{device_id:int}",
            "{event}",
        ),
        Family.INTERVAL,
        _interval,
    ),
    Route(
        ("flespi", "message", "gw", "devices", "{device_id:int}"),
        Family.DEVICE_MESSAGE,
        _device_message,
    ),
    Route(
        ("flespi", "message", "gw", "devices", "{device_id:int}", "{name*}"),
        Family.DEVICE_MESSAGE,
        _device_message,
    ),
    Route(
        ("flespi", "message", "gw", "channels", "{channel_id:int}", "{ident*}"),
        Family.CHANNEL_MESSAGE,
        _channel_message,
    ),
    Route(
        ("flespi", "message", "gw", "modems", "{modem_id:int}", "{phone}"),
        Family.MODEM_MESSAGE,
        _modem_message,
    ),
)


def decode(msg: Inbound, max_payload_bytes: int = 1024 * 1024) -> Record | Rejection:
    """Turn one received message into a record, or a rejection saying why. Never raises."""
    segments = msg.topic.split("/")
    family = Family.UNKNOWN
    try:
        for route in ROUTES:
            fields = route.match(segments)
            if fields is None:
                continue
            family = route.family
            if len(msg.payload) > max_payload_bytes:
                raise Invalid(
                    Reason.PAYLOAD_TOO_LARGE,
                    f"payload of {len(msg.payload)} bytes exceeds the {max_payload_bytes} limit",
                )
            return route.build(fields, msg)
        return Rejection(Reason.UNKNOWN_TOPIC, "topic matches no flespi topic family")
    except Invalid as rejection:
        return Rejection(rejection.reason, rejection.detail, family)
    except Exception as exc:  # a decoder bug must cost one message, never the stream
        return Rejection(Reason.WRONG_SHAPE, f"could not decode: {type(exc).__name__}", family)
