"""Coalescing: newest per key wins, ties go to the later arrival, keys come out sorted."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mirror.batch import coalesce
from mirror.records import (
    Inbound,
    Reason,
    Rejection,
    TelemetryUpdate,
)
from mirror.topics import (
    decode,
)

NOW = 1_732_000_000.0


def tele(device: int, name: str, value: str | None, ts: float) -> tuple[Inbound, TelemetryUpdate]:
    record = TelemetryUpdate(device, name, value, ts, NOW)
    return Inbound(f"flespi/state/gw/devices/{device}/telemetry/{name}", b"", {}, NOW), record


def test_newest_timestamp_wins_whatever_the_arrival_order():
    plan = coalesce([tele(1, "a", "3", 30.0), tele(1, "a", "1", 10.0), tele(1, "a", "2", 20.0)])
    assert [r.value for r in plan.rows("telemetry")] == ["3"]
    assert plan.superseded == 2


def test_equal_timestamps_keep_the_later_arrival():
    plan = coalesce([tele(1, "a", "first", 10.0), tele(1, "a", "second", 10.0)])
    assert [r.value for r in plan.rows("telemetry")] == ["second"]


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


@given(
    st.lists(st.tuples(st.integers(1, 4), st.sampled_from("abc"), st.integers(0, 5)), max_size=40)
)
def test_plan_is_sorted_unique_and_holds_each_keys_newest(updates):
    items = [tele(d, n, f"{i}", float(ts)) for i, (d, n, ts) in enumerate(updates)]
    plan = coalesce(items)
    keys = [(r.device_id, r.name) for r in plan.rows("telemetry")]
    assert keys == sorted(set(keys))
    for record in plan.rows("telemetry"):
        same_key = [r for _, r in items if (r.device_id, r.name) == (record.device_id, record.name)]
        newest = max(r.ts for r in same_key)
        assert record.ts == newest
        assert record is [r for r in same_key if r.ts == newest][-1]
