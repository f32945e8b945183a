"""Payload and property validation: JSON that PostgreSQL's jsonb will accept, sane timestamps.

JSON payloads are validated here but kept as their original text, so PostgreSQL stores exactly
what flespi sent (numbers keep their precision, however many digits). Everything ``jsonb``
would refuse (NaN, an escaped NUL, lone surrogates, absurd nesting) is rejected here instead, so
one bad message can never fail a whole batch; what jsonb accepts is accepted here too (the text
``\\\\u0000``, an escaped backslash before ``u0000``, is not a NUL). Pure.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import orjson

from mirror.decode.records import Reason

# Device time is device time: trackers replay old backlogs and GPS week rollovers report 1999,
# so anything from 1970 is accepted; the upper bound is a day after receipt (``AHEAD``).
MIN_TIMESTAMP = 0.0
MAX_TIMESTAMP = 4_102_444_800.0  # 2100-01-01, when no receipt time is given
AHEAD = 86_400.0
MAX_JSON_DEPTH = 64


class Invalid(Exception):
    """Raised inside decoding; ``topics.decode`` turns it into a :class:`Rejection`."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _reject_constant(name: str) -> Any:
    raise Invalid(Reason.NON_FINITE_NUMBER, f"JSON constant {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Invalid(Reason.NON_FINITE_NUMBER, f"number {text[:40]} overflows a double")
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# Python refuses to turn more digits than this into an int (CVE-2020-10735); jsonb's numeric
# takes up to 131,072. Longer integers are checked as decimals; the text is what is stored.
_INT_DIGITS = 4000


def _integer(text: str) -> int | Decimal:
    return int(text) if len(text) <= _INT_DIGITS else Decimal(text)


def _holds_nul(value: Any) -> bool:
    """Whether a decoded JSON value holds U+0000 in any string, key or value."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


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


_SLOW = object()
# orjson's integers stop at 64 bits (it turns longer ones into floats); such payloads, and any
# orjson refuses, go to the standard library's parser, which says exactly why one is refused.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def _fast_loads(payload: bytes) -> Any:
    """orjson's parse (several times the standard library's speed), or ``_SLOW``."""
    if _LONG_DIGITS.search(payload):
        return _SLOW
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return _SLOW


def _strict_loads(text: str) -> Any:
    try:
        value = json.loads(
            text, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_integer
        )
    except Invalid:
        raise
    except RecursionError:
        raise Invalid(Reason.TOO_DEEPLY_NESTED, "JSON nesting too deep to parse") from None
    except ValueError as exc:
        raise Invalid(Reason.MALFORMED_JSON, f"malformed JSON: {str(exc)[:120]}") from None
    return value


def parse_json(payload: bytes) -> tuple[str, Any]:
    """Validate a payload as JSON that PostgreSQL's jsonb accepts; return (text, value)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Invalid(Reason.INVALID_UTF8, f"payload is not UTF-8 (byte {exc.start})") from None
    value = _fast_loads(payload)
    if value is _SLOW:
        value = _strict_loads(text)
    if "\\u0000" in text and _holds_nul(value):
        raise Invalid(Reason.UNSUPPORTED_UNICODE, "JSON text holds U+0000, which jsonb refuses")
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise Invalid(
                Reason.UNSUPPORTED_UNICODE, "JSON text holds an unpaired surrogate escape"
            ) from None
    if isinstance(value, dict | list) and _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise Invalid(Reason.TOO_DEEPLY_NESTED, f"JSON nested deeper than {MAX_JSON_DEPTH}")
    return text, value


def parse_timestamp(
    properties: Mapping[str, str], fallback: float, received_at: float | None = None
) -> float:
    raw = properties.get("timestamp")
    if raw is None:
        return fallback
    return checked_timestamp(raw, "user property timestamp", received_at)


def checked_timestamp(raw: Any, what: str, received_at: float | None = None) -> float:
    """Unix seconds from 1970 up to a day after ``received_at`` (2100 without one)."""
    if isinstance(raw, bool):
        raise Invalid(Reason.INVALID_TIMESTAMP, f"{what} is a boolean")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise Invalid(
            Reason.INVALID_TIMESTAMP, f"{what} {str(raw)[:40]!r} is not a number"
        ) from None
    latest = MAX_TIMESTAMP if received_at is None else received_at + AHEAD
    if not (MIN_TIMESTAMP <= value < latest):
        raise Invalid(
            Reason.INVALID_TIMESTAMP,
            f"{what} {str(raw)[:40]} is before 1970 or more than a day after its receipt",
        )
    return value


def optional_number(obj: Mapping[str, Any], field: str) -> float | None:
    value = obj.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(Reason.WRONG_SHAPE, f"field {field!r} is not a number")
    return float(value)


# A message's typed position (flespi's dotted parameters), read once when it is stored: the
# columns of device_track. The same rules as the SQL readers of migrations 0001 and 0007
# (json_number, json_real, json_smallint, json_bool), which read messages stored before:
# anything but a number in the column type's range, or a boolean, is None.
TRACK_FIELDS = (
    ("latitude", "position.latitude", "double"),
    ("longitude", "position.longitude", "double"),
    ("altitude", "position.altitude", "real"),
    ("speed", "position.speed", "real"),
    ("direction", "position.direction", "real"),
    ("satellites", "position.satellites", "smallint"),
    ("valid", "position.valid", "boolean"),
)
_RANGES = {"double": (1e-300, 1e300), "real": (1.2e-38, 3.4e38)}


def _typed(raw: Any, kind: str) -> float | int | bool | None:
    if kind == "boolean":
        return raw if isinstance(raw, bool) else None
    if isinstance(raw, bool) or not isinstance(raw, int | float | Decimal):
        return None
    value: float | int | Decimal = raw
    if kind == "smallint":
        if not -32768 <= value <= 32767:
            return None
        whole = Decimal(value).to_integral_value(ROUND_HALF_UP)  # numeric round(): half away
        return int(whole)
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return None
    low, high = _RANGES[kind]
    if number != 0 and not low <= abs(number) <= high:  # inf and tiny values included
        return None
    return number


def track(message: Mapping[str, Any]) -> tuple[Any, ...]:
    """The typed position of a message object, in ``TRACK_FIELDS`` order."""
    return tuple(_typed(message.get(key), kind) for _, key, kind in TRACK_FIELDS)


def digest(payload: bytes) -> bytes:
    # Identity of a history message, so a redelivered copy is stored once. Not a security use.
    return hashlib.md5(payload, usedforsecurity=False).digest()
