"""flespi topics and payloads → typed records, or a rejection saying why.

Pure: ``decode(message) -> Record | Rejection``. No I/O, no globals that change, no SQL. Every
fact about flespi's topic families lives here (see ``shared/flespi-mqtt.md``):

* telemetry payloads are bare JSON values; their time is the MQTT 5 user property ``timestamp``;
* a zero-length payload on a state topic means the thing was deleted;
* ``.../{id}/deleted`` = ``true`` deletes the whole object.

JSON payloads are validated here but kept as their original text, so PostgreSQL stores exactly
what flespi sent (numbers keep their precision). Everything PostgreSQL's ``jsonb`` would refuse
(NaN, ``\\u0000``, lone surrogates, absurd nesting) is rejected here instead, so one bad message
can never fail a whole batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeAlias

# Timestamps outside this window are absurd for flespi data (2000-01-01 .. 2100-01-01).
MIN_TIMESTAMP = 946_684_800.0
MAX_TIMESTAMP = 4_102_444_800.0
MAX_JSON_DEPTH = 64
MAX_ID = 2**63 - 1


class Reason(StrEnum):
    """Why a message could not be mirrored. A bounded set: it is a metric label."""

    UNKNOWN_TOPIC = "unknown_topic"
    INVALID_ID = "invalid_id"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    INVALID_UTF8 = "invalid_utf8"
    MALFORMED_JSON = "malformed_json"
    NON_FINITE_NUMBER = "non_finite_number"
    TOO_DEEPLY_NESTED = "too_deeply_nested"
    UNSUPPORTED_UNICODE = "unsupported_unicode"
    INVALID_TIMESTAMP = "invalid_timestamp"
    WRONG_SHAPE = "wrong_shape"
    EMPTY_PAYLOAD = "empty_payload"
    DATABASE_REJECTED = "database_rejected"


class Family(StrEnum):
    """Topic families, for metrics and logs."""

    TELEMETRY = "telemetry"
    SETTING = "setting"
    PLUGIN_CONFIG = "plugin_config"
    OBJECT = "object"
    OBJECT_PROPERTY = "object_property"
    INTERVAL = "interval"
    DEVICE_MESSAGE = "device_message"
    CHANNEL_MESSAGE = "channel_message"
    MODEM_MESSAGE = "modem_message"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Inbound:
    """One message as received from the broker."""

    topic: str
    payload: bytes
    properties: Mapping[str, str]
    received_at: float
    retain: bool = False
    qos: int = 1


# ---------------------------------------------------------------------------------------------
# Records. ``None`` in the value field of a state record means "deleted as of ts".


@dataclass(frozen=True, slots=True)
class TelemetryUpdate:
    device_id: int
    name: str
    value: str | None
    ts: float
    received_at: float
    family = Family.TELEMETRY

    @property
    def key(self) -> tuple[Any, ...]:
        return ("telemetry", self.device_id, self.name)


@dataclass(frozen=True, slots=True)
class SettingUpdate:
    """``settings/{name}`` and deeper ``settings/{name}/{field}/...`` levels.

    flespi's deeper levels are UNCONFIRMED; we keep each level as its own row, named by the
    path below ``settings/`` joined with ``/`` (``name`` or ``name/field``). Nothing is lost
    and both readings stay queryable.
    """

    device_id: int
    name: str
    value: str | None
    ts: float
    received_at: float
    family = Family.SETTING

    @property
    def key(self) -> tuple[Any, ...]:
        return ("device_settings", self.device_id, self.name)


@dataclass(frozen=True, slots=True)
class PluginConfigUpdate:
    plugin_id: int
    device_id: int
    config: str | None
    ts: float
    received_at: float
    family = Family.PLUGIN_CONFIG

    @property
    def key(self) -> tuple[Any, ...]:
        return ("plugin_device_configs", self.plugin_id, self.device_id)


@dataclass(frozen=True, slots=True)
class ObjectUpdate:
    """The whole object (``props`` a JSON object) or its deletion (``props`` None)."""

    api: str
    origin: str
    object_id: int
    props: str | None
    ts: float
    received_at: float
    family = Family.OBJECT

    @property
    def key(self) -> tuple[Any, ...]:
        return ("objects", self.api, self.origin, self.object_id)


@dataclass(frozen=True, slots=True)
class ObjectPropertyUpdate:
    """One property (``path`` may be nested: ``connections/123``) or its removal."""

    api: str
    origin: str
    object_id: int
    path: tuple[str, ...]
    value: str | None
    ts: float
    received_at: float
    family = Family.OBJECT_PROPERTY

    @property
    def key(self) -> tuple[Any, ...]:
        return ("object_properties", self.api, self.origin, self.object_id, self.path)


@dataclass(frozen=True, slots=True)
class IntervalEvent:
    """A calculator interval. ``data`` None means the interval was deleted.

    Key: flespi's interval ``id`` when the payload has one (automated calculators), else its
    ``begin``: ``interval_key`` is ``"id:<id>"`` or ``"begin:<begin>"``.
    """

    calc_id: int
    device_id: int
    interval_key: str
    interval_id: int | None
    begin: float | None
    end: float | None
    duration: float | None
    event: str
    data: str | None
    ts: float
    received_at: float
    family = Family.INTERVAL

    @property
    def key(self) -> tuple[Any, ...]:
        return ("intervals", self.calc_id, self.device_id, self.interval_key)


@dataclass(frozen=True, slots=True)
class DeviceMessage:
    device_id: int
    ts: float
    server_ts: float | None
    ident: str | None
    payload: str
    digest: bytes
    received_at: float
    family = Family.DEVICE_MESSAGE

    @property
    def key(self) -> tuple[Any, ...]:
        return ("device_messages", self.device_id, self.ts, self.digest)


@dataclass(frozen=True, slots=True)
class ChannelMessage:
    channel_id: int
    ident: str
    ts: float
    server_ts: float | None
    payload: str
    digest: bytes
    received_at: float
    family = Family.CHANNEL_MESSAGE

    @property
    def key(self) -> tuple[Any, ...]:
        return ("channel_messages", self.channel_id, self.ident, self.ts, self.digest)


@dataclass(frozen=True, slots=True)
class ModemMessage:
    modem_id: int
    phone: str
    ts: float
    payload: str
    digest: bytes
    received_at: float
    family = Family.MODEM_MESSAGE

    @property
    def key(self) -> tuple[Any, ...]:
        return ("modem_messages", self.modem_id, self.phone, self.ts, self.digest)


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: Reason
    detail: str
    family: Family = Family.UNKNOWN


StateRecord: TypeAlias = (
    TelemetryUpdate
    | SettingUpdate
    | PluginConfigUpdate
    | ObjectUpdate
    | ObjectPropertyUpdate
    | IntervalEvent
)
HistoryRecord: TypeAlias = DeviceMessage | ChannelMessage | ModemMessage
Record: TypeAlias = StateRecord | HistoryRecord


class _Reject(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Payload validation


def _reject_constant(name: str) -> Any:
    raise _Reject(Reason.NON_FINITE_NUMBER, f"JSON constant {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Reject(Reason.NON_FINITE_NUMBER, f"number {text[:40]} overflows a double")
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a decoded JSON value, stopping as soon as ``limit`` is passed."""
    if not isinstance(value, dict | list):
        return 0
    deepest = 1
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return depth
        deepest = max(deepest, depth)
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return deepest


def parse_json(payload: bytes) -> tuple[str, Any]:
    """Validate a payload as JSON that PostgreSQL's jsonb accepts; return (text, value)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Reject(Reason.INVALID_UTF8, f"payload is not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except _Reject:
        raise
    except RecursionError:
        raise _Reject(Reason.TOO_DEEPLY_NESTED, "JSON nesting too deep to parse") from None
    except ValueError as exc:
        raise _Reject(Reason.MALFORMED_JSON, f"malformed JSON: {str(exc)[:120]}") from None
    if "\x00" in text or "\\u0000" in text:
        raise _Reject(Reason.UNSUPPORTED_UNICODE, "JSON text holds U+0000, which jsonb refuses")
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise _Reject(
                Reason.UNSUPPORTED_UNICODE, "JSON text holds an unpaired surrogate escape"
            ) from None
    if isinstance(value, dict | list) and _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise _Reject(Reason.TOO_DEEPLY_NESTED, f"JSON nested deeper than {MAX_JSON_DEPTH}")
    return text, value


def parse_timestamp(properties: Mapping[str, str], fallback: float) -> float:
    raw = properties.get("timestamp")
    if raw is None:
        return fallback
    return checked_timestamp(raw, "user property timestamp")


def checked_timestamp(raw: Any, what: str) -> float:
    if isinstance(raw, bool):
        raise _Reject(Reason.INVALID_TIMESTAMP, f"{what} is a boolean")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise _Reject(
            Reason.INVALID_TIMESTAMP, f"{what} {str(raw)[:40]!r} is not a number"
        ) from None
    if not (MIN_TIMESTAMP <= value < MAX_TIMESTAMP):
        raise _Reject(Reason.INVALID_TIMESTAMP, f"{what} {str(raw)[:40]} is outside 2000..2100")
    return value


def _optional_number(obj: Mapping[str, Any], field: str) -> float | None:
    value = obj.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Reject(Reason.WRONG_SHAPE, f"field {field!r} is not a number")
    return float(value)


def _digest(payload: bytes) -> bytes:
    # Identity of a history message, so a redelivered copy is stored once. Not a security use.
    return hashlib.md5(payload, usedforsecurity=False).digest()


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
        raise _Reject(Reason.INVALID_ID, f"{name} {text[:40]!r} is not a numeric flespi id")
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
        raise _Reject(Reason.WRONG_SHAPE, "a whole-object payload must be a JSON object")
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
        raise _Reject(Reason.INVALID_ID, "account state topic without a cid user property")
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
        raise _Reject(Reason.UNKNOWN_TOPIC, f"unknown interval event {event[:40]!r}")
    if not msg.payload:
        raise _Reject(Reason.EMPTY_PAYLOAD, f"interval {event} event without a payload")
    text, value = parse_json(msg.payload)
    if not isinstance(value, dict):
        raise _Reject(Reason.WRONG_SHAPE, "an interval payload must be a JSON object")
    raw_id = value.get("id")
    begin = _optional_number(value, "begin")
    if raw_id is not None:
        if isinstance(raw_id, bool) or not isinstance(raw_id, int) or not 0 <= raw_id <= MAX_ID:
            raise _Reject(Reason.WRONG_SHAPE, "interval field 'id' is not an integer id")
        interval_key = f"id:{raw_id}"
    elif begin is not None:
        interval_key = f"begin:{begin!r}"
    else:
        raise _Reject(Reason.WRONG_SHAPE, "an interval needs an 'id' or a 'begin'")
    if begin is not None:
        checked_timestamp(begin, "interval begin")
    end = _optional_number(value, "end")
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
        duration=_optional_number(value, "duration"),
        event=event,
        data=None if event == "deleted" else text,
        ts=ts,
        received_at=msg.received_at,
    )


def _message_fields(msg: Inbound) -> tuple[str, dict[str, Any], float, float | None]:
    """(text, object, ts, server_ts) of a device/channel/modem message payload."""
    if not msg.payload:
        raise _Reject(Reason.EMPTY_PAYLOAD, "a message topic carried an empty payload")
    text, value = parse_json(msg.payload)
    if not isinstance(value, dict):
        raise _Reject(Reason.WRONG_SHAPE, "a message payload must be a JSON object")
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
        f["device_id"], ts, server_ts, _ident(value), text, _digest(msg.payload), msg.received_at
    )


def _channel_message(f: dict[str, Any], msg: Inbound) -> Record:
    text, _value, ts, server_ts = _message_fields(msg)
    ident = "/".join(f["ident"])
    return ChannelMessage(
        f["channel_id"], ident, ts, server_ts, text, _digest(msg.payload), msg.received_at
    )


def _modem_message(f: dict[str, Any], msg: Inbound) -> Record:
    text, _value, ts, _server_ts = _message_fields(msg)
    return ModemMessage(f["modem_id"], f["phone"], ts, text, _digest(msg.payload), msg.received_at)


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


def classify(topic: str) -> Family:
    """The family a topic belongs to by shape alone (for metrics), ``UNKNOWN`` if none."""
    segments = topic.split("/")
    for route in ROUTES:
        try:
            if route.match(segments) is not None:
                return route.family
        except _Reject:
            return route.family
    return Family.UNKNOWN


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
                raise _Reject(
                    Reason.PAYLOAD_TOO_LARGE,
                    f"payload of {len(msg.payload)} bytes exceeds the {max_payload_bytes} limit",
                )
            return route.build(fields, msg)
        return Rejection(Reason.UNKNOWN_TOPIC, "topic matches no flespi topic family")
    except _Reject as rejection:
        return Rejection(rejection.reason, rejection.detail, family)
    except Exception as exc:  # a decoder bug must cost one message, never the stream
        return Rejection(Reason.WRONG_SHAPE, f"could not decode: {type(exc).__name__}", family)
