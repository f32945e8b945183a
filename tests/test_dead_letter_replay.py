"""``flespi-mirror replay-dead-letters``: dead letters whose cause is gone land where they belong,
through the same decode -> coalesce -> store path as live messages; the rest stay dead letters."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from mirror.decode.records import Inbound, Reason, Rejection
from mirror.store.batch import DeadLetter
from mirror.store.database import create_engine, migrate
from mirror.store.dead_letters import replay_dead_letters
from mirror.store.statements import STATEMENTS, dead_letter_params
from tests.helpers import ROOT, query
from tests.launchers import TestDatabase

TS = 1_731_990_000.0
PROPS = {"timestamp": repr(TS), "cid": "123"}


def letter(topic: str, payload: bytes, reason: Reason, received_at: float = TS) -> DeadLetter:
    detail = "[42501] permission denied for table device_messages"
    return DeadLetter(Inbound(topic, payload, PROPS, received_at), Rejection(reason, detail))


async def add_letters(engine: AsyncEngine, letters: list[DeadLetter], limit: int = 1 << 20) -> None:
    async with engine.begin() as conn:
        await conn.execute(STATEMENTS["dead_letters.append"], dead_letter_params(letters, limit))


@pytest.fixture
async def engine(database: TestDatabase, schema_name: str):
    engine = create_engine(database.url, schema_name)
    await migrate(engine, schema_name)
    yield engine
    await engine.dispose()


async def test_replay_stores_what_is_fixed_and_keeps_what_is_still_refused(
    database: TestDatabase, engine: AsyncEngine, schema_name: str
) -> None:
    big = json.dumps({"timestamp": TS, "blob": "x" * 200_000}).encode()  # over the old 64 KiB cut
    await add_letters(
        engine,
        [
            # What the old store did on a REVOKE: device messages dead-lettered and acked.
            *(
                letter(
                    f"flespi/message/gw/devices/{i}",
                    b'{"timestamp": %d}' % (TS + i),
                    Reason.DATABASE_REJECTED,
                )
                for i in range(50)
            ),
            letter("flespi/message/gw/devices/77", big, Reason.DATABASE_REJECTED),
            # Refused by an older decoder, valid now.
            letter(
                "flespi/state/gw/devices/1/telemetry/s",
                b'{"s":"a\\\\u0000b"}',
                Reason.UNSUPPORTED_UNICODE,
            ),
            # Still bad: comes back as a new dead letter.
            letter(
                "flespi/state/gw/devices/1/telemetry/t", b'{"speed": ', Reason.DATABASE_REJECTED
            ),
            # Another reason, not asked for: untouched.
            letter("flespi/foo/bar", b"1", Reason.UNKNOWN_TOPIC),
        ],
    )
    await add_letters(  # cut at 1 KiB when it was written: cannot be replayed faithfully
        engine, [letter("flespi/message/gw/devices/88", big, Reason.DATABASE_REJECTED)], 1024
    )
    done = subprocess.run(
        [
            sys.executable, "-m", "mirror.cli", "replay-dead-letters",
            "--database-url", database.url, "--schema", schema_name,
            "--reason", "database_rejected", "--reason", "unsupported_unicode",
        ],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "replayed 53 dead letters: 52 stored, refused again: 1 x malformed_json; "
        "1 left in place (payload cut at the size limit)"
    )
    assert await query(engine, "SELECT count(*) FROM device_messages") == [(51,)]
    stored = await query(
        engine, "SELECT octet_length(payload::text) FROM device_messages WHERE device_id = 77"
    )
    assert stored[0][0] >= 200_000, "the whole payload was kept and replayed"
    assert await query(engine, "SELECT value->>'s' FROM telemetry WHERE name = 's'") == [
        ("a\\u0000b",)
    ]
    left = await query(engine, "SELECT topic, reason FROM dead_letters ORDER BY id")
    assert left == [
        ("flespi/foo/bar", "unknown_topic"),
        ("flespi/message/gw/devices/88", "database_rejected"),
        ("flespi/state/gw/devices/1/telemetry/t", "malformed_json"),
    ]


async def test_replay_since_takes_only_newer_dead_letters(engine: AsyncEngine) -> None:
    await add_letters(
        engine,
        [
            letter(
                "flespi/message/gw/devices/1",
                b'{"timestamp": %d}' % TS,
                Reason.DATABASE_REJECTED,
                received_at=TS,
            ),
            letter(
                "flespi/message/gw/devices/2",
                b'{"timestamp": %d}' % TS,
                Reason.DATABASE_REJECTED,
                received_at=TS + 3600,
            ),
        ],
    )
    since = dt.datetime.fromtimestamp(TS + 60, dt.UTC)
    report = await replay_dead_letters(engine, since=since)
    assert (report.replayed, report.stored) == (1, 1)
    assert await query(engine, "SELECT device_id FROM device_messages") == [(2,)]
    assert await query(engine, "SELECT topic FROM dead_letters") == [
        ("flespi/message/gw/devices/1",)
    ]
