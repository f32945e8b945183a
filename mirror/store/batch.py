"""Coalesce a batch of decoded records into the writes one transaction will make.

Pure. Per key the newest record wins. Times are compared at the microsecond, as PostgreSQL
stores them (``ts_micros``), so a tie here is a tie in the database. Ties are deterministic,
whatever order records arrive in (a redelivery, two share-group members): a deletion wins;
between updates the greatest value (jsonb ordering) wins. Python cannot order jsonb, so tied
updates all stay in the plan and the statement picks one (``DISTINCT ON``, see
statements.py); the same rule guards the row already stored. Keys are sorted so concurrent
writers lock rows in the same order and cannot deadlock. History messages are deduplicated
by their identity.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mirror.decode.families import FAMILIES, FAMILY_OF_RECORD, AppendWrites
from mirror.decode.records import Inbound, Record, Rejection

# Tables in declaration order: the order a plan is written in, so writers lock alike.
_TABLE_ORDER = {spec.table: i for i, spec in enumerate(FAMILIES)}
_HISTORY = tuple(spec.record for spec in FAMILIES if isinstance(spec.writes, AppendWrites))


@dataclass(frozen=True, slots=True)
class DeadLetter:
    message: Inbound
    rejection: Rejection


@dataclass
class WritePlan:
    """Everything one transaction writes, grouped by table (in ``FAMILIES`` order), each list
    sorted by key."""

    tables: dict[str, list[Record]] = field(default_factory=dict)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    superseded: int = 0  # records dropped because a newer one for the same key was in the batch
    # The received message behind each record kept (by id of the record), so a record the
    # database refuses can still be dead-lettered with its original topic and payload.
    origins: dict[int, Inbound] = field(default_factory=dict)

    def add(self, record: Record) -> None:
        table = FAMILY_OF_RECORD[type(record)].table
        if table not in self.tables:
            self.tables[table] = []
            self.tables = dict(sorted(self.tables.items(), key=lambda t: _TABLE_ORDER[t[0]]))
        self.tables[table].append(record)

    def rows(self, table: str) -> list[Record]:
        """The records a table gets (an empty list when none)."""
        return self.tables.get(table, [])

    def records(self) -> list[Record]:
        """Every record of the plan, table by table."""
        return [r for rows in self.tables.values() for r in rows]


def ts_micros(ts: float) -> int:
    """A Unix time as PostgreSQL's ``to_timestamp()`` stores it: whole microseconds since 2000,
    rounded half to even (the same float operations as its ``float8_timestamptz``)."""
    return round((ts - _POSTGRES_EPOCH) * 1_000_000)


_POSTGRES_EPOCH = 946_684_800.0


def _value(record: Record) -> Any:
    return getattr(record, record.value_field)  # type: ignore[union-attr]


def _merge_tied(kept: list[Record], record: Record) -> list[Record]:
    """Records of one key with the same time: a deletion beats updates; updates stay all
    (distinct values), for the statement to choose among."""
    value = _value(record)
    current = _value(kept[0])
    if current is None:
        return kept  # a deletion already won
    if value is None:
        return [record]
    if any(_value(r) == value for r in kept):
        return kept
    return [*kept, record]


def coalesce(decoded: Iterable[tuple[Inbound, Record | Rejection]]) -> WritePlan:
    """Build the write plan for records given in arrival order."""
    plan = WritePlan()
    # key -> (record, message) while a key has one record (most keys of most batches); from its
    # second record on, [time in µs, records kept, their messages]
    newest: dict[tuple[Any, ...], Any] = {}
    seen = 0
    for message, record in decoded:
        if isinstance(record, Rejection):
            plan.dead_letters.append(DeadLetter(message, record))
            continue
        seen += 1
        key = record.key
        current = newest.get(key)
        if current is None:
            newest[key] = (record, message)
            continue
        if isinstance(record, _HISTORY):
            continue  # the same message again: stored once
        if type(current) is tuple:
            current = newest[key] = [ts_micros(current[0].ts), [current[0]], [current[1]]]
        micros = ts_micros(record.ts)
        if micros > current[0]:
            newest[key] = [micros, [record], [message]]
        elif micros == current[0]:
            kept = _merge_tied(current[1], record)
            if kept is not current[1]:
                messages = [message] if kept == [record] else [*current[2], message]
                newest[key] = [micros, kept, messages]
    # Keys start with a name of their family and, within a family, share one shape, so they
    # compare; sorted, each family's keys come in one run.
    tables: dict[str, list[Record]] = {}
    origins = plan.origins
    rows: list[Record] = []
    head = None
    for key in sorted(newest):
        entry = newest[key]
        single = type(entry) is tuple
        if key[0] != head:  # a family's first key: its table's list
            head = key[0]
            first = entry[0] if single else entry[1][0]
            rows = tables.setdefault(FAMILY_OF_RECORD[type(first)].table, [])
        if single:
            rows.append(entry[0])
            origins[id(entry[0])] = entry[1]
            continue
        for record, message in zip(entry[1], entry[2], strict=True):
            rows.append(record)
            origins[id(record)] = message
    plan.tables = dict(sorted(tables.items(), key=lambda t: _TABLE_ORDER[t[0]]))
    plan.superseded = seen - len(origins)
    return plan
