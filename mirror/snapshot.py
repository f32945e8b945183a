"""The retained-state snapshot for members of a shared subscription group.

MQTT 5 does not send retained messages to a shared subscription (brokers differ: several leave
them out, Mosquitto 2.0.11 sends them to the member that subscribes, flespi does not say), so a
group member must not depend on it. Instead one member, elected with a PostgreSQL advisory lock,
opens a second, throwaway session with an ordinary subscription to the state filters, receives
every retained message, writes them through the same pipeline, and records the snapshot as done
in ``sync_state``. Live updates keep flowing through the shared subscription meanwhile; the
timestamp guards in SQL make the order irrelevant: an older retained copy never overwrites a
newer live update, and a deletion's tombstone stops a stale retained value.

The snapshot is done when no retained message has arrived for ``snapshot_quiet`` seconds after
the SUBACK and everything received is committed. A member crashing mid-snapshot releases the
lock with its connection and records nothing, so another member (or its own restart) tries
again; members check every ``retry_interval`` until a snapshot is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from mirror.ops.config import Settings
from mirror.session.source import MqttSource

log = logging.getLogger(__name__)


def marker_name(share_group: str) -> str:
    """Members of one group share a marker; a sticky ``:COUNT`` suffix is the same group."""
    return "snapshot:" + share_group.split(":", 1)[0]


class SnapshotCoordinator:
    """Decides when this member takes the snapshot; the pipeline writes what it receives.

    :meth:`attempts` yields a running snapshot session each time this member is elected; the
    pipeline consumes its batches (writing and acknowledging them like any other) until
    :meth:`over` says to stop, and the coordinator then records the snapshot or tries again.
    """

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        *,
        force: bool = False,
        retry_interval: float = 60.0,
    ) -> None:
        assert settings.share_group, "a snapshot is only needed for a shared subscription"
        self.settings = settings
        self.engine = engine
        self.force = force
        self.retry_interval = retry_interval
        self.started = time.time()
        self.taken = 0  # retained messages this member wrote in its snapshot
        self.done = asyncio.Event()
        self._session: asyncio.Task[None] | None = None

    @property
    def marker(self) -> str:
        return marker_name(self.settings.share_group or "")

    async def completed_at(self) -> float | None:
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                text("SELECT extract(epoch FROM updated_at) FROM sync_state WHERE name = :n"),
                {"n": self.marker},
            )
        return float(value) if value is not None else None

    async def _recorded(self) -> bool:
        completed = await self.completed_at()
        if completed is None:
            return False
        # After --resync or a new broker session, only a snapshot taken since our start counts.
        return not self.force or completed >= self.started

    async def attempts(self, stopping: asyncio.Event) -> AsyncIterator[MqttSource]:
        """Yield a snapshot session whenever this member is elected, until one is recorded."""
        while not stopping.is_set():
            try:
                if await self._recorded():
                    self.done.set()
                    return
                async for source in self._as_elected():
                    yield source
                if self.done.is_set():
                    return
            except Exception as exc:  # the live stream must not suffer for the snapshot
                log.warning("retained snapshot attempt failed (will retry): %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.retry_interval)

    async def _as_elected(self) -> AsyncIterator[MqttSource]:
        key = f"flespi-mirror:{self.marker}"
        async with self.engine.connect() as lock_conn:
            elected = await lock_conn.scalar(
                text("SELECT pg_try_advisory_lock(hashtext(:k))"), {"k": key}
            )
            await lock_conn.commit()
            if not elected:
                log.info("another member is taking the retained snapshot")
                return
            try:
                if await self._recorded():
                    self.done.set()
                    return
                source = MqttSource(self.settings, snapshot=True)
                self._session = asyncio.create_task(source.run(), name="snapshot-session")
                log.info(
                    "taking the retained snapshot for share group %s", self.settings.share_group
                )
                try:
                    yield source
                finally:
                    source.close()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await self._session
                if self._finished(source):
                    log.info("retained snapshot complete: %d messages", source.retained_received)
                    self.taken = source.retained_received
                    await self._record(source.retained_received)
                    self.done.set()
            finally:
                await lock_conn.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": key})
                await lock_conn.commit()

    def over(self, source: MqttSource) -> bool:
        """Stop consuming ``source``: the snapshot is complete, or its session has died."""
        session = self._session
        return self._finished(source) or (session is not None and session.done())

    def _finished(self, source: MqttSource) -> bool:
        if source.subscribed_at is None or source.unacked or source.buffered:
            return False
        last = max(source.subscribed_at, source.last_retained_at or 0.0)
        return time.monotonic() - last >= self.settings.snapshot_quiet

    async def _record(self, count: int) -> None:
        await record_marker(self.engine, self.marker, {"retained_messages": count})


# ---------------------------------------------------------------------------------------------
# The retained state of an ordinary (not shared) session

RETAINED_STATE_MARKER = "retained_state"


async def marker_exists(engine: AsyncEngine, name: str) -> bool:
    async with engine.connect() as conn:
        found = await conn.scalar(text("SELECT 1 FROM sync_state WHERE name = :n"), {"n": name})
    return found is not None


async def record_marker(engine: AsyncEngine, name: str, value: dict[str, object]) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                """
                INSERT INTO sync_state (name, value, updated_at)
                VALUES (:n, CAST(:v AS jsonb), now())
                ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value,
                                                 updated_at = EXCLUDED.updated_at
                """
            ),
            {"n": name, "v": json.dumps(value)},
        )


async def ask_for_missing_retained_state(source: MqttSource, engine: AsyncEngine) -> bool:
    """A database (or schema) without the retained state gets it from the broker again.

    The broker keeps our persistent session by client id, which does not depend on the
    database: pointed at a new database, a resumed session would send no retained messages and
    the state tables would stay empty. So the database remembers, in ``sync_state``, that the
    broker was asked for the retained state on a subscription it acknowledged; without that row
    the session subscribes asking for every retained message (as ``--resync`` does). Call before
    the session starts; True when it was asked.
    """
    try:
        if await marker_exists(engine, RETAINED_STATE_MARKER):
            return False
    except Exception as exc:  # when in doubt, ask: a resync costs time, never data
        log.warning("could not read the retained-state marker (%s): asking the broker", exc)
    log.info("this database holds no snapshot of the retained state: asking the broker for it")
    source.request_retained()
    return True


async def record_retained_state(source: MqttSource, engine: AsyncEngine) -> None:
    """Record the marker once a subscription that asked for the retained state is acknowledged.

    The retained messages the broker sends after that SUBACK are queued in the persistent
    session at QoS 1, so a crash before they are written loses none: they are redelivered.
    """
    while True:
        await source.subscribed_event.wait()
        source.subscribed_event.clear()
        if not source.retained_requested:
            continue
        try:
            await record_marker(
                engine,
                RETAINED_STATE_MARKER,
                {"client_id": source.client_id, "filters": list(source.settings.subscriptions)},
            )
        except Exception as exc:  # the next start asks again: costs time, never data
            log.warning("could not record the retained-state marker: %s", exc)
        return
