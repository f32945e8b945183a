"""Delete what the mirror holds that flespi no longer has, by listing flespi through REST.

A re-snapshot of retained state re-sends what exists but cannot say what disappeared while the
mirror was away (a deleted device, a cleared telemetry parameter). A reconcile lists what
exists now (devices, other items, telemetry, settings, plugin configurations) and deletes every
row of the mirror's state whose item is not listed, as the zero-length "gone" publication flespi
would have sent, through the live path (``replay.py``): tombstones are written, and the deletion
carries the time the listing started, so anything that appeared or changed after that time is
newer than the deletion and stays.

A listing that fails is not an empty listing: its table is left alone. And a table would lose
more than ``max_delete_fraction`` of its rows, the reconcile refuses (a token that lost its
rights lists nothing) unless forced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from mirror.decode.records import Inbound
from mirror.ops import metrics
from mirror.repair.replay import inbound, write_inbound
from mirror.repair.rest import RestClient, RestError
from mirror.store.writer import Store

log = logging.getLogger(__name__)

WRITE_CHUNK = 5000
Key = tuple[Any, ...]


@dataclass(frozen=True)
class _Table:
    """One state table: how to list its keys in the mirror and at flespi, and the topic that
    deletes a key."""

    name: str
    select: str  # SQL returning the key columns, then the row's account (cid)
    topic: Callable[[Key], str]


_TABLES = (
    _Table(
        "objects",
        "SELECT api, origin, id, cid FROM objects"
        " WHERE NOT (api = 'platform' AND origin = 'customer')",
        lambda k: f"flespi/state/{k[0]}/{k[1]}/{k[2]}",
    ),
    _Table(
        "telemetry",
        "SELECT device_id, name, cid FROM telemetry",
        lambda k: f"flespi/state/gw/devices/{k[0]}/telemetry/{k[1]}",
    ),
    _Table(
        "device_settings",
        "SELECT device_id, name, cid FROM device_settings",
        lambda k: f"flespi/state/gw/devices/{k[0]}/settings/{k[1]}",
    ),
    _Table(
        "plugin_device_configs",
        "SELECT plugin_id, device_id, cid FROM plugin_device_configs",
        lambda k: f"flespi/state/gw/plugins/{k[0]}/devices/{k[1]}",
    ),
)


@dataclass
class ReconcileReport:
    listed_at: float = 0.0
    deleted: dict[str, int] = field(default_factory=dict)  # table -> rows deleted
    skipped: dict[str, str] = field(default_factory=dict)  # table -> why it was left alone


class Reconcile:
    def __init__(
        self,
        rest: RestClient,
        engine: AsyncEngine,
        *,
        max_delete_fraction: float = 0.5,
        cid: int | None = None,
        accounts: Sequence[int] = (),
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.rest = rest
        self.engine = engine
        self.store = Store(engine)
        self.max_delete_fraction = max_delete_fraction
        self.cid = cid
        # Only these accounts (--cid): their rows are compared with what flespi lists for them
        # (selector cid=ID); other accounts' rows, and rows of no known account, stay.
        self.accounts = tuple(accounts)
        self.progress = progress or (lambda _step: None)

    async def run(self) -> ReconcileReport:
        report = ReconcileReport(listed_at=time.time())
        held = await self._held()
        existing = await self._existing(held)
        for table in _TABLES:
            self.progress(table.name)
            keys = existing.get(table.name)
            if keys is None:
                report.skipped[table.name] = "flespi's listing failed"
                continue
            gone = sorted(held[table.name] - keys)
            limit = self.max_delete_fraction * len(held[table.name])
            if gone and len(gone) > limit and len(gone) > 10:
                report.skipped[table.name] = (
                    f"would delete {len(gone)} of {len(held[table.name])} rows "
                    f"(more than {self.max_delete_fraction:.0%}); refusing"
                )
                log.error("reconcile: %s: %s", table.name, report.skipped[table.name])
                continue
            report.deleted[table.name] = await self._delete(table, gone, report.listed_at)
        log.info(
            "reconcile: deleted %s%s",
            ", ".join(f"{n} {t}" for t, n in report.deleted.items()) or "nothing",
            "".join(f"; {t} skipped: {why}" for t, why in report.skipped.items()),
        )
        return report

    async def _held(self) -> dict[str, set[Key]]:
        wanted = set(self.accounts)
        async with self.engine.connect() as conn:
            return {
                t.name: {
                    tuple(row)[:-1]
                    for row in await conn.execute(text(t.select))
                    if not wanted or row[-1] in wanted
                }
                for t in _TABLES
            }

    async def _list_all(self, uri: str, data: dict[str, Any] | None = None) -> list[Any] | None:
        """``uri`` with ``{selector}`` as every item, or each account's items (cid=ID)."""
        if not self.accounts:
            return await self._list(uri.format(selector="all"), data)
        items: list[Any] = []
        for account in self.accounts:
            listed = await self._list(uri.format(selector=f"cid={account}"), data)
            if listed is None:
                return None
            items += listed
        return items

    async def _existing(self, held: dict[str, set[Key]]) -> dict[str, set[Key]]:
        """Keys flespi lists now, per table; a table whose listing failed is missing."""
        found: dict[str, set[Key]] = {}
        objects = await self._objects({(k[0], k[1]) for k in held["objects"]})
        if objects is not None:
            found["objects"] = objects
        telemetry = await self._list_all("gw/devices/{selector}/telemetry/all")
        if telemetry is not None:
            found["telemetry"] = {
                (int(d["id"]), name) for d in telemetry for name in (d.get("telemetry") or {})
            }
        settings = await self._list_all("gw/devices/{selector}/settings/all")
        if settings is not None:
            names = {(int(s["device_id"]), str(s["name"])) for s in settings}
            # deeper setting levels (name/field) live as long as their setting does
            found["device_settings"] = {
                k for k in held["device_settings"] if (k[0], str(k[1]).split("/")[0]) in names
            }
        plugins = await self._list_all("gw/plugins/all/devices/{selector}")
        if plugins is not None:
            found["plugin_device_configs"] = {(int(p["plugin_id"]), int(p["id"])) for p in plugins}
        return found

    async def _objects(self, kinds: Iterable[tuple[str, str]]) -> set[Key] | None:
        keys: set[Key] = set()
        for api, origin in sorted(kinds):
            listed = await self._list_all(f"{api}/{origin}/{{selector}}", {"fields": "id"})
            if listed is None:
                return None
            keys |= {(api, origin, int(item["id"])) for item in listed if "id" in item}
        return keys

    async def _list(self, uri: str, data: dict[str, Any] | None = None) -> list[Any] | None:
        try:
            items = await self.rest.get(uri, data)
        except RestError:
            return None  # logged by the client
        return [item for item in items if isinstance(item, dict)]

    async def _delete(self, table: _Table, gone: list[Key], listed_at: float) -> int:
        deleted = 0
        for start in range(0, len(gone), WRITE_CHUNK):
            messages: list[Inbound] = [
                inbound(table.topic(key), b"", listed_at, self.cid)
                for key in gone[start : start + WRITE_CHUNK]
            ]
            result = await write_inbound(self.store, messages)
            deleted += result.rows.get((table.name, "delete"), 0)
        metrics.RECONCILE_DELETIONS.labels(table.name).inc(deleted)
        return deleted


__all__ = ["Reconcile", "ReconcileReport"]
