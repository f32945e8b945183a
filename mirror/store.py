"""Write a :class:`~mirror.batch.WritePlan` to PostgreSQL in one transaction.

The statements and their parameters come from ``statements.py``; this module runs them in one
transaction and decides what a failure means.

Errors split two ways. A database that cannot be reached raises :class:`DatabaseUnavailable`:
nothing is acknowledged and the caller retries the same plan. A row PostgreSQL refuses (a value
it will not store) is isolated: the plan is written again record by record, each in a
savepoint, and the refused records become dead letters, so one bad row never blocks the stream.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mirror.batch import DeadLetter, WritePlan
from mirror.records import (
    Inbound,
    Reason,
    Record,
    Rejection,
)
from mirror.statements import STATEMENTS, dead_letter_params, plan_operations

log = logging.getLogger(__name__)

# SQLSTATE classes that mean "try again later", not "this row is bad".
_RETRYABLE_SQLSTATE_CLASSES = {"08", "40", "53", "55", "57", "58"}


class DatabaseUnavailable(Exception):
    """The database could not take the batch now; retry later, acknowledge nothing."""


@dataclass
class WriteResult:
    """Rows touched, by (table, operation); operations: upsert, delete, append, stale."""

    rows: Counter[tuple[str, str]] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)


# ---------------------------------------------------------------------------------------------
# Writing


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error, looking through SQLAlchemy's and asyncpg's wrappers."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        state = getattr(current, "sqlstate", None)
        if isinstance(state, str) and state:
            return state
        current = getattr(current, "orig", None) or current.__cause__
    return None


def is_retryable(exc: BaseException) -> bool:
    """True when the database, not the data, is the problem."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    state = sqlstate(exc)
    if state is not None:
        return state[:2] in _RETRYABLE_SQLSTATE_CLASSES
    # No SQLSTATE: a client-side encoding problem is the data's fault; anything else
    # (refused connection, reset socket, timeout, pool exhausted) is the database's.
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = getattr(current, "orig", None) or current.__cause__
    return not any(type(e).__name__ == "DataError" for e in chain)


class Store:
    """Writes plans through a SQLAlchemy async engine whose connections use the mirror schema."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def write(self, plan: WritePlan) -> WriteResult:
        try:
            async with self.engine.begin() as conn:
                return await self._write_all(conn, plan)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            if is_retryable(exc):
                raise DatabaseUnavailable(_describe(exc)) from exc
            log.warning("a batch was refused (%s); isolating the offending records", _describe(exc))
        try:
            return await self._write_isolating(plan)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            raise DatabaseUnavailable(_describe(exc)) from exc

    async def _write_all(self, conn: AsyncConnection, plan: WritePlan) -> WriteResult:
        result = WriteResult()
        if plan.dead_letters:
            await conn.execute(
                STATEMENTS["dead_letters.append"], dead_letter_params(plan.dead_letters)
            )
            result.dead_letters.update(str(d.rejection.reason) for d in plan.dead_letters)
        for table, op, params in plan_operations(plan):
            cursor = await conn.execute(STATEMENTS[f"{table}.{op}"], params)
            if op == "merge":
                continue
            count = len(next(iter(params.values())))
            affected = max(cursor.rowcount, 0)
            result.rows[(table, op)] += affected
            if op in ("upsert", "append") and affected < count:
                result.rows[(table, "stale" if op == "upsert" else "duplicate")] += count - affected
        return result

    async def _write_isolating(self, plan: WritePlan) -> WriteResult:
        """Write each record in its own savepoint; refused ones become dead letters."""
        result = WriteResult()
        refused: list[DeadLetter] = []
        async with self.engine.begin() as conn:
            for record in plan.records():
                single = _single_plan(record)
                try:
                    async with conn.begin_nested():
                        partial = await self._write_all(conn, single)
                except SQLAlchemyError as exc:
                    if is_retryable(exc):
                        raise
                    refused.append(_refusal(plan, record, exc))
                    continue
                result.rows.update(partial.rows)
            letters = [*plan.dead_letters, *refused]
            if letters:
                await conn.execute(STATEMENTS["dead_letters.append"], dead_letter_params(letters))
                result.dead_letters.update(str(d.rejection.reason) for d in letters)
        return result


def _single_plan(record: Record) -> WritePlan:
    plan = WritePlan()
    plan.add(record)
    return plan


def _refusal(plan: WritePlan, record: Record, exc: BaseException) -> DeadLetter:
    origin = plan.origins.get(id(record))
    if origin is None:  # a plan built by hand (tests): describe the record instead
        origin = Inbound(f"{record.family}:{record.key!r}"[:1000], b"", {}, record.received_at)
    return DeadLetter(origin, Rejection(Reason.DATABASE_REJECTED, _describe(exc), record.family))


def _describe(exc: BaseException) -> str:
    state = sqlstate(exc)
    first_line = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    text_ = first_line[0] if first_line else type(exc).__name__
    return (f"[{state}] " if state else "") + text_[:300]


__all__ = ["DatabaseUnavailable", "Store", "WriteResult", "is_retryable"]
