"""Ties are deterministic (issue 8 item 8, issue 9 item 6), proven against real PostgreSQL.

Updates of one key, some with equal timestamps (also equal only at PostgreSQL's microsecond),
some deletions, are written in two different orders and batchings, as a redelivery or two
share-group members would: the stored row must be the same.
"""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror.decode.records import Inbound
from mirror.decode.topics import decode
from mirror.store.batch import coalesce
from mirror.store.database import create_engine
from mirror.store.writer import Store
from tests.helpers import migrated_schema, query

# 1700000000.0000011 and .0000009 are one microsecond in PostgreSQL: a tie at its precision.
TIMES = [1_700_000_000.0000009, 1_700_000_000.0000011, 1_700_000_000.5, 1_700_000_001.0]
VALUES = [None, 1, 2, "a", {"k": 1}]
_keys = itertools.count(1)

UPDATES = st.lists(
    st.tuples(st.sampled_from(TIMES), st.sampled_from(VALUES)), min_size=1, max_size=8
)


def _messages(topic: str, updates: list[tuple[float, object]]) -> list[Inbound]:
    return [
        Inbound(topic, b"" if v is None else json.dumps(v).encode(), {"timestamp": repr(ts)}, ts)
        for ts, v in updates
    ]


async def _write(url: str, schema: str, batches: list[list[Inbound]]) -> None:
    engine = create_engine(url, schema)
    try:
        store = Store(engine)
        for batch in batches:
            await store.write(coalesce((m, decode(m)) for m in batch))
    finally:
        await engine.dispose()


async def _rows(url: str, schema: str, sql: str, key: int) -> list[object]:
    engine = create_engine(url, schema)
    try:
        return [tuple(r) for r in await query(engine, sql, k=key)]
    finally:
        await engine.dispose()


def _split(messages: list[Inbound], cut: int) -> list[list[Inbound]]:
    cut = cut % (len(messages) + 1)
    return [b for b in (messages[:cut], messages[cut:]) if b]


@pytest.fixture(scope="module")
def migrated(database):
    return migrated_schema(database.url, "t_ties")


FAMILIES = {
    "telemetry": (
        "flespi/state/gw/devices/{k}/telemetry/x",
        "SELECT value::text, extract(epoch FROM ts) FROM telemetry WHERE device_id = :k",
    ),
    "object property": (
        "flespi/state/gw/devices/{k}/name",
        "SELECT props::text, value::text FROM objects"
        " LEFT JOIN object_properties p USING (api, origin, id) WHERE id = :k",
    ),
    "calculator device": (
        "flespi/state/gw/calcs/1/devices/{k}/last",
        "SELECT last::text, extract(epoch FROM last_ts) FROM calculator_devices"
        " WHERE device_id = :k",
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(updates=UPDATES, order=st.randoms(), cuts=st.tuples(st.integers(0, 8), st.integers(0, 8)))
def test_equal_timestamps_end_the_same_in_any_order(migrated, family, updates, order, cuts):
    url, schema = migrated
    topic, sql = FAMILIES[family]
    shuffled = updates[:]
    order.shuffle(shuffled)
    results = []
    for sequence, cut in ((updates, cuts[0]), (shuffled, cuts[1])):
        key = next(_keys)
        messages = _messages(topic.format(k=key), sequence)
        asyncio.run(_write(url, schema, _split(messages, cut)))
        results.append(asyncio.run(_rows(url, schema, sql, key)))
    assert results[0] == results[1], (updates, shuffled)


def _state(topic: str, value: object, ts: float) -> Inbound:
    payload = b"" if value is None else json.dumps(value).encode()
    return Inbound(topic, payload, {"timestamp": repr(ts)}, ts)


@pytest.mark.parametrize("together", [True, False])
def test_object_props_are_the_same_whether_patched_or_rebuilt(migrated, together):
    """A newer whole object, then the removal of a property only properties had made: in one
    batch props are rebuilt, in two the removal is patched. Both leave no empty level; a level
    the whole payload carries stays, even emptied."""
    url, schema = migrated
    key = next(_keys)
    base = f"flespi/state/gw/devices/{key}"
    first = [
        _state(base, {"id": key, "name": "a", "sensors": {"s1": 1}}, 1.0),
        _state(f"{base}/connections/77", {"ident": "1"}, 2.0),
        _state(f"{base}/counters/day/km", 5, 2.0),
        _state(f"{base}/sensors/s2", 2, 2.0),
    ]
    newer = _state(base, {"id": key, "name": "b", "sensors": {"s2": 2}}, 3.0)
    removals = [
        _state(f"{base}/connections/77", None, 4.0),
        _state(f"{base}/counters/day/km", None, 4.0),
        _state(f"{base}/sensors/s2", None, 4.0),
    ]
    later = [[newer, *removals]] if together else [[newer], removals]
    asyncio.run(_write(url, schema, [first, *later]))
    sql = "SELECT props FROM objects WHERE id = :k"
    assert asyncio.run(_rows(url, schema, sql, key)) == [({"id": key, "name": "b", "sensors": {}},)]
