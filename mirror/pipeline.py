"""The daemon: MQTT session → decode → coalesce → one transaction → acknowledge.

The pipeline owns what joins the pieces: batching (flush on size or after a short interval),
retrying a batch while the database is unavailable (nothing is acknowledged meanwhile, and the
source stops reading at its bound), health, metrics, and the order of shutdown: stop reading,
commit and acknowledge what is in hand, disconnect keeping the session.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import faulthandler
import gc
import itertools
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import NamedTuple

from sqlalchemy.ext.asyncio import AsyncEngine

from mirror.decode.records import Inbound, Reason, Record, Rejection
from mirror.decode.topics import decode, lag_reference
from mirror.ops import metrics
from mirror.ops.config import Settings
from mirror.ops.failures import database_unreachable
from mirror.repair import resync
from mirror.repair.backfill import iso_time
from mirror.repair.rest_carrier import session_rest_client
from mirror.session.source import Batch, MqttSource, Received
from mirror.snapshot import (
    SnapshotCoordinator,
    ask_for_missing_retained_state,
    record_retained_state,
)
from mirror.store import compaction, partitions, summaries
from mirror.store.batch import WritePlan, coalesce
from mirror.store.database import migrate
from mirror.store.writer import DatabaseUnavailable, Store, Turn, WriteResult

log = logging.getLogger(__name__)

RETRY_MIN = 0.2
RETRY_MAX = 10.0
# A record set aside is retried on its own after 1 s (a lock that made it time out may be gone),
# then at doubling intervals up to 5 minutes.
ASIDE_RETRY_MIN = 1.0
ASIDE_RETRY_MAX = 300.0
# A repair that failed (or waits for another process's) is tried again after 5 s, doubling to
# 5 minutes.
REPAIR_RETRY_MIN = 5.0
REPAIR_RETRY_MAX = 300.0
# DISCONNECT reason codes of a broker that is shedding load: Server busy, Quota exceeded,
# Message rate too high. flespi does not document the code it sends past its session limit.
DROPPING_REASON_CODES = frozenset((0x89, 0x97, 0x96))
# A hold counts for a lost link when it was still on this many seconds before the loss was seen.
HOLD_RECENT = 60.0
# A stop that outlasts --shutdown-timeout by this much is overdue: the process says what it
# waited on and exits (nothing is lost: what it did not acknowledge is delivered again).
SHUTDOWN_GRACE = 5.0
# Messages decoded between two turns of the event loop while a batch is being written (about
# 2 ms of work): the write's next round trip to PostgreSQL waits at most that long.
PREPARE_SLICE = 500
# Batches written at once, each on its own connection (see _consume and store.Turn).
# One write at a time. Two in flight (store.Turn keeps their order) drained about a third faster,
# but a fresh-clone run stalled with messages unacknowledged in one of three runs of
# test_ten_thousand_bad_messages_in_a_normal_stream_are_counted_exactly (a write waiting in
# asyncpg for 60 s); until that stall is found, correctness first.
WRITES_IN_FLIGHT = 1
EXIT_SHUTDOWN_OVERDUE = 3


_FAMILY = attrgetter("family")
_QOS = attrgetter("qos")


def _inbound(m: Received) -> Inbound:
    """What the session received, as decoding takes it."""
    return Inbound(
        m.topic, m.payload, m.properties, m.received_at, m.retain, m.qos, m.message_expiry
    )


class Prepared(NamedTuple):
    """A batch decoded and coalesced, ready to be written."""

    batch: Batch
    decoded: list[tuple[Inbound, Record | Rejection]]
    plan: WritePlan


@dataclass
class _Aside:
    """A record set aside after it timed out alone (store.py), with its messages, unacked."""

    plan: WritePlan
    batch: Batch
    since: float  # Unix time it was set aside
    detail: str
    attempts: int = 0
    next_try: float = field(default_factory=lambda: time.monotonic() + ASIDE_RETRY_MIN)

    def retry_later(self, detail: str) -> None:
        self.detail = detail
        self.attempts += 1
        delay = min(ASIDE_RETRY_MAX, ASIDE_RETRY_MIN * 2**self.attempts)
        self.next_try = time.monotonic() + delay


def _tune_gc() -> None:
    """What the daemon holds from its start (modules, compiled statements, the engine) leaves
    the collector's sight, and the youngest generation is collected every 50,000 allocations
    instead of 700: a batch allocates a few objects per message, almost all freed by reference
    counting, so the default thresholds ran full collections over everything held, many times
    a batch."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


class ShutdownTimeout(Exception):
    """The database stayed unavailable past the shutdown deadline; the batch stays unacked."""


class Mirror:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        *,
        health: metrics.Health | None = None,
        resync: bool = False,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = Store(engine, max_payload_bytes=settings.max_payload_bytes)
        # One store per write in flight: each adapts its own part size to what it meets.
        self._stores = [self.store] + [
            Store(engine, max_payload_bytes=settings.max_payload_bytes)
            for _ in range(WRITES_IN_FLIGHT - 1)
        ]
        self._next_store = itertools.cycle(self._stores)
        self.health = health or metrics.Health()
        self.source = MqttSource(
            settings,
            on_connection_change=self._connection_changed,
            on_reconnect=metrics.RECONNECTS.inc,
            resync=resync,
        )
        self._resync = resync
        self.snapshot: SnapshotCoordinator | None = None
        self._stopping = asyncio.Event()
        self._deadline: float | None = None
        self._overdue: asyncio.TimerHandle | None = None  # armed by stop_on_time
        self.committed_messages = 0
        self.committed_batches = 0
        # receive time of the first message of each batch being written, by id of the batch
        self._in_hand: dict[int, float] = {}
        self._full_batch_at = float("-inf")  # monotonic time of the last batch taken full
        self._last_commit_at = 0.0  # Unix time of the last commit (0: none yet)
        self._newest_sent: float | None = None  # flespi's time of the newest message committed
        self._aside: list[_Aside] = []  # the side queue: records that timed out alone
        # (time, start of a recent hold or None, DISCONNECT reason code) of the connection
        # that ended; the last stall past --stall-after (start, last seen)
        self._lost: tuple[float, float | None, int | None] | None = None
        self._last_hold: tuple[float, float] | None = None
        # Starts of windows to repair (ending now), found since the repairer last looked; None:
        # a lost session, from the newest stored message
        self._gaps: list[float | None] = []
        self._gap_found = asyncio.Event()
        self.repair_rounds = 0  # rounds of the repairer ended (done, failed or waiting)
        self._aside_store = Store(engine, max_payload_bytes=settings.max_payload_bytes)

    def _connection_changed(self, up: bool) -> None:
        self.health.update(mqtt_connected=up)
        if up:
            metrics.MQTT_SESSION_PRESENT.set(1 if self.source.session_present else 0)
            self._reconnected()
        else:
            self._link_lost()

    # -- gaps the broker made ------------------------------------------------------------------
    # flespi deletes a session's undelivered messages past about 1 GB unacknowledged and
    # disconnects it; the session itself may survive. A disconnect that ends a long hold (no
    # commit for --stall-after seconds while messages waited), or that names an overloaded
    # broker, may therefore have cost messages: the window from the start of the hold (less
    # --repair-overlap) to the reconnect is backfilled over REST. So is a session the broker
    # did not keep when we come back. Both go to the one repairer (resync.py).

    def _link_lost(self) -> None:
        now = time.time()
        hold = self._last_hold
        recent = hold is not None and now - hold[1] <= HOLD_RECENT
        self._lost = (now, hold[0] if recent and hold else None, self.source.last_disconnect_code)

    def _note_hold(self, now: float, stalled: float) -> None:
        """Remember a stall past --stall-after: (its start, when last seen). A paused session
        may only read the broker's DISCONNECT once the hold is over, so the hold is judged
        when the link is found lost, from this record."""
        start = now - stalled
        if self._last_hold is None or now - self._last_hold[1] > HOLD_RECENT:
            self._last_hold = (start, now)
        else:
            self._last_hold = (min(self._last_hold[0], start), now)

    def _reconnected(self) -> None:
        lost, self._lost = self._lost, None
        self._last_hold = None
        if lost is None or not self.settings.repair_gaps:
            return  # the first connection: the start-up check covers it (_repair)
        at, held_since, code = lost
        if not self.source.session_present:
            why = "the broker did not keep our session"
            self._gaps.append(None)
        elif code in DROPPING_REASON_CODES or held_since is not None:
            why = (
                "disconnected"
                + (
                    f" after holding messages from {iso_time(held_since)}"
                    if held_since is not None
                    else ""
                )
                + (f" (reason code 0x{code:02X})" if code is not None else "")
            )
            self._gaps.append((held_since or at) - self.settings.repair_overlap)
        else:
            return
        metrics.GAPS_DETECTED.inc()
        log.warning("%s: the broker may have dropped messages; repairing over REST", why)
        self._gap_found.set()

    def request_stop(self) -> None:
        """Graceful stop (SIGTERM): drain what is in hand, then disconnect."""
        if not self._stopping.is_set():
            log.info("stopping: committing what is in hand, then disconnecting")
            self._deadline = time.monotonic() + self.settings.shutdown_timeout
            self._stopping.set()
            self.health.update(stopping=True)
            self.source.stop_reading()

    def stop_on_time(self) -> None:
        """Request a stop that ends the process on time, whatever it waits on (the daemon's
        SIGTERM; a library user calls request_stop). cancel_stop_watchdog disarms it."""
        if self._stopping.is_set():
            return
        self.request_stop()
        overdue = self.settings.shutdown_timeout + SHUTDOWN_GRACE
        self._overdue = asyncio.get_running_loop().call_later(
            overdue, self._shutdown_overdue, overdue
        )
        # The last resort, should the event loop itself be stuck: thread stacks, then exit.
        faulthandler.dump_traceback_later(overdue + SHUTDOWN_GRACE, exit=True)

    def cancel_stop_watchdog(self) -> None:
        if self._overdue is not None:
            self._overdue.cancel()
            faulthandler.cancel_dump_traceback_later()

    def _shutdown_overdue(self, after: float) -> None:
        """The stop took too long (a statement blocked on a lock, a task that ignores its
        cancellation): log every task still running with where it waits, and exit."""
        waiting = []
        for task in asyncio.all_tasks():
            frames = task.get_stack()
            where = f"{frames[-1].f_code.co_filename}:{frames[-1].f_lineno}" if frames else "?"
            waiting.append(f"{task.get_name()} at {where}")
        log.error(
            "stop overdue after %.0fs; exiting with %d messages unacknowledged (the broker "
            "delivers them again). Still running: %s",
            after,
            self.source.unacked,
            "; ".join(sorted(waiting)),
        )
        logging.shutdown()
        os._exit(EXIT_SHUTDOWN_OVERDUE)

    async def prepare_database(self) -> None:
        """Migrate (unless disabled), retrying while the database cannot be reached."""
        delay = RETRY_MIN
        while not self._stopping.is_set():
            try:
                if self.settings.migrate:
                    await migrate(self.engine, self.settings.schema)
                else:
                    async with self.engine.connect() as conn:
                        await conn.exec_driver_sql("SELECT 1")
                self.health.update(database_ok=True)
                return
            except Exception as exc:
                if not database_unreachable(exc):
                    raise  # the database said no, or a bug: stopping says so (see failures.py)
                error = exc
            self.health.update(database_ok=False)
            log.warning("database not reachable yet (%s); retrying in %.1fs", error, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(RETRY_MAX, delay * 2)

    async def run(self) -> None:
        await self.prepare_database()
        if self._stopping.is_set():
            return
        await self.maintain_partitions()
        _tune_gc()
        helpers = [
            asyncio.create_task(self._maintenance_loop(), name="partition-maintenance"),
            asyncio.create_task(self._gauge_loop(), name="gauges"),
            asyncio.create_task(self._expiry_loop(), name="telemetry-expiry"),
        ]
        helpers.append(asyncio.create_task(self._recount_loop(), name="summary-recount"))
        helpers.append(asyncio.create_task(self._aside_loop(), name="side-queue"))
        if self.settings.compact_after > 0:
            helpers.append(asyncio.create_task(self._compaction_loop(), name="compaction"))
        if self.settings.share_group:
            helpers.append(asyncio.create_task(self._snapshot(), name="retained-snapshot"))
        elif await ask_for_missing_retained_state(self.source, self.engine) or self._resync:
            helpers.append(
                asyncio.create_task(
                    record_retained_state(self.source, self.engine), name="retained-state"
                )
            )
        if self.settings.repair_gaps:
            helpers.append(asyncio.create_task(self._repair(), name="gap-repair"))
        session = asyncio.create_task(self.source.run(), name="mqtt-session")
        try:
            await self._consume(self.source)
        finally:
            for task in helpers:
                task.cancel()
            if self._aside:
                log.warning(
                    "%d records set aside stay unacknowledged: the broker delivers them again",
                    len(self._aside),
                )
            self.source.close()
            with contextlib.suppress(asyncio.CancelledError):
                await session
            for task in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self.health.update(mqtt_connected=False)

    async def _snapshot(self) -> None:
        """Shared subscriptions get no retained messages: see snapshot.py."""
        while self.source.session_present is None and not self._stopping.is_set():
            await asyncio.sleep(0.05)
        # A new broker session (first start, or the old one expired) or --resync: the state may
        # have changed unseen, so only a snapshot taken from now on counts.
        force = self._resync or not self.source.session_present
        self.snapshot = SnapshotCoordinator(self.settings, self.engine, force=force)
        async for source in self.snapshot.attempts(self._stopping):
            await self._consume(source, until=self.snapshot.over)

    async def _repair(self) -> None:
        """Repair what the broker may have dropped (resync.py): at start after a lost session
        or a pending plan, and whenever a gap is found; beside the live stream, with REST
        requests carried by this very session. One process repairs at a time."""
        while self.source.session_present is None and not self._stopping.is_set():
            await asyncio.sleep(0.05)
        overlap = self.settings.repair_overlap
        delay = REPAIR_RETRY_MIN
        first = True
        while True:
            try:
                if first:
                    present = bool(self.source.session_present)
                    await resync.plan_repair(self.engine, present, overlap)
                    first = False
                while self._gaps:
                    begin = self._gaps[0]
                    if begin is None:
                        await resync.plan_repair(self.engine, False, overlap)
                    else:
                        await resync.record_gap(self.engine, begin, time.time())
                    self._gaps.pop(0)
                done = await self._repair_pending()
            except Exception as exc:  # the live stream goes on; the plan stays pending
                log.error("gap repair failed (retried in %.0fs): %s", delay, exc)
                done = False
            self.repair_rounds += 1
            if done:
                delay = REPAIR_RETRY_MIN
                await self._gap_found.wait()
            else:  # failed, or another process holds the repair: look again later
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._gap_found.wait(), delay)
                delay = min(REPAIR_RETRY_MAX, delay * 2)
            self._gap_found.clear()

    async def _repair_pending(self) -> bool:
        """Run the pending plan if this process is elected; True when nothing is left."""
        if await resync.pending_plan(self.engine) is None:
            return True
        async with resync.elected(self.engine) as won:
            if not won:
                log.info("another process is repairing; this one waits")
                return False
            while (plan := await resync.pending_plan(self.engine)) is not None:
                async with session_rest_client(self.source) as rest:
                    accounts = self.settings.accounts
                    if not await resync.repair(rest, self.engine, plan, accounts=accounts):
                        return False
        return True

    async def maintain_partitions(self) -> None:
        """Day partitions ahead, retention behind, old tombstones pruned. A failure is logged
        and retried later: the default partition takes the rows meanwhile, nothing is lost."""
        try:
            await partitions.maintain(
                self.engine,
                days_ahead=self.settings.partition_days_ahead,
                retention_days=self.settings.retention_days,
            )
            await partitions.prune_tombstones(self.engine, self.settings.tombstone_days)
        except Exception as exc:
            metrics.MAINTENANCE_ERRORS.inc()
            log.warning("partition maintenance failed (will retry): %s", exc)

    def update_gauges(self) -> None:
        """Gauges of what is held now; refreshed on a timer so a stall shows while it lasts."""
        now = time.time()
        unacked = self.source.unacked
        metrics.UNACKED.set(unacked)
        oldest = min(self._in_hand.values(), default=None) or self.source.oldest_buffered_at()
        metrics.OLDEST_UNACKED_AGE.set(max(0.0, now - oldest) if oldest else 0.0)
        # Stalled: messages wait, and nothing was committed since the oldest of them arrived.
        stalled = max(0.0, now - max(self._last_commit_at, oldest)) if unacked and oldest else 0.0
        metrics.STALLED.set(stalled)
        if self._newest_sent is not None:
            metrics.CURRENT_LAG.set(max(0.0, now - self._newest_sent))
        limit = self.settings.stall_after
        reason = ""
        if limit > 0 and stalled >= limit:
            self._note_hold(now, stalled)
            reason = f"stalled: no commit for {stalled:.0f}s while {unacked} messages wait"
        if reason != self.health.stalled:
            if reason and not self.health.stalled:
                log.warning("%s", reason)
            self.health.stalled = reason
            self.health.update()

    async def _gauge_loop(self, interval: float = 0.5) -> None:
        while True:
            self.update_gauges()
            await asyncio.sleep(interval)

    async def _expiry_loop(self, interval: float = 60.0) -> None:
        """Expired telemetry leaves the table within a minute (the views hide it at once)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await partitions.expire_telemetry(self.engine)
            except Exception as exc:  # retried next minute; nothing is lost meanwhile
                metrics.MAINTENANCE_ERRORS.inc()
                log.warning("telemetry expiry failed (will retry): %s", exc)

    def draining(self) -> bool:
        """Whether a backlog is being drained: a batch was taken full within the last second, or
        a full batch waits in hand."""
        return (
            time.monotonic() - self._full_batch_at < 1.0
            or self.source.buffered >= self.settings.batch_size
        )

    async def _compaction_loop(self) -> None:
        """Pack past hours of message history (compaction.py), paced so that ingestion keeps
        the database: after each step, a pause of ``compaction_pause`` times its duration, and
        while a backlog drains (batches come full), the next step waits for the drain to end,
        up to ``compaction_defer`` seconds, so that a stream that never lets up is packed too
        (slowly: the backlog gauge and its alert show it). A failed pass is counted, logged and
        retried: nothing moved, nothing lost."""
        s = self.settings
        # A resumed session's backlog shows itself within a second of connecting: wait for it.
        while self.source.session_present is None:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)

        async def pause(took: float) -> None:
            await asyncio.sleep(took * s.compaction_pause)
            deferred = time.monotonic() + s.compaction_defer
            while self.draining() and time.monotonic() < deferred:
                await asyncio.sleep(0.1)

        while True:
            caught_up = True
            try:
                report = await compaction.compact(
                    self.engine, after_hours=s.compact_after, pause=pause
                )
                caught_up = report.caught_up or report.busy
                metrics.COMPACTION_BACKLOG.set(report.backlog)
                if report.days:
                    await compaction.vacuum_days(self.engine, report.days)
            except Exception as exc:
                metrics.COMPACTION_ERRORS.inc()
                log.warning("compaction failed (nothing moved; will retry): %s", exc)
            if caught_up:
                await asyncio.sleep(s.compaction_interval)

    async def _recount_loop(self, interval: float = 5.0) -> None:
        """Days that messages reached out of order get their distance and moving time again
        (summaries.py); every worker may, each takes rows the others have not locked."""
        while True:
            try:
                while (counted := await summaries.recount(self.engine)) > 0:
                    metrics.RECOUNTED_DAYS.inc(counted)
            except Exception as exc:
                metrics.RECOUNT_ERRORS.inc()
                log.warning("recounting device days failed (will retry): %s", exc)
            await asyncio.sleep(interval)

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.maintenance_interval)
            await self.maintain_partitions()

    async def _consume(
        self, source: MqttSource, until: Callable[[MqttSource], bool] | None = None
    ) -> None:
        """Write and acknowledge ``source``'s batches until it is drained (or ``until`` says).

        Batches overlap: while up to ``WRITES_IN_FLIGHT`` are being written, each on its own
        connection, the next is taken and decoded. A write's statements keep their place
        behind the write before (store.Turn), so a key's updates reach the database in the order
        they came, and acknowledgements go out in arrival order, each after its commit."""
        s = self.settings
        writing: collections.deque[asyncio.Task[WriteResult]] = collections.deque()
        last: Turn | None = None
        try:
            while True:
                if until is None:
                    batch = await source.take(s.batch_size, s.flush_interval, s.max_batch_bytes)
                else:
                    if until(source):
                        break
                    try:
                        batch = await asyncio.wait_for(
                            source.take(s.batch_size, s.flush_interval, s.max_batch_bytes), 0.25
                        )
                    except TimeoutError:
                        continue
                if not batch:  # only once stopping and drained
                    break
                if len(batch) >= s.batch_size or batch.size >= s.max_batch_bytes // 2:
                    self._full_batch_at = time.monotonic()
                if not writing:
                    prepared = self.prepare(batch)
                else:  # batches before are being written: decode beside them
                    prepared = await self.prepare_beside(batch)
                while len(writing) >= WRITES_IN_FLIGHT:
                    await writing.popleft()
                last = Turn(last)
                store = next(self._next_store)
                writing.append(asyncio.create_task(self.write(prepared, last, store), name="write"))
        except ShutdownTimeout:
            self._shutdown_timed_out()
        except BaseException:  # cancelled, or a bug: the batches in writing go too, unacked
            for task in writing:
                task.cancel()
            for task in writing:
                with contextlib.suppress(asyncio.CancelledError, ShutdownTimeout):
                    await task
            raise
        timed_out = False
        while writing:  # drained, or told to stop: the batches in hand are written first
            try:
                await writing.popleft()
            except ShutdownTimeout:
                timed_out = True
        if timed_out:
            self._shutdown_timed_out()

    def _shutdown_timed_out(self) -> None:
        log.error(
            "database still unavailable at the shutdown deadline: %d messages left "
            "unacknowledged for redelivery",
            self.source.unacked,
        )

    def prepare(self, batch: Batch) -> Prepared:
        """Decode and coalesce a batch (CPU only)."""
        decoded = self._decode(batch.messages)
        return Prepared(batch, decoded, coalesce(decoded))

    async def prepare_beside(self, batch: Batch) -> Prepared:
        """:meth:`prepare`, a slice at a time, letting the event loop run between slices: the
        batch being written goes on with its round trips to PostgreSQL (a transaction is a
        few of them) instead of waiting for the whole batch to be decoded, so decoding and
        the database's work overlap."""
        messages = batch.messages
        decoded: list[tuple[Inbound, Record | Rejection]] = []
        for start in range(0, len(messages), PREPARE_SLICE):
            decoded += self._decode(messages[start : start + PREPARE_SLICE])
            await asyncio.sleep(0)
        return Prepared(batch, decoded, coalesce(decoded))

    def _decode(self, messages: Sequence[Received]) -> list[tuple[Inbound, Record | Rejection]]:
        max_payload = self.settings.max_payload_bytes
        # The token's account (from the CONNACK) for messages that carry no cid property.
        default_cid = self.source.account_cid
        return [
            (inbound, decode(inbound, max_payload, default_cid))
            for inbound in map(_inbound, messages)
        ]

    async def write(
        self, prepared: Prepared, turn: Turn | None = None, store: Store | None = None
    ) -> WriteResult:
        """Write a prepared batch (retrying while the database is away), then acknowledge it:
        with ``turn``, once the batch before was acknowledged (not at all if it was not)."""
        batch, decoded, plan = prepared
        messages = batch.messages
        if messages:
            self._in_hand[id(batch)] = messages[0].received_at
        acked = 0
        try:
            result = await self._write_until_done(plan, turn, store or self.store)
            if result.set_aside:
                self._set_aside(prepared, result.set_aside)
            before = turn.before.acked if turn is not None and turn.before is not None else None
            if turn is not None:
                turn.end()  # its statements are done: the write after it may run all of its
            if before is None or await before:
                acked = batch.ack()
            else:
                log.info("committed %d messages left unacknowledged: a batch before them "
                         "was not committed", len(batch))  # fmt: skip
            if turn is not None:
                turn.settle(before is None or before.result())
        finally:
            self._in_hand.pop(id(batch), None)
            if turn is not None:
                turn.settle(False)  # no effect once settled
        now = self._last_commit_at = time.time()
        self._observe(messages, decoded, plan, result, now)
        self.committed_messages += len(batch)
        self.committed_batches += 1
        log.debug("committed %d messages (%d acks sent)", len(batch), acked)
        return result

    async def _write_until_done(
        self, plan: WritePlan, turn: Turn | None = None, store: Store | None = None
    ) -> WriteResult:
        """Write the plan, holding it (nothing acknowledged) while the database cannot take it."""
        delay = RETRY_MIN
        outage_started: float | None = None
        while True:
            started = time.perf_counter()
            try:
                result = await (store or self.store).write(plan, set_aside=True, turn=turn)
            except DatabaseUnavailable as exc:
                if outage_started is None:
                    outage_started = time.monotonic()
                self._hold(exc, first=delay == RETRY_MIN)
                if self._deadline is not None and time.monotonic() + delay > self._deadline:
                    raise ShutdownTimeout() from exc
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(RETRY_MAX, delay * 2)
                continue
            metrics.COMMIT_DURATION.observe(time.perf_counter() - started)
            if outage_started is not None:
                log.warning(
                    "database back after %.1fs; batch committed", time.monotonic() - outage_started
                )
            if not self.health.database_ok:
                self.health.database_recovered()
            return result

    # -- the side queue ------------------------------------------------------------------
    # A record that times out when written alone would hold every later batch for good (the
    # store would retry the same plan forever). It is set aside instead: its messages leave
    # the batch, unacknowledged (the broker keeps them; a restart gets them again), and it is
    # retried on its own with backoff while the rest of the stream commits. Newest-wins guards
    # make the later write of an older record harmless. /readyz and a gauge show it waiting.

    def _set_aside(self, prepared: Prepared, records: list[tuple[Record, str]]) -> None:
        now = time.time()
        batch, decoded, plan = prepared
        received = {id(inbound): m for m, (inbound, _) in zip(batch.messages, decoded, strict=True)}
        for record, detail in records:
            origin = plan.origins.get(id(record))
            alone = WritePlan()
            alone.add(record)
            if origin is not None:
                alone.origins[id(record)] = origin
            message = received.get(id(origin))
            held = batch.take_out({id(message)} if message is not None else set())
            self._aside.append(_Aside(alone, held, now, detail))
            metrics.SET_ASIDE_TOTAL.labels("set_aside").inc()
            log.error(
                "a %s record timed out when written alone (%s): set aside, retried on its own "
                "while the rest of the stream commits",
                record.family,
                detail,
            )
        self._show_aside()

    def _show_aside(self) -> None:
        metrics.SET_ASIDE.set(len(self._aside))
        reason = ""
        if self._aside:
            oldest = min(a.since for a in self._aside)
            reason = (
                f"set aside: {len(self._aside)} records timed out alone (oldest "
                f"{max(0.0, time.time() - oldest):.0f}s ago, last error {self._aside[-1].detail})"
            )
        if reason != self.health.set_aside:
            self.health.set_aside = reason
            self.health.update()

    async def retry_set_aside(self) -> None:
        """Write each record of the side queue whose retry is due; acknowledge those written."""
        for entry in list(self._aside):
            if entry.next_try > time.monotonic():
                continue
            try:
                result = await self._aside_store.write(entry.plan, set_aside=True)
            except DatabaseUnavailable as exc:
                entry.retry_later(exc.detail)
                continue
            if result.set_aside:
                entry.retry_later(result.set_aside[0][1])
                continue
            self._aside.remove(entry)
            entry.batch.ack()
            metrics.SET_ASIDE_TOTAL.labels("written").inc()
            log.info("a record set aside %.0fs ago is written", time.time() - entry.since)
            for (table, operation), count in result.rows.items():
                if count:
                    metrics.ROWS_WRITTEN.labels(table, operation).inc(count)
            for reason, count in result.dead_letters.items():
                metrics.DEAD_LETTERS.labels(reason).inc(count)
        self._show_aside()

    async def _aside_loop(self, interval: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval)
            if self._aside:
                await self.retry_set_aside()

    def _hold(self, exc: DatabaseUnavailable, *, first: bool) -> None:
        """Count, report and log (once per outage, and whenever the reason changes) a held
        batch: /readyz names the reason until a write succeeds."""
        metrics.DATABASE_ERRORS.labels("held" if exc.held else "unavailable").inc()
        if first or exc.detail != self.health.database_problem:
            what = "the database refuses the batch" if exc.held else "database unavailable"
            log.error("%s, holding it and retrying: %s", what, exc.detail)
        self.health.database_failed(exc.detail, held=exc.held)

    def _observe(
        self,
        batch: Sequence[Received],
        decoded: Sequence[tuple[Inbound, Record | Rejection]],
        plan: WritePlan,
        result: WriteResult,
        now: float,
    ) -> None:
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.LAST_COMMIT.set(now)
        self.update_gauges()
        metrics.SUPERSEDED.inc(plan.superseded)
        if decoded:  # per message, kept to C-level loops: this runs for every message
            inbounds, records = zip(*decoded, strict=True)
            families = Counter(zip(map(_FAMILY, records), map(_QOS, inbounds), strict=True))
            sent = [s for s in map(lag_reference, inbounds, records) if s is not None]
            if sent:
                newest = max(sent)
                if self._newest_sent is None or newest > self._newest_sent:
                    self._newest_sent = newest
                metrics.observe_many(metrics.LAG, [max(0.0, now - s) for s in sent])
            for (family, qos), count in families.items():
                metrics.MESSAGES_RECEIVED.labels(str(family), str(qos)).inc(count)
        for (table, operation), count in result.rows.items():
            if count:
                metrics.ROWS_WRITTEN.labels(table, operation).inc(count)
        for reason, count in result.dead_letters.items():
            metrics.DEAD_LETTERS.labels(reason).inc(count)
        if result.dead_letters.get(str(Reason.DATABASE_REJECTED)):
            metrics.DATABASE_ERRORS.labels("refused").inc()
        if result.dead_letters:
            log.warning(
                "dead-lettered %s",
                ", ".join(f"{n} x {r}" for r, n in sorted(result.dead_letters.items())),
            )
