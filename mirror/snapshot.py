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
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from mirror.config import Settings
from mirror.source import MqttSource, Received

log = logging.getLogger(__name__)

CommitFn = Callable[[list[Received], MqttSource], Awaitable[Any]]


def marker_name(share_group: str) -> str:
    """Members of one group share a marker; a sticky ``:COUNT`` suffix is the same group."""
    return "snapshot:" + share_group.split(":", 1)[0]


class SnapshotCoordinator:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        commit: CommitFn,
        *,
        force: bool = False,
        retry_interval: float = 60.0,
    ) -> None:
        assert settings.share_group, "a snapshot is only needed for a shared subscription"
        self.settings = settings
        self.engine = engine
        self.commit = commit
        self.force = force
        self.retry_interval = retry_interval
        self.started = time.time()
        self.taken = 0  # retained messages this member wrote in its snapshot
        self.done = asyncio.Event()

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

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                if await self._recorded():
                    self.done.set()
                    return
                await self._try_as_elected(stopping)
                if self.done.is_set():
                    return
            except Exception as exc:  # the live stream must not suffer for the snapshot
                log.warning("retained snapshot attempt failed (will retry): %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.retry_interval)

    async def _try_as_elected(self, stopping: asyncio.Event) -> None:
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
                count = await self._take(stopping)
                if count is None:
                    return
                await self._record(count)
                self.done.set()
            finally:
                await lock_conn.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": key})
                await lock_conn.commit()

    async def _take(self, stopping: asyncio.Event) -> int | None:
        """Receive and commit every retained message; None if interrupted."""
        source = MqttSource(self.settings, snapshot=True)
        session = asyncio.create_task(source.run(), name="snapshot-session")
        log.info("taking the retained snapshot for share group %s", self.settings.share_group)
        try:
            while not stopping.is_set():
                if session.done():
                    return None
                batch: list[Received] = []
                with contextlib.suppress(TimeoutError):  # only the wait for messages
                    batch = await asyncio.wait_for(
                        source.take(self.settings.batch_size, self.settings.flush_interval), 0.25
                    )
                if batch:
                    await self.commit(batch, source)
                if self._finished(source):
                    log.info("retained snapshot complete: %d messages", source.retained_received)
                    self.taken = source.retained_received
                    return source.retained_received
            return None
        finally:
            source.close()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await session

    def _finished(self, source: MqttSource) -> bool:
        if source.subscribed_at is None or source.unacked or source.buffered:
            return False
        last = max(source.subscribed_at, source.last_retained_at or 0.0)
        return time.monotonic() - last >= self.settings.snapshot_quiet

    async def _record(self, count: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    """
                    INSERT INTO sync_state (name, value, updated_at)
                    VALUES (:n, CAST(:v AS jsonb), now())
                    ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value,
                                                     updated_at = EXCLUDED.updated_at
                    """
                ),
                {"n": self.marker, "v": json.dumps({"retained_messages": count})},
            )
