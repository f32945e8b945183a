"""The family declarations: topics generated from the route patterns themselves must decode.

A property test whose topics never match a route never reaches a builder. These strategies
build every topic from the patterns declared in ``families.py``, so a new family is exercised
as soon as it is declared, and a valid topic rejected as "could not decode" fails here.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror.decode.families import FAMILIES, FAMILY_OF_RECORD, CustomWrites
from mirror.decode.records import Inbound, Rejection
from mirror.decode.topics import ROUTES, Route, decode
from mirror.store.statements import CUSTOM, STATEMENTS, plan_operations
from tests.strategies import (
    NOW,
    any_payload,
    topic_for,
    valid_payload,
    valid_properties,
)

ALL_ROUTES = [route for group in ROUTES.values() for route in group]


def _winner(topic: str) -> Route:
    levels = topic.split("/")
    return next(r for r in ROUTES[(levels[0], levels[1])] if r.match(topic) is not None)


@pytest.mark.parametrize("route", ALL_ROUTES, ids=[r.pattern for r in ALL_ROUTES])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_generated_valid_topic_decodes(route: Route, data: st.DataObject) -> None:
    topic = data.draw(topic_for(route))
    payload = data.draw(valid_payload())
    record = decode(Inbound(topic, payload, data.draw(valid_properties()), NOW))
    assert not isinstance(record, Rejection), (topic, record)
    winner = _winner(topic)
    assert record.family == winner.family or winner.family == route.family
    assert winner is route or winner.specificity >= route.specificity


@settings(max_examples=800, deadline=None)
@given(data=st.data())
def test_no_route_topic_is_ever_rejected_as_could_not_decode(data: st.DataObject) -> None:
    route = data.draw(st.sampled_from(ALL_ROUTES))
    topic = data.draw(topic_for(route))
    props = data.draw(st.one_of(valid_properties(), st.dictionaries(st.text(), st.text())))
    result = decode(Inbound(topic, data.draw(any_payload()), props, NOW))
    if isinstance(result, Rejection):
        assert not result.detail.startswith("could not decode"), (topic, result)
        assert result.family == _winner(topic).family
    else:
        for field in ("value", "config", "props", "data", "payload"):
            stored = getattr(result, field, None)
            if isinstance(stored, str):
                json.loads(stored)  # what we store is JSON


def test_each_family_has_a_record_a_table_and_its_statements() -> None:
    tables = [spec.table for spec in FAMILIES]
    assert len(set(tables)) == len(tables)
    for spec in FAMILIES:
        assert FAMILY_OF_RECORD[spec.record] is spec
        if isinstance(spec.writes, CustomWrites):
            assert spec.writes.name in CUSTOM
        assert any(key.startswith(f"{spec.table}.") for key in STATEMENTS), spec.table


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_every_decoded_record_turns_into_known_statements(data: st.DataObject) -> None:
    from mirror.store.batch import coalesce

    decoded = []
    for _ in range(data.draw(st.integers(1, 8))):
        route = data.draw(st.sampled_from(ALL_ROUTES))
        inbound = Inbound(
            data.draw(topic_for(route)),
            data.draw(valid_payload()),
            data.draw(valid_properties()),
            NOW,
        )
        decoded.append((inbound, decode(inbound)))
    for table, op, params in plan_operations(coalesce(decoded)):
        assert f"{table}.{op}" in STATEMENTS
        assert len({len(column) for column in params.values()}) == 1
