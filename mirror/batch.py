"""Coalesce a batch of decoded records into the writes one transaction will make.

Pure. Per key the newest record wins (by ``ts``; on a tie the one that arrived last), so one
multi-row upsert never holds a key twice (PostgreSQL refuses ``ON CONFLICT DO UPDATE`` that
touches a row twice). Keys are sorted so concurrent writers lock rows in the same order and
cannot deadlock. History messages are deduplicated by their identity.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mirror.families import FAMILIES, FAMILY_OF_RECORD, AppendWrites
from mirror.records import Inbound, Record, Rejection

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


def coalesce(decoded: Iterable[tuple[Inbound, Record | Rejection]]) -> WritePlan:
    """Build the write plan for records given in arrival order."""
    plan = WritePlan()
    newest: dict[tuple[Any, ...], tuple[Record, Inbound]] = {}
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
        elif isinstance(record, _HISTORY):
            continue  # the same message again (a redelivery): keep the first copy
        elif record.ts >= current[0].ts:
            newest[key] = (record, message)  # newer, or as new and arrived later
    plan.superseded = seen - len(newest)
    # Keys start with their table name; within a table they share one shape, so they compare.
    for key in sorted(newest):
        record, message = newest[key]
        plan.add(record)
        plan.origins[id(record)] = message
    return plan
