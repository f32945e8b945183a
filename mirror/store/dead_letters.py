"""``flespi-mirror replay-dead-letters``: process dead letters again once their cause is fixed.

A dead letter keeps the whole message (topic, payload up to ``--max-payload-bytes``, user
properties, receive time), so it can go through the same path as a live message: decode,
coalesce, store. Oldest first, in batches; each batch is written in one transaction together
with the deletion of the dead letters it re-processed, so a replayed message leaves
``dead_letters`` exactly when it is stored, and one refused again comes back as a new dead
letter (with today's reason) in the same commit: nothing is lost or doubled by a crash.
A dead letter whose payload was cut (a message over the limit) cannot be replayed faithfully
and stays where it is.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from mirror.decode.records import Inbound
from mirror.decode.topics import decode
from mirror.store.batch import coalesce
from mirror.store.writer import Store

log = logging.getLogger(__name__)

_SELECT = text(
    """
    SELECT id, topic, payload, properties::text, extract(epoch FROM received_at)::float8
    FROM dead_letters
    WHERE id > :after AND payload_size = octet_length(payload)
      AND (CAST(:reasons AS text[]) IS NULL OR reason = ANY(CAST(:reasons AS text[])))
      AND (CAST(:since AS timestamptz) IS NULL OR received_at >= CAST(:since AS timestamptz))
    ORDER BY id
    LIMIT :limit
    """
)
_DELETE = text("DELETE FROM dead_letters WHERE id = ANY(CAST(:ids AS bigint[]))")
_INCOMPLETE = text(
    """
    SELECT count(*) FROM dead_letters
    WHERE payload_size <> octet_length(payload)
      AND (CAST(:reasons AS text[]) IS NULL OR reason = ANY(CAST(:reasons AS text[])))
      AND (CAST(:since AS timestamptz) IS NULL OR received_at >= CAST(:since AS timestamptz))
    """
)


@dataclass
class ReplayReport:
    replayed: int = 0  # dead letters taken out of the table and processed again
    stored: int = 0  # of them, written to the mirror's tables this time
    refused_again: Counter[str] = field(default_factory=Counter)  # new dead letters, by reason
    incomplete: int = 0  # left in place: payload cut at --max-payload-bytes

    def summary(self) -> str:
        again = ", ".join(f"{n} x {r}" for r, n in sorted(self.refused_again.items())) or "none"
        return (
            f"replayed {self.replayed} dead letters: {self.stored} stored, refused again: "
            f"{again}; {self.incomplete} left in place (payload cut at the size limit)"
        )


def _inbound(topic: str, payload: bytes, properties: str, received_at: float) -> Inbound:
    props = json.loads(properties)
    return Inbound(topic, bytes(payload), {str(k): str(v) for k, v in props.items()}, received_at)


async def replay_dead_letters(
    engine: AsyncEngine,
    *,
    reasons: Sequence[str] = (),
    since: dt.datetime | None = None,
    max_payload_bytes: int = 1024 * 1024,
    batch_size: int = 500,
) -> ReplayReport:
    """Replay the dead letters matching ``reasons`` (all when empty) received at or after
    ``since``. Raises the store's DatabaseUnavailable when the database still refuses."""
    store = Store(engine, max_payload_bytes=max_payload_bytes)
    report = ReplayReport()
    filters: dict[str, Any] = {"reasons": list(reasons) or None, "since": since}
    after = 0
    while True:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(_SELECT, {**filters, "after": after, "limit": batch_size})
            ).all()
        if not rows:
            break
        after = rows[-1][0]
        messages = [_inbound(*row[1:]) for row in rows]
        plan = coalesce((m, decode(m, max_payload_bytes)) for m in messages)
        ids = [row[0] for row in rows]
        result = await store.write(plan, then=[(_DELETE, {"ids": ids})])
        report.replayed += len(ids)
        report.refused_again.update(result.dead_letters)
        report.stored += len(ids) - sum(result.dead_letters.values())
        # New dead letters get new ids; the cursor (id > after) never comes back to them.
    async with engine.connect() as conn:
        report.incomplete = int((await conn.execute(_INCOMPLETE, filters)).scalar_one())
    log.info("%s", report.summary())
    return report
