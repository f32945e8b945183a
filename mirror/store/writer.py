"""Write a :class:`~mirror.batch.WritePlan` to PostgreSQL in one transaction.

The statements and their parameters come from ``statements.py``; this module runs them in one
transaction and decides what a failure means. Every error of a write falls in one of four kinds
(:func:`classify`):

- ``content``: PostgreSQL refused a *value* (SQLSTATE class 22, data exception; 54000, a value
  too large). Only this kind can make a dead letter, and only for a record that fails alone.
- ``size``: the part was too big or too slow for the server or the connection (57014
  statement_timeout, class 53 resources, the client's command timeout, a connection the server
  closed in the middle of a statement, e.g. a message over 1 GB). A smaller part may pass.
- ``held``: the environment refuses the write whatever its size (privileges, a missing table,
  an operator's trigger or constraint, an unreachable database). Nothing is acknowledged: the
  caller retries the same plan later and reports why it waits.
- a bug (anything that is not a database error) is not caught here: it crashes loudly.

A failing part is split in halves, each in its own savepoint, until it passes or one record is
left; so one refused row in a thousand costs about 2 x log2(1000) statements, not a savepoint
per row. When the server dropped the connection, the transaction is gone: the plan is written
again in parts half the size of the one that broke it.

One record that still runs out of time alone (a statement or command timeout) may be *set
aside* (``write(..., set_aside=True)``, the daemon's live stream): the plan is written again
without it and the record comes back in :attr:`WriteResult.set_aside`, for the caller to retry
on its own while the rest flows. Without that, one record too slow to write would hold every
later batch for good. Only a timeout sets a record aside; every other failure of one record is
held as before (the environment) or dead-lettered (its content).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeAlias

from sqlalchemy import Executable
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mirror.decode.families import FAMILIES, AppendWrites, StateWrites
from mirror.decode.records import (
    Inbound,
    Reason,
    Record,
    Rejection,
)
from mirror.ops.failures import error_chain, sqlstate
from mirror.store.batch import DeadLetter, WritePlan
from mirror.store.history import (
    ENSURE_HORIZON,
    LOCK_LATE_BUCKETS,
    READ_HORIZON,
    TIER_OF_TABLE,
    late_buckets,
)
from mirror.store.statements import (
    STATEMENTS,
    Operation,
    dead_letter_params,
    plan_operations,
)

log = logging.getLogger(__name__)

# SQLSTATE classes that mean "the database is away or busy", not "the write is wrong".
_RETRYABLE_SQLSTATE_CLASSES = {"08", "40", "53", "55", "57", "58"}
# Errors of the database or the connection to it. Anything else raised while writing is a bug.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (DBAPIError, PoolTimeout, OSError, TimeoutError)
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
_TRANSACTION_ABORTED = "25P02"  # in_failed_sql_transaction
Statement: TypeAlias = tuple[Executable, Mapping[str, Any]]


class Failure(StrEnum):
    """What a database error says about a write (see the module docstring)."""

    CONTENT = "content"
    SIZE = "size"
    HELD = "held"


class DatabaseUnavailable(Exception):
    """The database could not take the batch now; retry later, acknowledge nothing.

    ``held`` is True when the database is reachable but its environment refuses the write
    (privilege, missing object, an operator's trigger or constraint): only a person can fix that.
    """

    def __init__(self, detail: str, *, held: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.held = held


@dataclass
class WriteResult:
    """Rows touched, by (table, operation); operations: upsert, delete, append, stale."""

    rows: Counter[tuple[str, str]] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    splits: int = 0  # parts split in two because they failed
    # Records that ran out of time alone, left out of the transaction, with the error's text.
    set_aside: list[tuple[Record, str]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Classifying errors


def _is_database_error(exc: BaseException) -> bool:
    return isinstance(exc, DATABASE_ERRORS)


def _connection_lost(exc: BaseException) -> bool:
    """The connection broke (no SQLSTATE, or class 08), or its transaction is aborted (a
    timeout hit the SAVEPOINT statement itself): the transaction is gone."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    state = sqlstate(exc)
    if state is not None:
        return state.startswith("08") or state == _TRANSACTION_ABORTED
    return not _client_side_data_error(exc)


def _client_side_data_error(exc: BaseException) -> bool:
    """asyncpg refused to encode a value (e.g. an integer out of bigint range)."""
    return any(type(e).__name__ == "DataError" for e in error_chain(exc))


def classify(exc: BaseException) -> Failure:
    """What a database error raised by a write means; see the module docstring."""
    state = sqlstate(exc)
    if state is None:
        return Failure.CONTENT if _client_side_data_error(exc) else Failure.SIZE
    if state.startswith("22") or state == "54000":
        return Failure.CONTENT
    if state in ("57014", _TRANSACTION_ABORTED) or state[:2] in ("08", "53"):
        return Failure.SIZE
    return Failure.HELD


def is_retryable(exc: BaseException) -> bool:
    """True when the database cannot be reached or is busy: wait and try again.

    Only database and connection errors qualify. A bug (alembic's CommandError, SQLAlchemy's
    CompileError, a KeyError) is not an outage and must crash loudly.
    """
    if not _is_database_error(exc):
        return False
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    state = sqlstate(exc)
    if state is not None:
        return state[:2] in _RETRYABLE_SQLSTATE_CLASSES
    return not _client_side_data_error(exc)


# ---------------------------------------------------------------------------------------------
# Writing


class _ConnectionBroke(Exception):
    """A part broke the connection; write the plan again in smaller parts."""


class _TimedOutAlone(Exception):
    """One record ran out of time on its own: write the plan again without it."""

    def __init__(self, record: Record, detail: str) -> None:
        super().__init__(detail)
        self.record = record
        self.detail = detail


def _timed_out(exc: BaseException) -> bool:
    """PostgreSQL's statement_timeout, or the client's command timeout."""
    return sqlstate(exc) == "57014" or any(isinstance(e, TimeoutError) for e in error_chain(exc))


_WRITE_ERRORS: tuple[type[BaseException], ...] = (
    _ConnectionBroke,
    _TimedOutAlone,
    DatabaseUnavailable,
    *DATABASE_ERRORS,
)


class Turn:
    """A write's place in line, for the write that follows it on another connection.

    The pipeline keeps two batches in writing at once (pipeline.py). A later write's upsert or
    append into a table the earlier one also upserts (appends) into runs only once the earlier
    one has run its own: the earlier transaction then holds the locks of its rows (and of the
    keys it inserts) until it commits, so a key that both batches write is written in the order
    the messages came, and the later statement waits for exactly the rows they share. Anything
    else that meets the earlier write's table (a deletion on either side, the custom writes of
    objects, intervals and calculators, which read before they write) waits until the earlier
    write is over: a statement's snapshot would not see the other's uncommitted rows. Tables
    are written in one order, so neither write waits for the other in a circle. A turn is over
    once its write has committed, or its transaction failed (to be tried again); ``acked`` then
    tells the later write whether this one's batch was acknowledged: acknowledgements go out in
    the order the messages came."""

    def __init__(self, before: Turn | None = None) -> None:
        self.over = False
        # Kept until it is settled: its statements may be over while its ack still waits.
        self.before = before if before is not None and not before.acked.done() else None
        self._steps: frozenset[str] | None = None  # "table.op" of this write; None: unknown
        self._passed: dict[str, asyncio.Event] = {}
        self._over = asyncio.Event()
        self.acked: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def plan(self, steps: Sequence[str]) -> None:
        self._steps = frozenset(steps)

    def passed(self, step: str) -> None:
        self._passed.setdefault(step, asyncio.Event()).set()

    def end(self) -> None:
        """Over: every statement after it may go."""
        self.over = True
        self._over.set()

    async def _allows(self, step: str) -> None:
        """Return once a later write may run ``step`` ("table.op")."""
        if self.over:
            return
        steps = self._steps
        if steps is None:  # not known (a plan written in parts): after it, then
            await self._over.wait()
            return
        table, op = step.split(".", 1)
        if not any(s.startswith(table + ".") for s in steps):
            return  # nothing of this table here
        if table in _LOCKED_BY_ROW and op in ("upsert", "append") and (
            f"{table}.delete" not in steps
        ):
            if step in steps:
                passed = self._passed.setdefault(step, asyncio.Event())
                await _first(passed.wait(), self._over.wait())
            return
        await self._over.wait()

    async def wait_before(self, step: str) -> None:
        if self.before is not None:
            await self.before._allows(step)

    def settle(self, acked: bool) -> None:
        """Its batch acknowledged (or not): the write after it may acknowledge its own."""
        self.end()
        self.before = None  # no chain of turns kept alive
        if not self.acked.done():
            self.acked.set_result(acked)


# Tables whose upsert or append is one statement that locks each row (or inserted key) it
# writes: two writes meet only at shared keys, in line (Turn).
_LOCKED_BY_ROW = frozenset(
    spec.table for spec in FAMILIES if isinstance(spec.writes, StateWrites | AppendWrites)
)


async def _first(*waits: Coroutine[Any, Any, Any]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


class Store:
    """Writes plans through a SQLAlchemy async engine whose connections use the mirror schema."""

    def __init__(
        self, engine: AsyncEngine, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    ) -> None:
        self.engine = engine
        self.max_payload_bytes = max_payload_bytes
        # Records per statement; None = the whole plan. Lowered when a part broke the
        # connection, raised again (doubled) after every plan written in full.
        self.part_limit: int | None = None
        self._too_big: int | None = None

    async def write(
        self,
        plan: WritePlan,
        *,
        then: Sequence[Statement] = (),
        set_aside: bool = False,
        turn: Turn | None = None,
    ) -> WriteResult:
        """Write the plan; refused records become dead letters.

        Raises :class:`DatabaseUnavailable` (nothing written) when the database is away or its
        environment refuses the write; the caller keeps the plan and tries again later.
        ``then`` runs in the same transaction after the plan (a replay deletes the dead letters
        it re-processed, so a crash can neither lose nor double them). With ``set_aside``, a
        record that times out alone is left out and returned in ``set_aside`` (see above).
        With ``turn``, its statements keep their place behind the write before (:class:`Turn`).
        """
        records = plan.records()
        aside: list[tuple[Record, str]] = []
        while True:
            limit = self.part_limit or max(1, len(records))
            self._too_big = None  # the smallest part that failed for its size, this attempt
            try:
                async with self.engine.begin() as conn:
                    result = await self._write_parts(conn, plan, records, limit, set_aside, turn)
                    for statement, params in then:
                        await conn.execute(statement, params)
            except _WRITE_ERRORS as exc:
                if turn is not None:  # rolled back: the write after this one need not wait
                    turn.end()
                alone = next((e for e in error_chain(exc) if isinstance(e, _TimedOutAlone)), None)
                if alone is not None:  # the parts above it failed for it, not their size
                    log.warning("a record timed out alone (%s); setting it aside", alone.detail)
                    aside.append((alone.record, alone.detail))
                    records = [r for r in records if r is not alone.record]
                    continue
                broke = next((e for e in error_chain(exc) if isinstance(e, _ConnectionBroke)), None)
                if broke is None:
                    self._adapt_part_limit(limit, len(records))
                    held = _unavailable(exc)
                    if held is exc:
                        raise
                    raise held from exc
                self.part_limit = max(1, limit // 2)
                log.warning("%s; writing the batch again in parts of %d", broke, self.part_limit)
                continue
            self._adapt_part_limit(limit, len(records))
            result.set_aside = aside
            return result

    def _adapt_part_limit(self, limit: int, records: int) -> None:
        """After an attempt: start the next one below the smallest part that was too big (a
        statement_timeout stays tight), or grow back towards whole plans (doubling)."""
        if self._too_big is not None:
            self.part_limit = max(1, self._too_big // 2)
        elif self.part_limit is not None:
            self.part_limit = None if limit * 2 >= records else limit * 2

    async def _write_parts(
        self,
        conn: AsyncConnection,
        plan: WritePlan,
        records: list[Record],
        limit: int,
        set_aside: bool = False,
        turn: Turn | None = None,
    ) -> WriteResult:
        result = WriteResult()
        refused: list[DeadLetter] = []
        operations = None
        if limit >= len(records):  # one part, the whole plan: its statements, known now
            operations = plan_operations(plan)
            if turn is not None:  # the write after this one skips what it will not meet
                turn.plan([f"{table}.{op}" for table, op, _ in operations])
        horizon = await _guard_history(conn, plan)
        for start in range(0, len(records), limit):
            part = records[start : start + limit]
            await self._write_part(
                conn, plan, part, result, refused, horizon, set_aside, turn, operations
            )
        letters = [*plan.dead_letters, *refused]
        if letters:
            params = dead_letter_params(letters, self.max_payload_bytes)
            await conn.execute(STATEMENTS["dead_letters.append"], params)
            result.dead_letters.update(str(d.rejection.reason) for d in letters)
        return result

    async def _write_part(
        self,
        conn: AsyncConnection,
        plan: WritePlan,
        part: Sequence[Record],
        result: WriteResult,
        refused: list[DeadLetter],
        horizon: float,
        set_aside: bool = False,
        turn: Turn | None = None,
        operations: list[Operation] | None = None,
    ) -> None:
        """Write ``part`` in a savepoint; split it in halves while it fails and may pass smaller.
        ``operations``: the plan's statements, when the part is the whole plan."""
        try:
            async with conn.begin_nested():
                sub = plan if operations is not None else _sub_plan(plan, part)
                written = await self._write_all(conn, sub, horizon, turn, operations)
        except DATABASE_ERRORS as exc:
            if set_aside and len(part) == 1 and _timed_out(exc):
                raise _TimedOutAlone(part[0], _describe(exc)) from exc
            failure = self._failure_of(exc, len(part))
            if failure is Failure.SIZE:
                self._too_big = min(self._too_big or len(part), len(part))
            if len(part) == 1:
                if failure is not Failure.CONTENT:
                    raise DatabaseUnavailable(_describe(exc), held=not is_retryable(exc)) from exc
                refused.append(_refusal(plan, part[0], exc))
                return
            result.splits += 1
            half = len(part) // 2
            for half_part in (part[:half], part[half:]):
                await self._write_part(
                    conn, plan, half_part, result, refused, horizon, set_aside, turn
                )
            return
        result.rows.update(written.rows)

    @staticmethod
    def _failure_of(exc: BaseException, size: int) -> Failure:
        """Classify; hold at once what splitting cannot help; give up a broken connection."""
        failure = classify(exc)
        if failure is Failure.HELD:
            raise DatabaseUnavailable(_describe(exc), held=not is_retryable(exc)) from exc
        if failure is Failure.SIZE and _connection_lost(exc):
            if size == 1:
                raise DatabaseUnavailable(_describe(exc)) from exc
            raise _ConnectionBroke(f"a part of {size} records broke the connection") from exc
        return failure

    async def _write_all(
        self,
        conn: AsyncConnection,
        plan: WritePlan,
        horizon: float = -math.inf,
        turn: Turn | None = None,
        operations: list[Operation] | None = None,
    ) -> WriteResult:
        result = WriteResult()
        if operations is None:
            operations = plan_operations(plan)
        for table, op, params in operations:
            bound: dict[str, Any] = dict(params)
            if table in TIER_OF_TABLE:  # late rows are those before the horizon
                bound["horizon"] = horizon
            step = f"{table}.{op}"
            if turn is not None:
                await turn.wait_before(step)
            cursor = await conn.execute(STATEMENTS[step], bound)
            if turn is not None:
                turn.passed(step)
            if op.startswith("merge"):  # props brought up to date: not rows written
                continue
            count = len(next(iter(params.values())))
            # A statement that keeps summaries as well yields the count of rows it inserted.
            affected = int(cursor.scalar() or 0) if cursor.returns_rows else max(cursor.rowcount, 0)
            result.rows[(table, op)] += affected
            if op in ("upsert", "append") and affected < count:
                result.rows[(table, "stale" if op == "upsert" else "duplicate")] += count - affected
        return result


async def _guard_history(conn: AsyncConnection, plan: WritePlan) -> float:
    """Before a plan with messages of a two-tier history (history.py): read the horizon, holding
    it for the transaction, and lock the day buckets of the rows before it (they may be packed
    already, or being packed). Returns the horizon (Unix time; -inf: nothing packed yet)."""
    times = [r.ts for table in TIER_OF_TABLE for r in plan.rows(table)]
    if not times:
        return -math.inf
    horizon = (await conn.execute(READ_HORIZON)).scalar()
    if horizon is None:  # the row is made by the migration; someone removed it
        await conn.execute(ENSURE_HORIZON)
        horizon = (await conn.execute(READ_HORIZON)).scalar()
    horizon = float(horizon) if horizon is not None else -math.inf
    # A time just before the horizon that PostgreSQL rounds up to it is locked needlessly, never
    # the other way round: the horizon is a whole hour.
    late = late_buckets(times, horizon)
    if late:
        await conn.execute(LOCK_LATE_BUCKETS, {"buckets": late})
    return horizon


def _unavailable(exc: BaseException) -> DatabaseUnavailable:
    """The error to hold a batch with (the first DatabaseUnavailable raised, if any)."""
    for current in error_chain(exc):
        if isinstance(current, DatabaseUnavailable):
            return current
    return DatabaseUnavailable(_describe(exc), held=not is_retryable(exc))


def _sub_plan(plan: WritePlan, records: Sequence[Record]) -> WritePlan:
    """The records of ``plan`` given (in plan order), without its dead letters."""
    part = WritePlan()
    for record in records:
        part.add(record)
    return part


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


__all__ = [
    "DatabaseUnavailable",
    "Failure",
    "Store",
    "WriteResult",
    "classify",
    "is_retryable",
]
