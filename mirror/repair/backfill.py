"""Fill a hole in history from flespi's message storage, through REST over MQTT.

While the broker keeps our session nothing is lost; past it (the session expired, or about 1 GB
of undelivered messages was dropped, or a first start) the messages of that time exist only in
flespi's storage. A backfill fetches each device's messages of a time window
(``GET gw/devices/{id}/messages`` with ``from``/``to``/``count``, page after page) and each
calculator-device pair's intervals (``GET gw/calcs/{calc}/devices/{dev}/intervals/all``), and
writes them through the live path (``replay.py``), so a message that also arrives live is
stored once.

Identity: flespi's storage holds one message per device and timestamp (it merges two with the
same one), while a REST answer need not be byte-identical to the MQTT publication the live
identity (digest) was taken from. So a fetched message whose device already has a stored
message at that timestamp is skipped, and only the others are written.

Resumable: after each page is committed, the device's progress (the timestamp it is done to)
is saved in ``sync_state`` under the job's name; a job run again (same window) starts each
device where it stopped. Killed between a write and the progress save, the page is fetched
again and its messages are skipped as already stored: nothing is duplicated or skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from mirror.decode.builders import interval_identity
from mirror.decode.payloads import Invalid
from mirror.ops import metrics
from mirror.repair.replay import inbound, write_inbound
from mirror.repair.rest import RestClient
from mirror.store.history import DEVICE_MESSAGES, existing_times
from mirror.store.writer import Store

log = logging.getLogger(__name__)

PAGE_SIZE = 1000  # messages per REST answer
PARALLEL_STREAMS = 4  # devices fetched at once (the REST client bounds requests in flight too)


@dataclass(frozen=True)
class BackfillJob:
    """A window of history to fetch. ``devices`` None: every device flespi lists."""

    name: str
    begin: float
    end: float
    devices: tuple[int, ...] | None = None
    intervals: bool = True
    cid: int | None = None
    # Only these flespi accounts' devices (listed with the selector cid=ID); empty: every one
    accounts: tuple[int, ...] = ()

    @classmethod
    def for_window(
        cls,
        begin: float,
        end: float | None,
        devices: Sequence[int] = (),
        prefix: str = "backfill",
        accounts: Sequence[int] = (),
    ) -> BackfillJob:
        """A job whose name is its arguments, so the same command run again resumes it. An
        open end (None: now) resumes to the new now."""
        selection = ",".join(str(d) for d in sorted(devices)) or "all"
        if accounts and not devices:
            selection = "cid=" + ",".join(str(a) for a in sorted(accounts))
        until = "now" if end is None else f"{end:.6f}"
        name = f"{prefix}:{begin:.6f}:{until}:{selection}"
        return cls(
            name,
            begin,
            time.time() if end is None else end,
            tuple(devices) or None,
            accounts=tuple(sorted(accounts)),
        )


@dataclass
class BackfillReport:
    streams: int = 0
    fetched: int = 0
    written: int = 0
    already_stored: int = 0
    intervals: int = 0
    intervals_deleted: int = 0
    failed: list[str] = field(default_factory=list)


Progress = Callable[[int, int], None]  # (streams finished, messages fetched) since last call

_EXISTING = existing_times(DEVICE_MESSAGES)
# Stored intervals wholly inside the window that none of the listed ones is (by flespi's id,
# else by time span: the rule of intervals_matching, migration 0004), each listed item matched
# once.
_UNLISTED_INTERVALS = text(
    """
    WITH listed AS (
        SELECT DISTINCT m.interval_key
        FROM unnest(CAST(:keys AS text[]), CAST(:ids AS bigint[]), CAST(:begins AS float8[]),
                    CAST(:ends AS float8[])) AS l(key, id, b, e),
             intervals_matching(:calc, :device, l.key, l.id, to_timestamp(l.b),
                                to_timestamp(l.e)) m
    )
    SELECT s.interval_id, extract(epoch FROM s.begin), extract(epoch FROM s."end")
    FROM intervals s
    WHERE s.calc_id = :calc AND s.device_id = :device
      AND s.begin >= to_timestamp(:begin) AND s."end" <= to_timestamp(:end)
      AND s.interval_key NOT IN (SELECT interval_key FROM listed)
    """
)
_LOAD_PROGRESS = text("SELECT name, value FROM sync_state WHERE name LIKE :prefix")
_SAVE_PROGRESS = text(
    """
    INSERT INTO sync_state (name, value, updated_at) VALUES (:name, CAST(:value AS jsonb), now())
    ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()
    """
)


class Backfill:
    """Runs one :class:`BackfillJob` with a REST client and a database engine."""

    def __init__(
        self,
        rest: RestClient,
        engine: AsyncEngine,
        job: BackfillJob,
        *,
        page_size: int = PAGE_SIZE,
        parallel: int = PARALLEL_STREAMS,
        progress: Progress | None = None,
    ) -> None:
        self.rest = rest
        self.engine = engine
        self.store = Store(engine)
        self.job = job
        self.page_size = max(2, page_size)  # a page repeats its predecessor's last message
        self.parallel = parallel
        self.progress = progress or (lambda _streams, _messages: None)
        self.report = BackfillReport()
        self.total_streams = 0

    # -- planning ----------------------------------------------------------------------------

    async def streams(self) -> list[str]:
        """``device:{id}`` and ``interval:{calc}:{device}``, each a unit of progress."""
        devices = list(self.job.devices or [])
        if self.job.devices is None:
            selectors = [f"cid={a}" for a in self.job.accounts] or ["all"]
            listed = [
                d
                for selector in selectors
                for d in await self.rest.get(f"gw/devices/{selector}", {"fields": "id"})
            ]
            devices = sorted({int(d["id"]) for d in listed if isinstance(d, dict) and "id" in d})
        streams = [f"device:{d}" for d in devices]
        if self.job.intervals:
            streams += [f"interval:{c}:{d}" for c, d in await self._interval_pairs(devices)]
        return streams

    async def _interval_pairs(self, devices: list[int]) -> list[tuple[int, int]]:
        calcs = await self.rest.get("gw/calcs/all", {"fields": "id"})
        pairs = {(int(c["id"]), d) for c in calcs if isinstance(c, dict) for d in devices}
        async with self.engine.connect() as conn:
            rows = await conn.execute(text("SELECT DISTINCT calc_id, device_id FROM intervals"))
            wanted = set(devices)
            pairs |= {(int(c), int(d)) for c, d in rows if int(d) in wanted}
        return sorted(pairs)

    async def _load_progress(self) -> dict[str, dict[str, Any]]:
        prefix = f"{self.job.name}|"
        async with self.engine.connect() as conn:
            rows = await conn.execute(_LOAD_PROGRESS, {"prefix": prefix.replace("%", r"\%") + "%"})
            return {str(name)[len(prefix) :]: dict(value) for name, value in rows}

    async def _save_progress(self, stream: str, done_to: float, finished: bool) -> None:
        value = json.dumps({"done_to": done_to, "finished": finished, "end": self.job.end})
        async with self.engine.begin() as conn:
            # Losing the newest progress in a crash costs a page fetched again (its messages
            # are then skipped as stored), so this commit need not wait for the disk.
            await conn.execute(text("SET LOCAL synchronous_commit TO off"))
            name = f"{self.job.name}|{stream}"
            await conn.execute(_SAVE_PROGRESS, {"name": name, "value": value})

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> BackfillReport:
        streams = await self.streams()
        done = await self._load_progress()
        todo = [s for s in streams if not done.get(s, {}).get("finished")]
        self.total_streams = len(streams)
        self.report.streams = len(streams)
        self.progress(len(streams) - len(todo), 0)
        log.info(
            "backfill %s: %d of %d streams to do (%s .. %s)",
            self.job.name,
            len(todo),
            len(streams),
            iso_time(self.job.begin),
            iso_time(self.job.end),
        )
        metrics.BACKFILL_PENDING.inc(len(todo))
        slots = asyncio.Semaphore(self.parallel)

        async def one(stream: str) -> None:
            async with slots:
                try:
                    resume = done.get(stream, {}).get("done_to")
                    await self._stream(stream, resume)
                except Exception as exc:  # one device's failure must not stop the others
                    self.report.failed.append(stream)
                    log.error("backfill of %s failed (resumed on the next run): %s", stream, exc)
                finally:
                    metrics.BACKFILL_PENDING.dec()
                    self.progress(1, 0)

        await asyncio.gather(*(one(s) for s in todo))
        r = self.report
        log.info(
            "backfill %s: %d messages fetched, %d written, %d already stored, %d intervals; "
            "%d streams failed",
            self.job.name, r.fetched, r.written, r.already_stored, r.intervals, len(r.failed),
        )
        return r

    async def _stream(self, stream: str, resume: float | None) -> None:
        kind, *ids = stream.split(":")
        if kind == "device":
            await self._device(int(ids[0]), resume)
        else:
            await self._intervals(int(ids[0]), int(ids[1]))
        await self._save_progress(stream, self.job.end, True)

    async def _device(self, device_id: int, resume: float | None) -> None:
        """Page through a device's messages; the next page is fetched while this one is
        written (its start is known once this page has arrived), so the REST round trip and
        the database write overlap. Progress is saved after a page is written, never before."""
        begin = self.job.begin if resume is None else max(self.job.begin, resume)
        after = resume  # messages at or before this timestamp are done
        fetching = asyncio.ensure_future(self._page(device_id, begin))
        try:
            while True:
                page = await fetching
                messages = [m for m in page if isinstance(m, dict) and _ts(m) is not None]
                fresh = [m for m in messages if after is None or _ts(m) > after]  # type: ignore[operator]
                self.report.fetched += len(fresh)
                metrics.BACKFILL_MESSAGES.labels("fetched").inc(len(fresh))
                self.progress(0, len(fresh))
                last_page = len(page) < self.page_size or not fresh
                if not fresh:
                    return
                after = begin = max(_ts(m) or 0.0 for m in fresh)
                if not last_page:
                    fetching = asyncio.ensure_future(self._page(device_id, begin))
                await self._write_messages(device_id, fresh)
                if last_page:  # the last page's progress is the stream's "finished"
                    return
                await self._save_progress(f"device:{device_id}", after, False)
        finally:
            if not fetching.done():
                fetching.cancel()
                with contextlib.suppress(BaseException):
                    await fetching

    async def _page(self, device_id: int, begin: float) -> list[Any]:
        page: list[Any] = await self.rest.get(
            f"gw/devices/{device_id}/messages",
            {"from": begin, "to": self.job.end, "count": self.page_size},
        )
        return page

    async def _write_messages(self, device_id: int, messages: list[dict[str, Any]]) -> None:
        stamps = [_ts(m) for m in messages]
        async with self.engine.connect() as conn:
            rows = await conn.execute(_EXISTING, {"ts": stamps, "device_id": device_id})
            existing = {int(i) - 1 for (i,) in rows}
        new = [m for n, m in enumerate(messages) if n not in existing]
        self.report.already_stored += len(existing)
        metrics.BACKFILL_MESSAGES.labels("already_stored").inc(len(existing))
        if not new:
            return
        topic = f"flespi/message/gw/devices/{device_id}"
        await write_inbound(
            self.store,
            [
                inbound(topic, _payload(m), _registered(m), self.job.cid)
                for m in new
            ],
        )
        self.report.written += len(new)
        metrics.BACKFILL_MESSAGES.labels("written").inc(len(new))

    async def _intervals(self, calc_id: int, device_id: int) -> None:
        """The pair's intervals of the window, and deletions of those flespi no longer has.

        Only a stored interval that lies wholly inside the window is deleted when flespi does
        not list it: how flespi's begin/end filter treats an interval that straddles the
        window's edges is UNCONFIRMED, and such an interval may simply not be listed."""
        listed_at = time.time()
        found = await self.rest.get(
            f"gw/calcs/{calc_id}/devices/{device_id}/intervals/all",
            {"begin": self.job.begin, "end": self.job.end},
        )
        base = f"flespi/interval/gw/calcs/{calc_id}/devices/{device_id}"
        intervals = [i for i in found if isinstance(i, dict)]
        messages = [
            inbound(f"{base}/updated", _payload(i), _interval_time(i), self.job.cid)
            for i in intervals
        ]
        listed = [_identity(i) for i in intervals]
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                _UNLISTED_INTERVALS,
                {"calc": calc_id, "device": device_id, "begin": self.job.begin,
                 "end": self.job.end, "keys": [k for k, _, _, _ in listed],
                 "ids": [i for _, i, _, _ in listed], "begins": [b for _, _, b, _ in listed],
                 "ends": [e for _, _, _, e in listed]},
            )  # fmt: skip
            gone = [
                {"id": int(i)} if i is not None else {"begin": float(b), "end": float(e)}
                for i, b, e in rows
            ]
        messages += [
            inbound(f"{base}/deleted", _payload(g), listed_at, self.job.cid) for g in gone
        ]
        if messages:
            await write_inbound(self.store, messages)
        self.report.intervals += len(intervals)
        self.report.intervals_deleted += len(gone)


def _ts(message: dict[str, Any]) -> float | None:
    value = message.get("timestamp")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _registered(message: dict[str, Any]) -> float:
    """When flespi registered the message: the time its live publication would carry."""
    server = message.get("server.timestamp")
    if isinstance(server, int | float) and not isinstance(server, bool):
        return float(server)
    return _ts(message) or time.time()


def _identity(interval: dict[str, Any]) -> tuple[str, int | None, float | None, float | None]:
    """(key, id, begin, end) of a listed interval, as the live path keys it. An item the live
    path would refuse still keeps the row of its id, if it has a usable one (it is listed,
    so it is not gone); otherwise it matches nothing."""
    try:
        return interval_identity(interval, "updated")
    except Invalid:
        raw_id = interval.get("id")
        if isinstance(raw_id, int) and not isinstance(raw_id, bool):
            return f"id:{raw_id}", raw_id, None, None
        return "", None, None, None


def _interval_time(interval: dict[str, Any]) -> float:
    for name in ("timestamp", "end", "begin"):
        value = interval.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return time.time()


def _payload(value: dict[str, Any]) -> bytes:
    """A fetched item as the payload decoding takes. orjson writes it (0.7 us against 8 for the
    standard library, for a 450-byte device message); the standard library still writes what
    orjson cannot (integers past 64 bits) or would change (NaN and infinities, which orjson
    writes as null and decoding must refuse, as it does for a live message)."""
    if not _non_finite(value):
        try:
            return orjson.dumps(value)
        except TypeError:  # an integer past 64 bits
            pass
    return json.dumps(value, separators=(",", ":")).encode()


def _non_finite(value: Any) -> bool:
    if type(value) is float:
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(map(_non_finite, value.values()))
    if isinstance(value, list):
        return any(map(_non_finite, value))
    return False


def iso_time(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


__all__ = ["Backfill", "BackfillJob", "BackfillReport", "iso_time"]
