"""Gap backfill and reconcile end to end: real Mosquitto, PostgreSQL, the simulator's flespi.

The proof of issue 12: the mirror runs, stops, its broker session expires while the account
keeps producing (and deleting), it starts again, and afterwards every message in the
simulator's record of the account is in ``device_messages`` exactly once and the state items
deleted meanwhile are gone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from mirror.ops import metrics
from mirror.pipeline import Mirror
from mirror.repair.resync import PENDING, record_gap
from mirror.sim.rest_responder import AccountRecord, RestResponder
from mirror.sim.simulate import SimulationOptions, drop_session, run_simulation
from mirror.sim.traffic import FIRST_DEVICE_ID
from mirror.store.database import create_engine, migrate
from tests.helpers import ROOT, publisher, query, running_mirror, settings_for, settle
from tests.launchers import MosquittoBroker, TestDatabase, free_port

DEVICES = 6


async def simulate(
    broker: MosquittoBroker, record: AccountRecord, messages: int, seed: int, snapshot: bool
) -> int:
    """Publish simulated traffic; everything published goes into the account's record."""
    options = SimulationOptions(
        mqtt_url=broker.url,
        devices=DEVICES,
        rate=0,
        duration=60,
        seed=seed,
        retained_snapshot=snapshot,
        max_messages=messages,
        # A backfill asks flespi for a window of device time: messages published during the
        # gap with days-old device time (black-box backlogs) fall outside it. Known gap,
        # reported with issue 8; these tests keep to live device time.
        backlog=False,
    )
    report = await asyncio.to_thread(run_simulation, options, observer=record.published)
    return report.published


async def assert_every_recorded_message_stored_once(
    engine: AsyncEngine, record: AccountRecord
) -> None:
    rows = await query(
        engine, "SELECT device_id, digest, count(*) FROM device_messages GROUP BY 1, 2"
    )
    stored = {(int(d), bytes(g)): int(n) for d, g, n in rows}
    expected = {(d, hashlib.md5(p).digest()) for d, p in record.messages()}
    assert expected, "the simulator recorded no messages"
    missing = expected - set(stored)
    assert not missing, f"{len(missing)} of {len(expected)} recorded messages are not stored"
    assert all(stored[key] == 1 for key in expected)
    recorded_devices = {d for d, _ in expected}
    extra = {k for k in stored if k[0] in recorded_devices} - expected
    assert not extra, f"{len(extra)} stored messages are not in the record"


async def stored_intervals(engine) -> set[tuple[int, int, int | tuple[float, float]]]:
    """(calc, device, flespi id or (begin, end)) of every stored interval, as the record
    lists them."""
    rows = await query(
        engine,
        "SELECT calc_id, device_id, interval_id, extract(epoch FROM begin),"
        ' extract(epoch FROM "end") FROM intervals',
    )
    return {
        (int(c), int(d), int(i) if i is not None else (float(b), float(e)))
        for c, d, i, b, e in rows
    }


async def test_after_an_expired_session_every_message_is_stored_once_and_deletions_are_gone(
    broker: MosquittoBroker,
    database: TestDatabase,
    schema_name: str,
    record: AccountRecord,
    responder: RestResponder,
) -> None:
    settings = settings_for(broker.url, database.url, schema_name, session_expiry=1)
    async with running_mirror(settings) as running:
        await simulate(broker, record, 300, seed=1, snapshot=True)
        await settle(running)
        engine = running.engine
        before = await query(engine, "SELECT count(*) FROM device_messages")
        assert before[0][0] > 0
    await asyncio.sleep(3)  # the broker drops the session (expiry 1 s) and what it would hold

    # While no mirror is subscribed, the account keeps producing and deleting.
    await simulate(broker, record, 600, seed=2, snapshot=False)
    gone_device = FIRST_DEVICE_ID + 3
    gone_param = (FIRST_DEVICE_ID + 2, "battery.level")
    calc, device, gone_interval = next(i for i in record.intervals() if i[1] != gone_device)
    if isinstance(gone_interval, int):
        deletion: dict[str, object] = {"id": gone_interval}
    else:  # an interval without a flespi id: deleted by its span
        deletion = {"begin": gone_interval[0], "end": gone_interval[1]}
    with publisher(broker.url) as pub:
        topic = f"flespi/interval/gw/calcs/{calc}/devices/{device}/deleted"
        pub.publish(topic, deletion, time.time())
        record.observe(topic, json.dumps(deletion).encode(), time.time())
        for topic in (
            f"flespi/state/gw/devices/{gone_device}",
            f"flespi/state/gw/devices/{gone_param[0]}/telemetry/{gone_param[1]}",
        ):
            pub.publish(topic, b"", time.time(), retain=True)
            record.observe(topic, b"", time.time())

    async with running_mirror(settings) as running:
        assert running.mirror.source.session_present is False
        engine = running.engine
        assert await _repair_done(running.mirror, engine)
        await settle(running)
        await assert_every_recorded_message_stored_once(engine, record)
        stored = await stored_intervals(engine)
        assert record.intervals()
        # those created meanwhile are there, and those deleted meanwhile are gone; intervals
        # without a flespi id (calculator 8002) as their span is now, begin moves included
        assert set(record.intervals()) == stored
        assert any(isinstance(i[2], tuple) for i in stored), "no interval without an id"
        assert (calc, device, gone_interval) not in stored
        objects = await query(engine, "SELECT id FROM objects WHERE origin = 'devices'")
        assert gone_device not in {int(r[0]) for r in objects}
        assert len(objects) == DEVICES - 1
        leftovers = await query(
            engine, "SELECT count(*) FROM telemetry WHERE device_id = :d", d=gone_device
        )
        assert leftovers[0][0] == 0
        param = await query(
            engine,
            "SELECT count(*) FROM telemetry WHERE device_id = :d AND name = :n",
            d=gone_param[0],
            n=gone_param[1],
        )
        assert param[0][0] == 0
        repaired = await query(
            engine, "SELECT count(*) FROM sync_state WHERE name LIKE 'gap:%%|device:%%'"
        )
        assert repaired[0][0] == DEVICES - 1  # one finished progress row per listed device


def _backfill(
    database: TestDatabase, broker: MosquittoBroker, schema: str, *extra: str
) -> list[str]:
    return [
        sys.executable, "-m", "mirror.cli", "backfill",
        "--database-url", database.url, "--schema", schema, "--mqtt-url", broker.url,
        "--from", "2020-01-01T00:00:00", "--to", str(time.time() + 3600),
        "--page-size", "25", *extra,
    ]


async def test_a_backfill_killed_halfway_and_run_again_stores_everything_once(
    broker: MosquittoBroker,
    database: TestDatabase,
    schema_name: str,
    record: AccountRecord,
    responder: RestResponder,
    tmp_path: Path,
) -> None:
    await simulate(broker, record, 1500, seed=3, snapshot=True)
    engine = create_engine(database.url, schema_name)
    try:
        await migrate(engine, schema_name)
        responder.behaviour.delay = 0.05  # slow enough to be killed in the middle
        command = _backfill(database, broker, schema_name)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log = (tmp_path / "first.log").open("w")
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while True:  # kill it once some pages are saved and some devices are not done
            rows = await query(engine, "SELECT value->>'finished' FROM sync_state")
            if rows and any(r[0] == "false" for r in rows):
                break
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        partial = (await query(engine, "SELECT count(*) FROM device_messages"))[0][0]
        assert 0 < partial < record.message_count()

        responder.behaviour.delay = 0.0
        second = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, env=env, timeout=120
        )
        assert second.returncode == 0, second.stderr[-2000:]
        assert "0 failed" in second.stdout
        await assert_every_recorded_message_stored_once(engine, record)
        stored = (await query(engine, "SELECT count(*) FROM device_messages"))[0][0]
        assert stored == record.message_count()

        third = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, env=env, timeout=120
        )
        assert third.returncode == 0, third.stderr[-2000:]
        assert (await query(engine, "SELECT count(*) FROM device_messages"))[0][0] == stored
    finally:
        await engine.dispose()


async def _repair_done(mirror: Mirror, engine: AsyncEngine, timeout: float = 60) -> bool:
    """Wait for the daemon's first round of gap repair to end; True when no plan is left."""
    deadline = time.monotonic() + timeout
    while mirror.repair_rounds < 1:
        assert time.monotonic() < deadline, "the gap repair did not end"
        await asyncio.sleep(0.1)
    return not await query(engine, "SELECT 1 FROM sync_state WHERE name = :n", n=PENDING)


async def test_a_repair_that_flespi_refuses_stays_pending_and_resumes_on_the_next_start(
    broker: MosquittoBroker,
    database: TestDatabase,
    schema_name: str,
    record: AccountRecord,
    responder: RestResponder,
) -> None:
    settings = settings_for(broker.url, database.url, schema_name, session_expiry=1)
    async with running_mirror(settings) as running:
        await simulate(broker, record, 200, seed=4, snapshot=True)
        await settle(running)
    await asyncio.sleep(3)  # the session expires
    await simulate(broker, record, 300, seed=5, snapshot=False)

    responder.behaviour.error_code = 500  # flespi fails every REST call
    kept = dataclasses.replace(settings, session_expiry=300)
    async with running_mirror(kept) as running:
        assert running.mirror.source.session_present is False
        assert not await _repair_done(running.mirror, running.engine)
        # the live stream is not held up by the failed repair
        await simulate(broker, record, 50, seed=6, snapshot=False)
        await settle(running)
        live = await query(running.engine, "SELECT count(*) FROM device_messages")
        assert live[0][0] < record.message_count()  # the gap is still open

    responder.behaviour.error_code = None
    async with running_mirror(kept) as running:
        assert running.mirror.source.session_present is True  # nothing would trigger a repair
        assert await _repair_done(running.mirror, running.engine)
        await settle(running)
        await assert_every_recorded_message_stored_once(running.engine, record)


def test_a_backfill_without_a_start_is_refused_naming_the_flag() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mirror.cli", "backfill", "--mqtt-url", "mqtt://127.0.0.1:1"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--from" in done.stderr and "start of its window" in done.stderr


def test_a_command_that_cannot_reach_the_broker_says_what_to_check(
    database: TestDatabase, schema_name: str
) -> None:
    """The commands' requester session (the daemon's own session code): a refused first
    connection ends the command at once, in one line naming the broker and what to check."""
    url = f"mqtt://127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "mirror.cli", "reconcile", "--mqtt-url", url,
         "--database-url", database.url, "--schema", schema_name],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert f"no session with the broker at {url}" in done.stderr, done.stderr
    assert "check --mqtt-url" in done.stderr
    assert time.monotonic() - started < 20  # not the 30 s connect timeout


async def test_the_reconcile_command_deletes_what_flespi_lost_and_refuses_to_empty_a_table(
    broker: MosquittoBroker,
    database: TestDatabase,
    schema_name: str,
    record: AccountRecord,
    responder: RestResponder,
) -> None:
    settings = settings_for(broker.url, database.url, schema_name)
    async with running_mirror(settings) as running:
        await simulate(broker, record, 100, seed=7, snapshot=True)
        await settle(running)
    engine = create_engine(database.url, schema_name)
    command = [
        sys.executable, "-m", "mirror.cli", "reconcile", "--database-url", database.url,
        "--schema", schema_name, "--mqtt-url", broker.url,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        gone_device, kept = FIRST_DEVICE_ID + 2, FIRST_DEVICE_ID + 1
        # flespi lost these while the mirror heard nothing of it
        record.observe(f"flespi/state/gw/devices/{gone_device}", b"", time.time())
        record.observe(f"flespi/state/gw/devices/{kept}/telemetry/din", b"", time.time())
        done = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        devices = {int(r[0]) for r in await query(engine, "SELECT id FROM objects")}
        assert gone_device not in devices and kept in devices
        left = await query(
            engine, "SELECT count(*) FROM telemetry WHERE device_id = :d", d=gone_device
        )
        assert left[0][0] == 0
        params = {r[0] for r in await query(
            engine, "SELECT name FROM telemetry WHERE device_id = :d", d=kept
        )}  # fmt: skip
        assert "din" not in params and "battery.level" in params

        # A flespi that suddenly lists (almost) nothing: the table is left alone, exit 1.
        for n in range(1, DEVICES + 1):
            if n != 1:
                record.observe(f"flespi/state/gw/devices/{FIRST_DEVICE_ID + n}", b"", time.time())
        # Deleting a device object also deletes that device's telemetry (issue 8 item 10), so
        # the devices still listed are the ones whose telemetry must stay.
        still = "SELECT count(*) FROM telemetry WHERE device_id = :d"
        before = (await query(engine, still, d=FIRST_DEVICE_ID + 1))[0][0]
        refused = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, env=env, timeout=120
        )
        assert refused.returncode == 1
        assert "refusing" in refused.stdout
        assert before > 0
        assert (await query(engine, still, d=FIRST_DEVICE_ID + 1))[0][0] == before
    finally:
        await engine.dispose()


async def test_a_backfill_matches_intervals_without_ids_by_their_span(
    broker: MosquittoBroker, database: TestDatabase, schema_name: str, record: AccountRecord,
    responder: RestResponder,
) -> None:  # fmt: skip
    """flespi lists what it holds; stored intervals without an id are matched to the listed
    ones by time span: one moved its begin (updated in place), one is gone (deleted), one
    outside the window is left alone."""
    from mirror.decode.topics import decode
    from mirror.ops.config import Settings
    from mirror.repair.backfill import Backfill, BackfillJob
    from mirror.repair.rest_carrier import standalone_rest_client
    from mirror.store.batch import coalesce
    from mirror.store.writer import Store
    from tests.helpers import interval_event as event
    from tests.helpers import interval_span as span

    ts = float(int(time.time()) - 600)  # whole seconds: compared exactly below
    live = [
        event(1, "created", span(ts, ts + 60, mileage=1), ts + 60),  # moves its begin meanwhile
        event(1, "created", span(ts + 100, ts + 160), ts + 160),  # deleted meanwhile
        event(1, "created", span(ts - 9000, ts - 8000), ts - 8000),  # before the window
    ]
    now = span(ts - 20, ts + 90, mileage=4)
    record.observe(live[0].topic.replace("/created", "/updated"), json.dumps(now).encode(), ts, 1)
    engine = create_engine(database.url, schema_name)
    try:
        await migrate(engine, schema_name)
        await Store(engine).write(coalesce((m, decode(m)) for m in live))
        async with standalone_rest_client(Settings(mqtt_url=broker.url)) as rest:
            job = BackfillJob("t", ts - 3600, time.time(), devices=(), intervals=True)
            backfill = Backfill(rest, engine, job)
            await backfill._intervals(9, 1)
        rows = await query(
            engine,
            "SELECT interval_id, extract(epoch FROM begin), extract(epoch FROM \"end\"),"
            " data->>'mileage' FROM intervals ORDER BY 2",
        )
        assert [(i, float(b), float(e), m) for i, b, e, m in rows] == [
            (None, ts - 9000, ts - 8000, None),
            (None, ts - 20, ts + 90, "4"),
        ]
        assert (backfill.report.intervals, backfill.report.intervals_deleted) == (1, 1)
    finally:
        await engine.dispose()


REFUSE_MESSAGES = [
    "CREATE FUNCTION refuse_messages() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'maintenance window: no writes'; END $$",
    "CREATE TRIGGER operator_guard BEFORE INSERT ON device_messages_recent "
    "FOR EACH ROW EXECUTE FUNCTION refuse_messages()",
]


@pytest.mark.slow
async def test_messages_the_broker_dropped_behind_a_long_hold_are_repaired_over_rest(
    database: TestDatabase, schema_name: str, record: AccountRecord
) -> None:
    """flespi drops a held session's messages past its limit and disconnects it, keeping the
    session (issue 18 item 3). Here Mosquitto keeps 20 queued messages beyond the mirror's 10
    in flight and drops the rest; the simulator then disconnects the mirror as flespi would.
    The mirror notices a disconnect that ended a hold and backfills the window over REST."""
    broker = MosquittoBroker(max_queued=20).start()
    responder = RestResponder(broker.url, record).start()
    detected = metrics.REGISTRY.get_sample_value("flespi_mirror_gaps_detected_total") or 0.0
    settings = settings_for(
        broker.url, database.url, schema_name, max_unacked=10, batch_size=10, stall_after=1.0,
        repair_overlap=60.0,
    )  # fmt: skip
    try:
        async with running_mirror(settings) as running:
            engine = running.engine
            published = await simulate(broker, record, 50, seed=11, snapshot=True)
            await settle(running)
            assert not await query(engine, "SELECT 1 FROM sync_state WHERE name = :n", n=PENDING)
            async with engine.begin() as conn:  # the database refuses device messages a while
                for statement in REFUSE_MESSAGES:
                    await conn.execute(text(statement))
            published += await simulate(broker, record, 400, seed=12, snapshot=False)
            await asyncio.sleep(1.5)  # held longer than --stall-after
            epoch = running.mirror.source.epoch
            options = SimulationOptions(mqtt_url=broker.url)
            await asyncio.to_thread(drop_session, options, settings.client_id)
            # the mirror, paused at its bound, reads the DISCONNECT once the hold is over
            async with engine.begin() as conn:
                await conn.execute(text("DROP TRIGGER operator_guard ON device_messages_recent"))
            deadline = time.monotonic() + 30
            while running.mirror.source.epoch == epoch or not running.mirror.source.connected:
                assert time.monotonic() < deadline, "the mirror did not come back"
                await asyncio.sleep(0.05)
            assert running.mirror.source.session_present is True  # the session was kept
            deadline = time.monotonic() + 90
            while await query(engine, "SELECT 1 FROM sync_state WHERE name = :n", n=PENDING) or (
                running.mirror.repair_rounds < 1
            ):
                assert time.monotonic() < deadline, "the repair did not finish"
                await asyncio.sleep(0.2)
            await settle(running)
            # the broker did drop messages: the live stream alone did not bring them all
            assert running.mirror.committed_messages < published
            await assert_every_recorded_message_stored_once(engine, record)
        assert metrics.REGISTRY.get_sample_value("flespi_mirror_gaps_detected_total") == (
            detected + 1
        )
    finally:
        responder.stop()
        broker.cleanup()


def _cid_of(record: AccountRecord, device: int) -> int:
    return int(json.loads(record.answer("get", f"gw/devices/{device}", {})[1])["result"][0]["cid"])


async def test_backfill_and_reconcile_with_cid_touch_only_that_account(
    broker: MosquittoBroker,
    database: TestDatabase,
    schema_name: str,
    record: AccountRecord,
    responder: RestResponder,
) -> None:
    """issue 18 item 4: ``--cid`` asks flespi for that account's items only (selector cid=ID),
    and reconcile leaves other accounts' rows alone."""
    await simulate(broker, record, 300, seed=21, snapshot=True)  # no mirror: flespi keeps it
    devices = [FIRST_DEVICE_ID + n for n in range(1, DEVICES + 1)]
    accounts = {d: _cid_of(record, d) for d in devices}
    mine = accounts[devices[0]]
    assert set(accounts.values()) - {mine}, "the simulator's fleet spans two accounts"
    base = [
        sys.executable, "-m", "mirror.cli", "--database-url", database.url, "--schema",
        schema_name, "--mqtt-url", broker.url, "--cid", str(mine),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(command: str, *extra: str) -> subprocess.CompletedProcess[str]:
        argv = [*base[:3], command, *base[3:], *extra]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)

    backfilled = await asyncio.to_thread(run, "backfill", "--from", "0")
    assert backfilled.returncode == 0, backfilled.stderr[-2000:]
    engine = create_engine(database.url, schema_name)
    try:
        stored = {int(r[0]) for r in await query(
            engine, "SELECT DISTINCT device_id FROM device_messages"
        )}  # fmt: skip
        assert stored and all(accounts[d] == mine for d in stored)
        assert "gw/devices/all" not in responder.asked
        assert f"gw/devices/cid={mine}" in responder.asked

        # the whole fleet mirrored; then flespi loses one device of each account
        settings = settings_for(broker.url, database.url, schema_name)
        async with running_mirror(settings) as running:
            await simulate(broker, record, 50, seed=22, snapshot=True)
            await settle(running)
        other = next(d for d in devices if accounts[d] != mine)
        for gone in (devices[0], other):
            record.observe(f"flespi/state/gw/devices/{gone}", b"", time.time())
        reconciled = await asyncio.to_thread(run, "reconcile")
        assert reconciled.returncode == 0, reconciled.stderr[-2000:]
        held = {int(r[0]) for r in await query(engine, "SELECT id FROM objects")}
        assert devices[0] not in held  # gone from its account: deleted
        assert other in held  # another account's row: left alone
    finally:
        await engine.dispose()


async def test_one_process_repairs_whatever_the_number_of_workers(
    broker: MosquittoBroker,
    database: TestDatabase,
    schema_name: str,
    record: AccountRecord,
    responder: RestResponder,
) -> None:
    """issue 18 item 4: two daemons on one schema both find the pending plan; one repairs (an
    advisory lock), so flespi is asked once, not twice."""
    first = settings_for(broker.url, database.url, schema_name, client_id="worker-a")
    second = dataclasses.replace(first, client_id="worker-b")
    for settings in (first, second):  # their broker sessions exist: no lost session below
        async with running_mirror(settings):
            pass
    await simulate(broker, record, 200, seed=31, snapshot=True)
    engine = create_engine(database.url, schema_name)
    try:
        now = time.time()
        await record_gap(engine, now - 3600, now)
    finally:
        await engine.dispose()
    responder.behaviour.delay = 0.05  # a repair long enough for both to try at once
    async with running_mirror(first) as a, running_mirror(second) as b:
        assert a.mirror.source.session_present and b.mirror.source.session_present
        deadline = time.monotonic() + 60
        while await query(a.engine, "SELECT 1 FROM sync_state WHERE name = :n", n=PENDING) or (
            a.mirror.repair_rounds < 1 or b.mirror.repair_rounds < 1
        ):
            assert time.monotonic() < deadline, "the repair did not finish"
            await asyncio.sleep(0.2)
        await settle(a)
        await assert_every_recorded_message_stored_once(a.engine, record)
    # Backfill lists the devices once, reconcile once: one repair
    assert responder.asked.count("gw/devices/all") == 2, responder.asked[:20]


def test_fetched_items_become_the_payloads_a_live_message_would_be_decoded_from() -> None:
    """orjson writes fetched items; what it cannot write (integers past 64 bits) or would change
    (NaN, which it writes as null) still goes through the standard library, so decoding refuses
    a NaN as it refuses it live, never storing a null in its place."""
    from mirror.decode.records import Inbound, Rejection
    from mirror.decode.topics import decode
    from mirror.repair.backfill import _payload

    for item in ({"ident": "é", "timestamp": 1.5, "a": [1, None, {"b": True}]}, {"big": 2**70}):
        assert json.loads(_payload(item)) == item
    nan = _payload({"timestamp": 1.0, "temp": float("nan")})
    decoded = decode(Inbound("flespi/message/gw/devices/1", nan, {}, 2.0))
    assert isinstance(decoded, Rejection) and decoded.reason == "non_finite_number", decoded
