"""The decoder: every topic family, every rejection reason, and never an exception."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror.decode.records import (
    CalculatorDeviceUpdate,
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
    Rejection,
    SettingUpdate,
    TelemetryUpdate,
)
from mirror.decode.topics import ROUTES, decode
from tests.strategies import topic_for

ALL_ROUTES = [route for group in ROUTES.values() for route in group]

NOW = 1_732_000_000.0
TS = "1731999999.25"


def msg(
    topic: str, payload: bytes | str | object = b"", ts: str | None = TS, **props: str
) -> Inbound:
    if not isinstance(payload, bytes):
        payload = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
    properties = dict(props)
    if ts is not None:
        properties["timestamp"] = ts
    return Inbound(topic, payload, properties, NOW)


DECODED = [
    (
        msg("flespi/state/gw/devices/5/telemetry/battery.level", b"87"),
        TelemetryUpdate(5, "battery.level", "87", 1731999999.25, NOW),
    ),
    (
        msg("flespi/state/gw/devices/5/telemetry/position", b'{"latitude":1.5,"longitude":2}'),
        TelemetryUpdate(5, "position", '{"latitude":1.5,"longitude":2}', 1731999999.25, NOW),
    ),
    (
        msg("flespi/state/gw/devices/5/telemetry/din", b""),
        TelemetryUpdate(5, "din", None, 1731999999.25, NOW),
    ),
    (
        msg("flespi/state/gw/devices/5/telemetry/ident", b'"abc"', ts=None),
        TelemetryUpdate(5, "ident", '"abc"', NOW, NOW),
    ),
    (
        msg("flespi/state/gw/devices/5/settings/report", b'{"interval":30}'),
        SettingUpdate(5, "report", '{"interval":30}', 1731999999.25, NOW),
    ),
    (
        msg("flespi/state/gw/devices/5/settings/report/interval", b"30"),
        SettingUpdate(5, "report/interval", "30", 1731999999.25, NOW),
    ),
    (
        msg("flespi/state/gw/plugins/7/devices/5", b'{"a":1}'),
        PluginConfigUpdate(7, 5, '{"a":1}', 1731999999.25, NOW),
    ),
    (
        msg("flespi/state/gw/devices/5", b'{"id":5,"name":"x"}'),
        ObjectUpdate("gw", "devices", 5, '{"id":5,"name":"x"}', 1731999999.25, NOW),
    ),
    (
        msg("flespi/state/gw/devices/5", b""),
        ObjectUpdate("gw", "devices", 5, None, 1731999999.25, NOW),
    ),
    (
        msg("flespi/state/gw/devices/5/deleted", b"true"),
        ObjectUpdate("gw", "devices", 5, None, 1731999999.25, NOW),
    ),
    (
        msg("flespi/state/gw/devices/5/deleted", b"false"),
        ObjectPropertyUpdate("gw", "devices", 5, ("deleted",), "false", 1731999999.25, NOW),
    ),
    (
        msg("flespi/state/gw/devices/5/connected", b"true"),
        ObjectPropertyUpdate("gw", "devices", 5, ("connected",), "true", 1731999999.25, NOW),
    ),
    (
        msg("flespi/state/gw/devices/5/connections/99", b'{"ident":"a"}'),
        ObjectPropertyUpdate(
            "gw", "devices", 5, ("connections", "99"), '{"ident":"a"}', 1731999999.25, NOW
        ),
    ),
    (
        msg("flespi/state/gw/calcs/3/devices/5/synced", b"true"),
        CalculatorDeviceUpdate(3, 5, "synced", "true", 1731999999.25, NOW),
    ),
    (
        msg("flespi/state/gw/calcs/3/devices/5/active", b"null"),
        CalculatorDeviceUpdate(3, 5, "active", "null", 1731999999.25, NOW),
    ),
    (
        msg("flespi/state/gw/calcs/3/devices/5/last", b""),
        CalculatorDeviceUpdate(3, 5, "last", None, 1731999999.25, NOW),
    ),
    (
        msg("flespi/interval/gw/calcs/3/devices/5/activated", b'{"begin": 1731990000}'),
        CalculatorDeviceUpdate(3, 5, "active", '{"begin": 1731990000}', 1731999999.25, NOW),
    ),
    (
        msg("flespi/interval/gw/calcs/3/devices/5/deactivated", b"{}"),
        CalculatorDeviceUpdate(3, 5, "active", "null", 1731999999.25, NOW),
    ),
    (
        msg("flespi/state/platform/customer/counters/devices", b"12", cid="777"),
        ObjectPropertyUpdate(
            "platform", "customer", 777, ("counters", "devices"), "12", 1731999999.25, NOW, 777
        ),
    ),
    (
        msg("flespi/state/storage/containers/8", b'{"id":8}'),
        ObjectUpdate("storage", "containers", 8, '{"id":8}', 1731999999.25, NOW),
    ),
]


@pytest.mark.parametrize(("message", "expected"), DECODED, ids=[m.topic for m, _ in DECODED])
def test_each_state_topic_decodes_to_its_record(message, expected):
    assert decode(message) == expected


def test_interval_with_id_is_keyed_by_id():
    payload = {"id": 11, "begin": 1731990000, "end": 1731990060, "duration": 60, "mileage": 1.5}
    record = decode(msg("flespi/interval/gw/calcs/3/devices/5/updated", payload))
    assert isinstance(record, IntervalEvent)
    assert (record.calc_id, record.device_id, record.interval_key) == (3, 5, "id:11")
    assert (record.begin, record.end, record.duration, record.event) == (
        1731990000.0,
        1731990060.0,
        60.0,
        "updated",
    )
    assert json.loads(record.data or "")["mileage"] == 1.5


def test_interval_without_id_is_keyed_by_begin_and_deleted_has_no_data():
    record = decode(msg("flespi/interval/gw/calcs/3/devices/5/deleted", {"begin": 1731990000}))
    assert isinstance(record, IntervalEvent)
    assert record.interval_key == "begin:1731990000.0"
    assert record.data is None


def test_device_message_takes_device_time_and_server_time():
    payload = {"ident": "35", "timestamp": 1731990000.5, "server.timestamp": 1731990001.25, "x": 1}
    record = decode(msg("flespi/message/gw/devices/5", payload))
    assert isinstance(record, DeviceMessage)
    assert (record.device_id, record.ts, record.server_ts, record.ident) == (
        5,
        1731990000.5,
        1731990001.25,
        "35",
    )
    assert len(record.digest) == 16


def test_older_device_message_topic_with_name_is_accepted():
    record = decode(msg("flespi/message/gw/devices/5/truck-1", {"timestamp": 1731990000}))
    assert isinstance(record, DeviceMessage) and record.device_id == 5


def test_channel_and_modem_messages():
    ch = decode(
        msg("flespi/message/gw/channels/9/35000", {"ident": "35000", "timestamp": 1731990000})
    )
    assert isinstance(ch, ChannelMessage) and (ch.channel_id, ch.ident) == (9, "35000")
    sms = decode(msg("flespi/message/gw/modems/4/3706000", {"text": "hi"}))
    assert isinstance(sms, ModemMessage) and (sms.modem_id, sms.phone, sms.ts) == (
        4,
        "3706000",
        1731999999.25,
    )


def test_same_payload_same_identity_different_payload_different_identity():
    a = decode(msg("flespi/message/gw/devices/5", {"timestamp": 1731990000, "v": 1}))
    b = decode(msg("flespi/message/gw/devices/5", {"timestamp": 1731990000, "v": 1}))
    c = decode(msg("flespi/message/gw/devices/5", {"timestamp": 1731990000, "v": 2}))
    assert a.key == b.key != c.key  # type: ignore[union-attr]


REJECTED = [
    ("flespi/log/gw/devices/created", b"[1]", Reason.WRONG_SHAPE),
    ("flespi/log/gw/devices/created", b"", Reason.EMPTY_PAYLOAD),
    ("flespi/message/gw/chats/1", b"", Reason.EMPTY_PAYLOAD),
    ("flespi/elsewhere/gw/devices/1", b"{}", Reason.UNKNOWN_TOPIC),
    ("something/else", b"1", Reason.UNKNOWN_TOPIC),
    ("flespi/state/gw/devices/abc/telemetry/x", b"1", Reason.INVALID_ID),
    ("flespi/state/gw/devices/-1/telemetry/x", b"1", Reason.INVALID_ID),
    ("flespi/state/gw/devices/99999999999999999999/telemetry/x", b"1", Reason.INVALID_ID),
    ("flespi/state/gw/devices/1/telemetry/x", b"{bad json", Reason.MALFORMED_JSON),
    ("flespi/state/gw/devices/1/telemetry/x", b"\xff\xfe\x00", Reason.INVALID_UTF8),
    ("flespi/state/gw/devices/1/telemetry/x", b"NaN", Reason.NON_FINITE_NUMBER),
    ("flespi/state/gw/devices/1/telemetry/x", b"[Infinity]", Reason.NON_FINITE_NUMBER),
    ("flespi/state/gw/devices/1/telemetry/x", b"1e999", Reason.NON_FINITE_NUMBER),
    ("flespi/state/gw/devices/1/telemetry/x", b"[" * 100 + b"]" * 100, Reason.TOO_DEEPLY_NESTED),
    ("flespi/state/gw/devices/1/telemetry/x", b"[" * 5000 + b"]" * 5000, Reason.TOO_DEEPLY_NESTED),
    ("flespi/state/gw/devices/1/telemetry/x", b'"a\\u0000b"', Reason.UNSUPPORTED_UNICODE),
    ("flespi/state/gw/devices/1/telemetry/x", b'"\\ud800"', Reason.UNSUPPORTED_UNICODE),
    ("flespi/state/gw/devices/1", b"[1,2]", Reason.WRONG_SHAPE),
    ("flespi/message/gw/devices/1", b"42", Reason.WRONG_SHAPE),
    ("flespi/message/gw/devices/1", b"", Reason.EMPTY_PAYLOAD),
    ("flespi/interval/gw/calcs/1/devices/2/created", b"{}", Reason.WRONG_SHAPE),
    ("flespi/interval/gw/calcs/1/devices/2/exploded", b"{}", Reason.UNKNOWN_TOPIC),
    ("flespi/state/platform/customer/counters/x", b"1", Reason.INVALID_ID),  # no cid property
]


@pytest.mark.parametrize(("topic", "payload", "reason"), REJECTED)
def test_bad_input_is_rejected_with_a_reason(topic, payload, reason):
    result = decode(msg(topic, payload))
    assert isinstance(result, Rejection)
    assert result.reason == reason, result.detail


@pytest.mark.parametrize("stamp", ["soon", "", "nan", "inf", "-1", "253402300799", "1e300"])
def test_absurd_timestamp_property_is_rejected(stamp):
    result = decode(msg("flespi/state/gw/devices/1/telemetry/x", b"1", ts=stamp))
    assert isinstance(result, Rejection) and result.reason == Reason.INVALID_TIMESTAMP


def test_payload_over_the_limit_is_rejected_before_parsing():
    result = decode(
        msg("flespi/state/gw/devices/1/telemetry/x", b"1" * 2000), max_payload_bytes=1000
    )
    assert isinstance(result, Rejection)
    assert result.reason == Reason.PAYLOAD_TOO_LARGE and result.family == Family.TELEMETRY


def test_unicode_text_and_surrogate_pairs_are_fine():
    result = decode(msg("flespi/state/gw/devices/1/telemetry/x", '"Vilnius \\ud83d\\ude9a ąž"'))
    assert isinstance(result, TelemetryUpdate)


TOPIC_PARTS = st.sampled_from(
    [
        "flespi",
        "state",
        "message",
        "interval",
        "gw",
        "devices",
        "channels",
        "modems",
        "calcs",
        "plugins",
        "telemetry",
        "settings",
        "platform",
        "customer",
        "created",
        "deleted",
        "1",
        "0042",
        "-5",
        "",
        "+",
        "#",
        "x.y",
        "'; DROP TABLE telemetry; --",
        "\x00",
        "é",
    ]
)


@settings(max_examples=1500, deadline=None)
@given(
    topic=st.one_of(
        st.text(max_size=80),
        st.lists(TOPIC_PARTS, max_size=9).map("/".join),
        st.sampled_from(ALL_ROUTES).flatmap(topic_for),  # shapes that reach a builder
    ),
    payload=st.one_of(
        st.binary(max_size=200),
        st.from_type(bool).map(lambda b: json.dumps(b).encode()),
        st.recursive(
            st.none() | st.integers() | st.floats() | st.text(max_size=10),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
            max_leaves=10,
        ).map(lambda v: json.dumps(v).encode()),
    ),
    props=st.dictionaries(
        st.sampled_from(["timestamp", "cid", "x"]), st.text(max_size=20), max_size=3
    ),
)
def test_decode_never_raises_for_any_topic_and_bytes(topic, payload, props):
    result = decode(Inbound(topic, payload, props, NOW), max_payload_bytes=150)
    assert isinstance(result, Rejection) or result.family != Family.UNKNOWN
    if not isinstance(result, Rejection):
        for field in ("value", "config", "props", "data", "payload"):
            text = getattr(result, field, None)
            if isinstance(text, str):
                json.loads(text)  # what we store is JSON
                assert "\\u0000" not in text
