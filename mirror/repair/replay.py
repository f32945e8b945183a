"""Write messages fetched over REST through the same path as live traffic.

Backfilled history and reconcile deletions are built as the :class:`Inbound` messages flespi
would have published (topic, JSON payload or zero-length deletion, ``timestamp`` and ``cid``
user properties) and go through ``topics.decode`` → ``batch.coalesce`` → ``Store.write``, so
their identity, guards and tombstones are exactly those of live messages: a message that also
arrives live is stored once, and an older deletion never removes a newer value.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping, Sequence

from mirror.decode.records import Inbound
from mirror.decode.topics import decode
from mirror.ops import metrics
from mirror.store.batch import coalesce
from mirror.store.writer import DatabaseUnavailable, Store, WriteResult

log = logging.getLogger(__name__)

RETRY_MIN = 0.2
RETRY_MAX = 10.0


def inbound(
    topic: str, payload: bytes, timestamp: float, cid: int | None = None
) -> Inbound:
    """A message as flespi would have published it at ``timestamp``."""
    properties: Mapping[str, str] = {"timestamp": f"{timestamp:.6f}"}
    if cid is not None:
        properties = {**properties, "cid": str(cid)}
    return Inbound(topic, payload, properties, time.time(), retain=False, qos=1)


async def write_inbound(
    store: Store, messages: Sequence[Inbound], max_payload_bytes: int = 1024 * 1024
) -> WriteResult:
    """Decode, coalesce and write in one transaction, retrying while the database is away."""
    plan = coalesce([(m, decode(m, max_payload_bytes)) for m in messages])
    delay = RETRY_MIN
    while True:
        try:
            result = await store.write(plan)
            break
        except DatabaseUnavailable as exc:
            metrics.DATABASE_ERRORS.labels("unavailable").inc()
            log.warning("database unavailable, retrying in %.1fs: %s", delay, exc)
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(RETRY_MAX, delay * 2)
    for (table, operation), count in result.rows.items():
        if count:
            metrics.ROWS_WRITTEN.labels(table, operation).inc(count)
    for reason, count in result.dead_letters.items():
        metrics.DEAD_LETTERS.labels(reason).inc(count)
    return result
