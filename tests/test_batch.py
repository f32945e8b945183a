"""Coalescing: newest per key wins, ties go to the later arrival, keys come out sorted."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mirror.decode.records import (
    Inbound,
    Reason,
    Rejection,
    TelemetryUpdate,
)
from mirror.decode.topics import (
    decode,
)
from mirror.store.batch import coalesce, ts_micros

NOW = 1_732_000_000.0


def tele(device: int, name: str, value: str | None, ts: float) -> tuple[Inbound, TelemetryUpdate]:
    record = TelemetryUpdate(device, name, value, ts, NOW)
    return Inbound(f"flespi/state/gw/devices/{device}/telemetry/{name}", b"", {}, NOW), record


def test_newest_timestamp_wins_whatever_the_arrival_order():
    plan = coalesce([tele(1, "a", "3", 30.0), tele(1, "a", "1", 10.0), tele(1, "a", "2", 20.0)])
    assert [r.value for r in plan.rows("telemetry")] == ["3"]
    assert plan.superseded == 2


def test_equal_timestamps_keep_every_distinct_value_for_the_database_to_order():
    plan = coalesce([tele(1, "a", "1", 10.0), tele(1, "a", "2", 10.0), tele(1, "a", "1", 10.0)])
    assert [r.value for r in plan.rows("telemetry")] == ["1", "2"]


def test_a_deletion_wins_a_tie_in_any_order():
    for order in ([("x", 10.0), (None, 10.0)], [(None, 10.0), ("x", 10.0)]):
        plan = coalesce([tele(1, "a", v, ts) for v, ts in order])
        assert [r.value for r in plan.rows("telemetry")] == [None]


def test_times_tie_at_the_microsecond_postgresql_keeps():
    # issue 9 item 6: both are 1700000000.000001 in PostgreSQL
    plan = coalesce(
        [tele(1, "a", "new", 1_700_000_000.0000011), tele(1, "a", "old", 1_700_000_000.0000009)]
    )
    assert sorted(r.value for r in plan.rows("telemetry")) == ["new", "old"]
    assert ts_micros(1_700_000_000.0000011) == ts_micros(1_700_000_000.0000009)
    assert ts_micros(1_700_000_000.000001) < ts_micros(1_700_000_000.000002)


def test_a_newer_deletion_beats_an_older_update_and_vice_versa():
    plan = coalesce(
        [
            tele(1, "a", "1", 10.0),
            tele(1, "a", None, 20.0),
            tele(2, "b", None, 5.0),
            tele(2, "b", "x", 6.0),
        ]
    )
    assert [(r.device_id, r.value) for r in plan.rows("telemetry")] == [(1, None), (2, "x")]


def test_redelivered_history_message_is_planned_once():
    inbound = Inbound("flespi/message/gw/devices/5", b'{"timestamp": 1731990000}', {}, NOW)
    record = decode(inbound)
    plan = coalesce([(inbound, record), (inbound, record)])
    assert len(plan.rows("device_messages")) == 1


def test_rejections_become_dead_letters_in_order():
    bad = Inbound("x", b"", {}, NOW)
    plan = coalesce(
        [(bad, Rejection(Reason.UNKNOWN_TOPIC, "a")), (bad, Rejection(Reason.MALFORMED_JSON, "b"))]
    )
    assert [d.rejection.detail for d in plan.dead_letters] == ["a", "b"]


UPDATES = st.lists(
    st.tuples(
        st.integers(1, 3),
        st.sampled_from("ab"),
        st.integers(0, 3),
        st.sampled_from([None, "1", "2"]),
    ),
    max_size=30,
)


@given(UPDATES, st.randoms())
def test_the_plan_is_the_same_whatever_the_arrival_order(updates, rnd):
    items = [tele(d, n, v, float(ts)) for d, n, ts, v in updates]
    shuffled = items[:]
    rnd.shuffle(shuffled)
    a, b = coalesce(items), coalesce(shuffled)
    assert [(r.key, r.value) for r in a.rows("telemetry")] == [
        (r.key, r.value) for r in b.rows("telemetry")
    ] or (
        sorted((r.key, r.value or "") for r in a.rows("telemetry"))
        == sorted((r.key, r.value or "") for r in b.rows("telemetry"))
    )
    keys = [r.key for r in a.rows("telemetry")]
    assert keys == sorted(keys)
    for record in a.rows("telemetry"):
        same_key = [r for _, r in items if r.key == record.key]
        assert record.ts == max(r.ts for r in same_key)
        if any(r.value is None and r.ts == record.ts for r in same_key):
            assert record.value is None
