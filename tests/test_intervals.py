"""Interval identity (issue 8 item 4): one row per interval, whatever the payloads carry.

flespi's interval events carry an ``id`` only for automated calculators, and what a ``deleted``
payload holds is UNCONFIRMED. An interval without an id is the stored interval whose time span
it shares (same begin, same end, or a stretch of time in common; touching at one instant is not
enough), so an update that moves ``begin`` keeps one row and a deletion naming only some of the
fields still finds it. Written to real PostgreSQL through the store, as the daemon writes.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror.decode.records import Inbound, Reason, Rejection
from mirror.decode.topics import decode
from mirror.store.batch import coalesce
from mirror.store.database import create_engine
from mirror.store.writer import Store
from tests.helpers import Publisher, migrated_schema, query, running_mirror, settings_for, settle
from tests.helpers import interval_event as event
from tests.helpers import interval_span as span

TS = 1_731_990_000.0
_devices = itertools.count(1)


@pytest.fixture(scope="module")
def migrated(database):
    return migrated_schema(database.url, "t_intervals")


async def _write(url: str, schema: str, batches: list[list[Inbound]]) -> list[object]:
    """Write each batch as the daemon does; the rows then stored for the batches' devices."""
    engine = create_engine(url, schema)
    try:
        store = Store(engine)
        for batch in batches:
            await store.write(coalesce((m, decode(m)) for m in batch))
        devices = sorted({int(m.topic.split("/")[6]) for b in batches for m in b})
        rows = await query(
            engine,
            'SELECT device_id, interval_id, extract(epoch FROM begin), extract(epoch FROM "end"),'
            " event, data::text FROM intervals WHERE calc_id = 9 AND device_id = ANY(:d)"
            " ORDER BY 1, 3",
            d=devices,
        )
        return [tuple(r) for r in rows]
    finally:
        await engine.dispose()


def write(migrated, *batches: list[Inbound]) -> list[tuple[object, ...]]:
    url, schema = migrated
    return asyncio.run(_write(url, schema, list(batches)))


def test_an_update_that_moves_begin_keeps_one_row(migrated):
    d = next(_devices)
    rows = write(
        migrated,
        [event(d, "created", span(100, 200, mileage=1), TS)],
        [event(d, "updated", span(90, 210, mileage=2), TS + 1)],
    )
    assert [(r[2], r[3], r[4]) for r in rows] == [(90, 210, "updated")]
    # In one batch as well, and again when begin moves back.
    d = next(_devices)
    rows = write(
        migrated,
        [
            event(d, "created", span(100, 200), TS),
            event(d, "updated", span(90, 210), TS + 1),
            event(d, "updated", span(100, 220), TS + 2),
        ],
    )
    assert [(r[2], r[3]) for r in rows] == [(100, 220)]


def test_intervals_that_only_touch_stay_apart(migrated):
    """With merge_message_after one message can end an interval and begin the next."""
    d = next(_devices)
    rows = write(
        migrated,
        [event(d, "created", span(100, 200), TS), event(d, "created", span(200, 300), TS + 1)],
        [event(d, "updated", span(95, 200), TS + 2), event(d, "updated", span(200, 310), TS + 3)],
    )
    assert [(r[2], r[3]) for r in rows] == [(95, 200), (200, 310)]
    rows = write(migrated, [event(d, "deleted", {"end": 200}, TS + 4)])
    assert [(r[2], r[3]) for r in rows] == [(200, 310)]


@pytest.mark.parametrize(
    "deletion",
    [
        {"begin": 90, "end": 210},  # the whole interval as it is now
        {"begin": 100, "end": 200},  # as it was first published
        {"begin": 90},
        {"begin": 100},  # the begin it was first seen with
        {"end": 210},
    ],
)
def test_a_deletion_finds_its_interval_by_any_field_it_carries(migrated, deletion):
    d = next(_devices)
    rows = write(
        migrated,
        [event(d, "created", span(100, 200), TS), event(d, "created", span(300, 400), TS)],
        [event(d, "updated", span(90, 210), TS + 1)],
        [event(d, "deleted", deletion, TS + 2)],
    )
    assert [(r[2], r[3]) for r in rows] == [(300, 400)]


def test_events_with_and_without_flespi_id_meet_on_one_row(migrated):
    d = next(_devices)
    rows = write(
        migrated,
        [event(d, "created", {"id": 7, **span(100, 200)}, TS)],
        [event(d, "updated", span(100, 230, mileage=5), TS + 1)],  # no id: the same interval
    )
    assert [(r[1], r[2], r[3]) for r in rows] == [(7, 100, 230)]
    rows = write(migrated, [event(d, "deleted", {"begin": 100}, TS + 2)])
    assert rows == []
    # An id-less interval is adopted by the first event that carries its id.
    d = next(_devices)
    rows = write(
        migrated,
        [event(d, "created", span(100, 200), TS)],
        [event(d, "updated", {"id": 8, **span(100, 210)}, TS + 1)],
        [event(d, "deleted", {"id": 8}, TS + 2)],
    )
    assert rows == []


def test_intervals_with_ids_are_never_merged_by_time(migrated):
    """Two intervals flespi gave ids to are two rows, even when their times overlap."""
    d = next(_devices)
    rows = write(
        migrated,
        [event(d, "created", {"id": 1, **span(100, 200)}, TS)],
        [event(d, "created", {"id": 2, **span(150, 250)}, TS + 1)],
        [event(d, "deleted", {"id": 1, **span(100, 200)}, TS + 2)],
    )
    assert [(r[1], r[2], r[3]) for r in rows] == [(2, 150, 250)]


def test_an_older_update_does_not_bring_a_deleted_interval_back(migrated):
    d = next(_devices)
    rows = write(
        migrated,
        [event(d, "created", span(100, 200), TS)],
        [event(d, "deleted", {"end": 200}, TS + 3)],
        [event(d, "updated", span(90, 200), TS + 2)],  # older than the deletion, begin moved
        [event(d, "updated", span(100, 205), TS + 1)],
    )
    assert rows == []
    rows = write(migrated, [event(d, "created", span(100, 220), TS + 4)])  # newer: a new life
    assert [(r[2], r[3]) for r in rows] == [(100, 220)]


def test_a_deletion_naming_no_interval_is_refused_for_its_content():
    record = decode(event(1, "deleted", {"duration": 5}, TS))
    assert isinstance(record, Rejection)
    assert record.reason == Reason.WRONG_SHAPE
    assert "nothing says which interval" in record.detail
    assert not isinstance(decode(event(1, "deleted", {"end": TS}, TS)), Rejection)
    assert isinstance(decode(event(1, "updated", {"end": TS}, TS)), Rejection)  # no begin


def test_rows_written_are_counted_by_the_store(migrated):
    d = next(_devices)
    url, schema = migrated

    async def run() -> dict[tuple[str, str], int]:
        engine = create_engine(url, schema)
        try:
            store = Store(engine)
            created = [event(d, "created", span(1, 2), TS + 1)]
            await store.write(coalesce((m, decode(m)) for m in created))
            stale = [event(d, "updated", span(1, 3), TS), event(d, "deleted", {"end": 2}, TS)]
            result = await store.write(coalesce((m, decode(m)) for m in stale))
            return dict(result.rows)
        finally:
            await engine.dispose()

    rows = asyncio.run(run())
    assert rows.get(("intervals", "upsert"), 0) == 0 and rows[("intervals", "stale")] == 1
    assert rows.get(("intervals", "delete"), 0) == 0  # older than the stored interval: kept


# One interval evolving (its begin and end move, counters change, it may be deleted) and one
# apart from it, written in two orders and batchings, as a redelivery or two share-group
# members would: the same rows must remain. Times include ties; deletions carry the span the
# interval had when they were sent.
TIMES = [TS, TS + 0.5, TS + 1, TS + 2]
VERSIONS = st.tuples(
    st.sampled_from(TIMES),
    st.sampled_from(["updated", "deleted"]),
    st.sampled_from([90, 100, 105]),
    st.sampled_from([190, 200, 210]),
    st.integers(0, 2),
)
HISTORIES = st.lists(VERSIONS, min_size=1, max_size=7)


def _events(device: int, history: list[tuple[float, str, int, int, int]]) -> list[Inbound]:
    events = [event(device, "created", span(500, 600), TS)]  # the interval apart
    for ts, name, begin, end, mileage in history:
        payload = span(begin, end, mileage=mileage) if name == "updated" else span(begin, end)
        events.append(event(device, name, payload, ts))
    return events


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(history=HISTORIES, order=st.randoms(), cuts=st.tuples(st.integers(0, 8), st.integers(0, 8)))
def test_an_interval_ends_the_same_in_any_order(migrated, history, order, cuts):
    results = []
    for sequence_order, cut in ((None, cuts[0]), (order, cuts[1])):
        d = next(_devices)
        events = _events(d, history)
        if sequence_order is not None:
            sequence_order.shuffle(events)
        cut %= len(events) + 1
        batches = [b for b in (events[:cut], events[cut:]) if b]
        results.append([r[1:] for r in write(migrated, *batches)])
    assert results[0] == results[1], history
    assert (None, 500, 600, "created") in [r[:4] for r in results[0]]  # untouched


def test_a_tombstone_inside_a_later_one_does_not_hide_it(migrated):
    """Deletions of 100-190 and, later, of 90-200, and an update of 105-190 at the second
    deletion's time: the deletion wins the tie whatever the order, though the update meets the
    first tombstone before the second (migration 0013; hypothesis found it)."""
    history = [(TS, "deleted", 100, 190, 0), (TS + 0.5, "updated", 105, 190, 0),
               (TS + 0.5, "deleted", 90, 200, 0)]  # fmt: skip
    orders = [[0, 1, 2, 3], [0, 2, 1, 3], [0, 3, 2, 1], [2, 0, 1, 3]]
    for order in orders:
        for cut in range(len(order) + 1):
            events = _events(next(_devices), history)
            events = [events[i] for i in order]
            batches = [b for b in (events[:cut], events[cut:]) if b]
            rows = [r[1:5] for r in write(migrated, *batches)]
            assert rows == [(None, 500, 600, "created")], (order, cut, rows)


async def test_the_live_path_keeps_one_row_per_interval(broker, database, schema_name):
    """Through Mosquitto and the daemon: the simulator's id-less shapes."""
    settings_ = settings_for(broker.url, database.url, schema_name)
    async with running_mirror(settings_) as running:
        pub = Publisher(broker.url)
        try:
            topic = "flespi/interval/gw/calcs/9/devices/1/{}"
            pub.publish(topic.format("created"), span(TS - 100, TS), TS)
            await settle(running)
            pub.publish(topic.format("updated"), span(TS - 110, TS + 10), TS + 10)
            await settle(running)
            rows = await query(running.engine, "SELECT extract(epoch FROM begin) FROM intervals")
            assert rows == [(TS - 110,)]
            pub.publish(topic.format("deleted"), {"end": TS + 10}, TS + 11)
        finally:
            pub.close()
        await settle(running)
        assert await query(running.engine, "SELECT count(*) FROM intervals") == [(0,)]
        assert await query(running.engine, "SELECT count(*) FROM dead_letters") == [(0,)]


def test_an_event_without_id_never_merges_two_intervals_with_ids(migrated):
    d = next(_devices)
    rows = write(
        migrated,
        [event(d, "created", {"id": 1, **span(100, 200)}, TS)],
        [event(d, "created", {"id": 2, **span(200, 300)}, TS)],
        [event(d, "updated", span(150, 250, mileage=3), TS + 1)],  # spans both
    )
    assert sorted(r[1] for r in rows) == [1, 2]
