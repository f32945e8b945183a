"""Bad input end to end: every kind reaches dead_letters with its reason (or is stored
verbatim when it is merely odd), the daemon stays up, and nothing is built into SQL text.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror.decode.records import (
    Inbound,
    Rejection,
)
from mirror.decode.topics import (
    decode,
)
from mirror.ops.config import asyncpg_connect_kwargs
from tests.helpers import eventually, publisher, query, running_mirror, settings_for, settle
from tests.launchers import publish_many, record_figures

TS = 1_731_990_000.0
MAX_PAYLOAD = 1024
GOOD_PROPS = {"timestamp": repr(TS), "cid": "123"}
TELEMETRY = "flespi/state/gw/devices/1/telemetry/{}"
MESSAGE = "flespi/message/gw/devices/{}"

# (name, topic, payload, user properties, expected reason)
BAD: list[tuple[str, str, bytes, dict[str, str], str]] = [
    ("malformed_json", TELEMETRY.format("a"), b'{"speed": ', GOOD_PROPS, "malformed_json"),
    ("trailing_garbage", TELEMETRY.format("b"), b"12 13", GOOD_PROPS, "malformed_json"),
    ("binary", TELEMETRY.format("c"), bytes(range(256)), GOOD_PROPS, "invalid_utf8"),
    ("invalid_utf8", TELEMETRY.format("d"), b'"caf\xc3\x28"', GOOD_PROPS, "invalid_utf8"),
    (
        "too_large",
        TELEMETRY.format("e"),
        json.dumps("x" * (MAX_PAYLOAD + 10)).encode(),
        GOOD_PROPS,
        "payload_too_large",
    ),
    ("message_not_object", MESSAGE.format(7), b"[1, 2, 3]", GOOD_PROPS, "wrong_shape"),
    ("object_not_object", "flespi/state/gw/devices/7", b'"a string"', GOOD_PROPS, "wrong_shape"),
    (
        "interval_not_object",
        "flespi/interval/gw/calcs/1/devices/7/created",
        b"42",
        GOOD_PROPS,
        "wrong_shape",
    ),
    ("nan", TELEMETRY.format("f"), b"NaN", GOOD_PROPS, "non_finite_number"),
    ("infinity", TELEMETRY.format("g"), b'{"v": Infinity}', GOOD_PROPS, "non_finite_number"),
    ("minus_infinity", TELEMETRY.format("h"), b"[-Infinity]", GOOD_PROPS, "non_finite_number"),
    ("overflowing_float", TELEMETRY.format("i"), b"1e999", GOOD_PROPS, "non_finite_number"),
    ("nested_100", TELEMETRY.format("j"), b"[" * 100 + b"]" * 100, GOOD_PROPS, "too_deeply_nested"),
    (
        "nested_100000",
        TELEMETRY.format("k"),
        b"[" * 100_000 + b"]" * 100_000,
        GOOD_PROPS,
        "payload_too_large",  # over the 1 KiB test limit before it is even parsed
    ),
    ("nul_escape", TELEMETRY.format("l"), b'"a\\u0000b"', GOOD_PROPS, "unsupported_unicode"),
    ("lone_surrogate", TELEMETRY.format("m"), b'"\\ud800"', GOOD_PROPS, "unsupported_unicode"),
    ("ts_not_number", TELEMETRY.format("n"), b"1", {"timestamp": "yesterday"}, "invalid_timestamp"),
    ("ts_before_1970", TELEMETRY.format("o"), b"1", {"timestamp": "-1"}, "invalid_timestamp"),
    ("ts_9999", TELEMETRY.format("p"), b"1", {"timestamp": "253402300799"}, "invalid_timestamp"),
    ("ts_nan", TELEMETRY.format("q"), b"1", {"timestamp": "nan"}, "invalid_timestamp"),
    ("ts_inf", TELEMETRY.format("r"), b"1", {"timestamp": "inf"}, "invalid_timestamp"),
    (
        "payload_ts_absurd",
        MESSAGE.format(8),
        b'{"timestamp": 99999999999}',
        GOOD_PROPS,
        "invalid_timestamp",
    ),
    ("unknown_family", "flespi/foo/bar", b"1", GOOD_PROPS, "unknown_topic"),
    ("not_flespi", "something/else", b"1", GOOD_PROPS, "unknown_topic"),
    ("too_short", "flespi/state/gw/devices", b"1", GOOD_PROPS, "unknown_topic"),
    # Other flespi/message/ kinds go to other_messages; a topic too short for any is unknown.
    ("too_short_message", "flespi/message/gw", b"{}", GOOD_PROPS, "unknown_topic"),
    (
        "unknown_interval_event",
        "flespi/interval/gw/calcs/1/devices/2/exploded",
        b"{}",
        GOOD_PROPS,
        "unknown_topic",
    ),
    ("id_not_numeric", "flespi/state/gw/devices/abc/telemetry/x", b"1", GOOD_PROPS, "invalid_id"),
    (
        "id_too_big",
        "flespi/state/gw/devices/99999999999999999999/telemetry/x",
        b"1",
        GOOD_PROPS,
        "invalid_id",
    ),
    ("empty_message", MESSAGE.format(9), b"", GOOD_PROPS, "empty_payload"),
    (
        "sql_in_unknown_topic",
        "flespi/x'; DROP TABLE dead_letters; --",
        b"1",
        GOOD_PROPS,
        "unknown_topic",
    ),
]

# Topics that are odd but valid: the telemetry name must land verbatim.
HOSTILE_NAMES = [
    "x'; DROP TABLE telemetry; --",
    'quoted "name"',
    "semi;colon",
    "$$ dollar $$",
    "back\\slash",
    ":param %s %(x)s {0}",
    "' OR '1'='1",
    "ünïcödé ✓ 名前",
    ") ; DELETE FROM telemetry WHERE (1=1",
]


@pytest.fixture
def mirror_settings(broker, database, schema_name):
    # "#": every topic reaches the decoder, also shapes outside flespi's families.
    return settings_for(
        broker.url, database.url, schema_name, max_payload_bytes=MAX_PAYLOAD, topics=("#",)
    )


async def test_each_kind_of_bad_input_reaches_dead_letters_with_its_reason(broker, mirror_settings):
    async with running_mirror(mirror_settings) as running:
        with publisher(broker.url) as pub:
            for _name, topic, payload, props, _reason in BAD:
                pub.client.publish(
                    topic, payload, qos=1, properties=_props(props)
                ).wait_for_publish(10)
            # A good message after all of them: the daemon is still up and mirroring.
            pub.publish(TELEMETRY.format("alive"), True, TS)
        await eventually(
            running.engine,
            "SELECT value::text FROM telemetry WHERE name = 'alive'",
            [("true",)],
        )
        await settle(running)
        assert not running.task.done(), "the daemon stopped"
        rows = await query(
            running.engine, "SELECT topic, reason, detail, payload_size FROM dead_letters"
        )
        by_topic: dict[str, list[tuple[str, str, int]]] = {}
        for topic, reason, detail, size in rows:
            by_topic.setdefault(topic, []).append((reason, detail, size))
        problems = []
        for name, topic, payload, _p, reason in BAD:
            got = by_topic.get(topic, [])
            if [r for r, _d, _s in got] != [reason]:
                problems.append(f"{name}: expected [{reason}] on {topic[:60]!r}, got {got}")
                continue
            _reason, detail, size = got[0]
            assert detail, f"{name}: no detail"
            assert size == len(payload), f"{name}: payload_size {size} != {len(payload)}"
        assert not problems, "\n".join(problems)
        assert len(rows) == len(BAD)
        # Nothing bad reached a mirror table.
        assert await query(running.engine, "SELECT count(*) FROM telemetry") == [(1,)]
        assert await query(running.engine, "SELECT count(*) FROM device_messages") == [(0,)]
        assert await query(running.engine, "SELECT count(*) FROM objects") == [(0,)]
    record_figures(
        "bad_input_kinds",
        {"kinds": len(BAD), "dead_letters": len(rows), "daemon_up": True},
    )


async def test_hostile_topic_names_land_verbatim_and_no_sql_runs(broker, mirror_settings):
    async with running_mirror(mirror_settings) as running:
        with publisher(broker.url) as pub:
            for i, name in enumerate(HOSTILE_NAMES):
                pub.publish(TELEMETRY.format(name), i, TS)
                pub.publish(
                    f"flespi/message/gw/channels/5/{name}", {"ident": name, "timestamp": TS}, TS
                )
                pub.publish(f"flespi/state/gw/devices/3/settings/{name}", {"v": name}, TS)
            await settle(running)
        rows = await query(running.engine, "SELECT name, value::text::int FROM telemetry")
        assert sorted(rows) == sorted((n, i) for i, n in enumerate(HOSTILE_NAMES))
        idents = await query(
            running.engine, "SELECT ident, payload->>'ident' FROM channel_messages"
        )
        assert sorted(idents) == sorted((n, n) for n in HOSTILE_NAMES)
        settings_rows = await query(running.engine, "SELECT name, value->>'v' FROM device_settings")
        assert sorted(settings_rows) == sorted((n, n) for n in HOSTILE_NAMES)
        assert await query(running.engine, "SELECT count(*) FROM dead_letters") == [(0,)]
        # Every table is still there.
        assert await query(running.engine, "SELECT to_regclass('telemetry') IS NOT NULL") == [
            (True,)
        ]


async def test_ten_thousand_bad_messages_in_a_normal_stream_are_counted_exactly(
    broker, mirror_settings
):
    """published = rows mirrored + dead letters, exactly (history and distinct state keys)."""
    rng = random.Random(5)
    bad_kinds = [b for b in BAD if b[4] != "payload_too_large" or len(b[2]) < 5000]
    bad_total = 10_000
    good_total = 10_000
    messages: list[tuple[str, bytes, dict[str, str], bool]] = []
    expected_reasons: dict[str, int] = {}
    good_history = good_state = 0
    for i in range(good_total + bad_total):
        if i % 2 == 0:
            _name, topic, payload, props, reason = bad_kinds[rng.randrange(len(bad_kinds))]
            expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
            messages.append((topic, payload, props, False))
        elif i % 4 == 1:
            seq = i
            payload = json.dumps({"ident": "d", "timestamp": TS + seq / 1000, "seq": seq}).encode()
            messages.append((MESSAGE.format(100 + seq % 50), payload, GOOD_PROPS, False))
            good_history += 1
        else:
            messages.append((TELEMETRY.format(f"p{i}"), str(i).encode(), GOOD_PROPS, False))
            good_state += 1
    async with running_mirror(mirror_settings) as running:
        started = time.monotonic()
        acked = await asyncio.to_thread(publish_many, broker.url, messages)
        assert acked == len(messages)
        await settle(running, quiet=0.5, timeout=60)
        elapsed = time.monotonic() - started
        assert not running.task.done(), "the daemon stopped"
        (history,) = (await query(running.engine, "SELECT count(*) FROM device_messages"))[0]
        (state,) = (
            await query(running.engine, "SELECT count(*) FROM telemetry WHERE name LIKE 'p%'")
        )[0]
        reasons = dict(
            await query(running.engine, "SELECT reason, count(*) FROM dead_letters GROUP BY 1")
        )
    dead = sum(reasons.values())
    record_figures(
        "bad_input_soak",
        {
            "published": len(messages),
            "bad_published": bad_total,
            "good_published": good_total,
            "mirrored_rows": history + state,
            "dead_letters": dead,
            "unaccounted": len(messages) - (history + state + dead),
            "seconds": round(elapsed, 2),
        },
    )
    assert (history, state) == (good_history, good_state)
    assert reasons == expected_reasons
    assert len(messages) == history + state + dead


# --------------------------------------------------------------------------------------------
# Property-based: the decoder never raises, and what it accepts PostgreSQL stores.

SEGMENT = st.one_of(
    st.sampled_from(
        [
            "flespi",
            "state",
            "message",
            "interval",
            "gw",
            "devices",
            "channels",
            "modems",
            "telemetry",
            "settings",
            "plugins",
            "calcs",
            "platform",
            "customer",
            "deleted",
            "created",
            "1",
            "0",
            "-1",
            "99999999999999999999",
            "",
            "+",
            "#",
            "x'; --",
        ]
    ),
    st.text(max_size=12),
)
TOPICS = st.one_of(
    st.text(max_size=80),
    st.lists(SEGMENT, min_size=1, max_size=9).map("/".join),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
PAYLOADS = st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    JSON_VALUES.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.text(max_size=50).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"NaN", b"-Infinity", b"1e400", b"[" * 70 + b"]" * 70, b'"\\ud83d"']),
)
PROPERTIES = st.dictionaries(
    st.sampled_from(["timestamp", "cid", "other"]),
    st.one_of(st.text(max_size=20), st.floats().map(repr), st.integers().map(str)),
    max_size=3,
)


@settings(max_examples=600, deadline=None)
@given(topic=TOPICS, payload=PAYLOADS, properties=PROPERTIES, retain=st.booleans())
def test_decode_returns_a_record_or_a_rejection_for_any_input(topic, payload, properties, retain):
    message = Inbound(topic, payload, properties, TS, retain=retain)
    result = decode(message, MAX_PAYLOAD)
    if isinstance(result, Rejection):
        assert result.detail and str(result.reason)
    else:
        assert math.isfinite(result.ts)


_loop = asyncio.new_event_loop()


@pytest.fixture(scope="module")
def jsonb_connection(database):
    conn = _loop.run_until_complete(asyncpg.connect(**asyncpg_connect_kwargs(database.url)))
    yield conn
    _loop.run_until_complete(conn.close())


def _json_text(record: Any) -> str | None:
    for field in ("value", "config", "props", "data", "payload"):
        text = getattr(record, field, None)
        if isinstance(text, str):
            return text
    return None


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=PAYLOADS)
def test_every_payload_the_decoder_accepts_is_valid_jsonb(jsonb_connection, payload):
    """A payload that passes decode must never fail the batch in PostgreSQL."""
    message = Inbound(TELEMETRY.format("p"), payload, {"timestamp": repr(TS)}, TS)
    result = decode(message, MAX_PAYLOAD)
    if isinstance(result, Rejection):
        return
    text = _json_text(result)
    if text is None:
        return
    stored = _loop.run_until_complete(jsonb_connection.fetchval("SELECT $1::text::jsonb", text))
    assert stored is not None


def _props(pairs: dict[str, str]) -> Any:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = list(pairs.items())
    return props


VALID_BUT_ODD = {
    "escaped_backslash_before_u0000": b'{"s":"a\\\\u0000b"}',  # the text a\u0000b, no NUL
    "five_thousand_digit_integer": b'{"n":' + b"7" * 5000 + b"}",
    "negative_five_thousand_digits": b"-" + b"9" * 5000,
}


@pytest.mark.parametrize("name", list(VALID_BUT_ODD))
def test_valid_json_that_jsonb_stores_is_accepted_and_kept_verbatim(jsonb_connection, name):
    payload = VALID_BUT_ODD[name]
    message = Inbound(TELEMETRY.format("odd"), payload, {"timestamp": repr(TS)}, TS)
    result = decode(message, 1024 * 1024)
    assert not isinstance(result, Rejection), result
    assert _json_text(result) == payload.decode()
    same = _loop.run_until_complete(
        jsonb_connection.fetchval(
            "SELECT $1::text::jsonb = $2::text::jsonb", payload.decode(), payload.decode()
        )
    )
    assert same is True


def test_an_escaped_nul_inside_a_key_is_still_refused() -> None:
    message = Inbound(TELEMETRY.format("nul"), b'{"a\\u0000": 1}', {"timestamp": repr(TS)}, TS)
    result = decode(message, MAX_PAYLOAD)
    assert isinstance(result, Rejection) and result.reason == "unsupported_unicode"
