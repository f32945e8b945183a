"""JSON validation (payloads.py): orjson's fast parse and the standard library's strict one must
agree on every payload, value and verdict alike, so the fast path changes speed, never results."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mirror.decode.payloads import Invalid, _strict_loads, parse_json
from tests.strategies import JSON_VALUES, any_payload


def verdict(payload: bytes) -> tuple[str, Any]:
    try:
        text, value = parse_json(payload)
    except Invalid as exc:
        return ("refused", exc.reason)
    return ("accepted", (text, value))


def strict_verdict(payload: bytes) -> tuple[str, Any]:
    """parse_json as it was before the fast path: the standard library's parser alone."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return verdict(payload)  # refused before any parse
    try:
        _strict_loads(text)
    except Invalid as exc:
        return ("refused", exc.reason)
    return verdict(payload)


EDGES = [
    b"1e400", b"-1e400", b"NaN", b"Infinity", b"[1, -Infinity]", b'"\\ud800"', b'"\\ud83d\\ude00"',
    b'"a\\u0000"', b'"\\\\u0000"', b"[" * 100 + b"]" * 100, b"[" * 2000 + b"]" * 2000,
    b"123456789012345678901234567890", b"18446744073709551616", b"-9223372036854775809",
    b'{"a": 1, "a": 2}', b"0.1e-400", b"-0", b"1E5", b"{", b"", b"\xff", b'{"x": tru}',
    b'{"big": 12345678901234567890123, "f": 1.5}',
]  # fmt: skip


def test_edge_payloads_get_the_strict_parsers_verdict_and_value() -> None:
    for payload in EDGES:
        got = verdict(payload)
        assert got[0] == strict_verdict(payload)[0], payload
        if got[0] == "refused":
            assert got == strict_verdict(payload), payload
        else:
            expected = json.loads(payload, parse_int=int)
            assert got[1][1] == expected and type(got[1][1]) is type(expected), payload


def test_a_long_integer_stays_an_integer() -> None:
    _, value = parse_json(b'{"odometer": 123456789012345678901234567890}')
    assert value["odometer"] == 123456789012345678901234567890


@settings(max_examples=300, deadline=None)
@given(st.one_of(any_payload(), JSON_VALUES.map(lambda v: json.dumps(v).encode())))
def test_any_payload_gets_the_same_value_as_the_standard_library(payload: bytes) -> None:
    got = verdict(payload)
    if got[0] == "accepted":
        assert got[1][1] == json.loads(payload)
    else:
        assert strict_verdict(payload) == got
