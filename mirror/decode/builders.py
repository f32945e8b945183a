"""Build one family's record from a matched topic and its payload. Pure.

A builder gets the fields the route captured from the topic (ids already parsed), the message,
and the account id (``cid``) the message belongs to, and returns a record or raises
:class:`~mirror.payloads.Invalid`. Which topic reaches which builder is declared in
``families.py``; every flespi fact about payloads lives here or in ``payloads.py``.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from mirror.decode.payloads import (
    Invalid,
    checked_timestamp,
    digest,
    optional_number,
    parse_json,
    parse_timestamp,
    track,
)
from mirror.decode.records import (
    CalculatorDeviceUpdate,
    ChannelMessage,
    DeviceMessage,
    Inbound,
    IntervalEvent,
    ModemMessage,
    ObjectPropertyUpdate,
    ObjectUpdate,
    OtherMessage,
    PlatformLog,
    PluginConfigUpdate,
    Reason,
    Record,
    SettingUpdate,
    TelemetryUpdate,
)

MAX_ID = 2**63 - 1

Fields = dict[str, Any]


class Builder(Protocol):
    def __call__(self, f: Fields, msg: Inbound, cid: int | None, /) -> Record: ...


def parse_id(text: str, name: str) -> int:
    """A flespi id: decimal digits, 0 .. 2**63-1 (it goes into a bigint)."""
    if not (0 < len(text) <= 19 and text.isascii() and text.isdigit()) or int(text) > MAX_ID:
        raise Invalid(Reason.INVALID_ID, f"{name} {text[:40]!r} is not a numeric flespi id")
    return int(text)


def _state_value(msg: Inbound) -> str | None:
    """JSON text of a state payload, or None for the zero-length 'deleted' payload."""
    if not msg.payload:
        return None
    return parse_json(msg.payload)[0]


def _ts(msg: Inbound) -> float:
    return parse_timestamp(msg.properties, msg.received_at, msg.received_at)


def telemetry(f: Fields, msg: Inbound, cid: int | None) -> Record:
    expires_at = None
    if msg.message_expiry is not None:  # what is left of it when the broker sent it
        expires_at = msg.received_at + msg.message_expiry
    return TelemetryUpdate(
        f["device_id"], f["name"], _state_value(msg), _ts(msg), msg.received_at, cid, expires_at
    )


def setting(f: Fields, msg: Inbound, cid: int | None) -> Record:
    name = "/".join(f["path"])
    return SettingUpdate(f["device_id"], name, _state_value(msg), _ts(msg), msg.received_at, cid)


def plugin_config(f: Fields, msg: Inbound, cid: int | None) -> Record:
    return PluginConfigUpdate(
        f["plugin_id"], f["device_id"], _state_value(msg), _ts(msg), msg.received_at, cid
    )


def _object_json(msg: Inbound) -> str | None:
    if not msg.payload:
        return None
    text, value = parse_json(msg.payload)
    if not isinstance(value, dict):
        raise Invalid(Reason.WRONG_SHAPE, "a whole-object payload must be a JSON object")
    return text


def whole_object(f: Fields, msg: Inbound, cid: int | None) -> Record:
    return ObjectUpdate(
        f["api"], f["origin"], f["object_id"], _object_json(msg), _ts(msg), msg.received_at, cid
    )


def object_property(f: Fields, msg: Inbound, cid: int | None) -> Record:
    path: tuple[str, ...] = f["path"]
    value = _state_value(msg)
    ts = _ts(msg)
    if path == ("deleted",) and value is not None and json.loads(value) is True:
        # The object itself is gone: same as a zero-length payload on the object topic.
        return ObjectUpdate(f["api"], f["origin"], f["object_id"], None, ts, msg.received_at, cid)
    return ObjectPropertyUpdate(
        f["api"], f["origin"], f["object_id"], path, value, ts, msg.received_at, cid
    )


def customer(f: Fields, msg: Inbound, cid: int | None) -> Record:
    """``flespi/state/platform/customer[/...]``: the account itself, keyed by its cid."""
    if cid is None:
        raise Invalid(Reason.INVALID_ID, "account state topic without a cid user property")
    fields = {"api": "platform", "origin": "customer", "object_id": cid}
    if "path" in f:
        return object_property({**fields, "path": f["path"]}, msg, cid)
    return whole_object(fields, msg, cid)


def interval_identity(
    value: dict[str, Any], event: str
) -> tuple[str, int | None, float | None, float | None]:
    """(key, id, begin, end). The key of a new row: flespi's id, else the begin. Which stored
    row an event is about is decided in SQL (migration 0004): by id, else by the time span the
    event shares with it, so an update that moves ``begin`` or a ``deleted`` payload that
    carries only some of the fields still finds its row. The payload of ``deleted`` is
    UNCONFIRMED: it is accepted with any of ``id``, ``begin``, ``end``."""
    raw_id = value.get("id")
    begin = optional_number(value, "begin")
    end = optional_number(value, "end")
    if raw_id is not None:
        if isinstance(raw_id, bool) or not isinstance(raw_id, int) or not 0 <= raw_id <= MAX_ID:
            raise Invalid(Reason.WRONG_SHAPE, "interval field 'id' is not an integer id")
        return f"id:{raw_id}", raw_id, begin, end
    if begin is not None:
        return f"begin:{begin!r}", None, begin, end
    if event == "deleted" and end is not None:
        return f"end:{end!r}", None, None, end
    if event == "deleted":
        raise Invalid(
            Reason.WRONG_SHAPE,
            "a deleted interval without 'id', 'begin' or 'end': nothing says which interval",
        )
    raise Invalid(Reason.WRONG_SHAPE, "an interval needs an 'id' or a 'begin'")


def calculator_device(f: Fields, msg: Inbound, cid: int | None) -> Record:
    """``flespi/state/gw/calcs/{calc}/devices/{dev}/last|active|synced`` (retained)."""
    last_active = None
    if f["field"] == "last":  # flespi's KB: a user property 'active' (true/false) on last
        last_active = {"true": True, "false": False}.get(msg.properties.get("active", ""))
    return CalculatorDeviceUpdate(
        f["calc_id"], f["device_id"], f["field"], _state_value(msg), _ts(msg), msg.received_at,
        cid, last_active,
    )  # fmt: skip


# Activation events describe the calculator's state for the device, not an interval: they set
# calculator_devices.active and leave the interval rows alone. Their payloads are UNCONFIRMED:
# we take ``activated`` (and the documented ``active``) to carry the active interval, and
# ``deactivated`` to mean there is none (JSON null), whatever its payload.
_ACTIVATION_EVENTS = frozenset({"activated", "active", "deactivated"})


def _interval_payload(event: str, msg: Inbound) -> tuple[str, dict[str, Any]]:
    if not msg.payload:
        raise Invalid(Reason.EMPTY_PAYLOAD, f"interval {event} event without a payload")
    text, value = parse_json(msg.payload)
    if not isinstance(value, dict):
        raise Invalid(Reason.WRONG_SHAPE, "an interval payload must be a JSON object")
    return text, value


def _activation(f: Fields, msg: Inbound, cid: int | None) -> Record:
    event: str = f["event"]
    fallback = msg.received_at
    text = "null"
    if event != "deactivated":
        text, value = _interval_payload(event, msg)
        if "timestamp" in value:
            fallback = checked_timestamp(value["timestamp"], "interval timestamp", msg.received_at)
    ts = parse_timestamp(msg.properties, fallback, msg.received_at)
    return CalculatorDeviceUpdate(
        f["calc_id"], f["device_id"], "active", text, ts, msg.received_at, cid
    )


def interval(f: Fields, msg: Inbound, cid: int | None) -> Record:
    event: str = f["event"]
    if event == "finished":  # a legacy name flespi's UI still handles: the interval's last update
        event = "updated"
    if event in _ACTIVATION_EVENTS:
        return _activation(f, msg, cid)
    text, value = _interval_payload(event, msg)
    interval_key, raw_id, begin, end = interval_identity(value, event)
    if begin is not None:
        checked_timestamp(begin, "interval begin", msg.received_at)
    if end is not None:
        checked_timestamp(end, "interval end", msg.received_at)
    fallback = msg.received_at
    if "timestamp" in value:
        fallback = checked_timestamp(value["timestamp"], "interval timestamp", msg.received_at)
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
        ts=parse_timestamp(msg.properties, fallback, msg.received_at),
        received_at=msg.received_at,
        cid=cid,
    )


def _message_fields(msg: Inbound) -> tuple[str, dict[str, Any], float, float | None]:
    """(text, object, ts, server_ts) of a device/channel/modem message payload."""
    if not msg.payload:
        raise Invalid(Reason.EMPTY_PAYLOAD, "a message topic carried an empty payload")
    text, value = parse_json(msg.payload)
    if not isinstance(value, dict):
        raise Invalid(Reason.WRONG_SHAPE, "a message payload must be a JSON object")
    ts = _ts(msg)
    if value.get("timestamp") is not None:
        ts = checked_timestamp(value["timestamp"], "message timestamp", msg.received_at)
    server_ts = None
    if value.get("server.timestamp") is not None:
        server_ts = checked_timestamp(
            value["server.timestamp"], "message server.timestamp", msg.received_at
        )
    return text, value, ts, server_ts


def _ident(value: dict[str, Any]) -> str | None:
    ident = value.get("ident")
    return ident if isinstance(ident, str) else None


def device_message(f: Fields, msg: Inbound, cid: int | None) -> Record:
    text, value, ts, server_ts = _message_fields(msg)
    return DeviceMessage(
        f["device_id"],
        ts,
        server_ts,
        _ident(value),
        text,
        digest(msg.payload),
        msg.received_at,
        cid,
        *track(value),
    )


def channel_message(f: Fields, msg: Inbound, cid: int | None) -> Record:
    text, _value, ts, server_ts = _message_fields(msg)
    ident = "/".join(f["ident"])
    return ChannelMessage(
        f["channel_id"], ident, ts, server_ts, text, digest(msg.payload), msg.received_at, cid
    )


def modem_message(f: Fields, msg: Inbound, cid: int | None) -> Record:
    text, _value, ts, _server_ts = _message_fields(msg)
    return ModemMessage(
        f["modem_id"], f["phone"], ts, text, digest(msg.payload), msg.received_at, cid
    )


def _record_time(value: Any, msg: Inbound) -> float:
    """A record's own ``timestamp`` when it is a JSON object with one, else the property's."""
    if isinstance(value, dict) and value.get("timestamp") is not None:
        return checked_timestamp(value["timestamp"], "payload timestamp", msg.received_at)
    return _ts(msg)


def platform_log(f: Fields, msg: Inbound, cid: int | None) -> Record:
    """``flespi/log/{api}/{origin...}/{event}``: the last level is the event type."""
    if not msg.payload:
        raise Invalid(Reason.EMPTY_PAYLOAD, "a log topic carried an empty payload")
    text, value = parse_json(msg.payload)
    if not isinstance(value, dict):
        raise Invalid(Reason.WRONG_SHAPE, "a log record must be a JSON object")
    levels: tuple[str, ...] = (f["origin"], *f["rest"])
    code = value.get("event_code")
    if isinstance(code, bool) or not isinstance(code, int) or abs(code) > MAX_ID:
        code = None  # an event code we cannot read stays in the payload
    return PlatformLog(
        f["api"],
        "/".join(levels[:-1]),
        levels[-1],
        _record_time(value, msg),
        code,
        text,
        digest(msg.payload),
        msg.received_at,
        cid,
    )


def other_message(f: Fields, msg: Inbound, cid: int | None) -> Record:
    if not msg.payload:
        raise Invalid(Reason.EMPTY_PAYLOAD, "a message topic carried an empty payload")
    text, value = parse_json(msg.payload)
    return OtherMessage(
        msg.topic, _record_time(value, msg), text, digest(msg.payload), msg.received_at, cid
    )
