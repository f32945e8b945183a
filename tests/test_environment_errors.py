"""Errors of the environment hold the batch; only a message refused for its own content is a
dead letter. Against a real PostgreSQL: a least-privilege role losing INSERT (REVOKE/GRANT), an
operator's trigger raising P0001, an operator's CHECK constraint, and statement_timeout; and a
real Mosquitto for the end-to-end cases (nothing acknowledged while held, everything lands after
the fix).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from alembic.util.exc import CommandError
from sqlalchemy import text
from sqlalchemy.exc import CompileError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from mirror.decode.records import DeviceMessage, TelemetryUpdate
from mirror.ops import metrics
from mirror.ops.config import asyncpg_connect_kwargs
from mirror.pipeline import Mirror
from mirror.store.batch import WritePlan
from mirror.store.database import create_engine, migrate
from mirror.store.writer import DatabaseUnavailable, Failure, Store, classify, is_retryable
from tests.helpers import publisher, query, running_mirror, settings_for
from tests.launchers import MosquittoBroker, TestDatabase, record_figures

TS = 1_731_990_000.0
MESSAGES = 100


async def admin(engine: AsyncEngine, *statements: str) -> None:
    async with engine.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement))


@pytest.fixture
async def owner(database: TestDatabase, schema_name: str) -> AsyncIterator[AsyncEngine]:
    """The schema's owner (the test server's superuser), with the schema migrated."""
    engine = create_engine(database.url, schema_name)
    await migrate(engine, schema_name)
    yield engine
    await engine.dispose()


@pytest.fixture
async def writer_url(database: TestDatabase, owner: AsyncEngine, schema_name: str) -> str:
    """A least-privilege role as the README grants it: DML on the schema's tables, no DDL."""
    role = f"writer_{uuid.uuid4().hex[:10]}"
    await admin(
        owner,
        f"CREATE ROLE {role} LOGIN",
        f"GRANT USAGE ON SCHEMA {schema_name} TO {role}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema_name} TO {role}",
        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema_name} TO {role}",
        f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema_name} TO {role}",
    )
    _user, host_part = database.url.split("://", 1)[1].split("@", 1)
    return f"postgresql://{role}@{host_part}"


async def held_then_released(
    owner: AsyncEngine,
    settings: Any,
    broker: MosquittoBroker,
    topics: Callable[[int], str],
    payload: Callable[[int], Any],
    table: str,
    break_it: list[str],
    fix_it: list[str],
) -> dict[str, Any]:
    """Publish while the environment refuses the writes, then fix it; measure what happened."""
    await admin(owner, *break_it)
    async with running_mirror(settings) as running:
        mirror = running.mirror
        with publisher(broker.url) as pub:
            for i in range(MESSAGES):
                pub.publish(topics(i), payload(i), TS + i)
        deadline = time.monotonic() + 20
        while mirror.source.unacked < MESSAGES or mirror.health.database_ok:
            assert time.monotonic() < deadline, (mirror.source.unacked, mirror.health)
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # a few retries while refused
        while_held = {
            "unacked": mirror.source.unacked,
            "rows": (await query(owner, f"SELECT count(*) FROM {table}"))[0][0],
            "dead_letters": (await query(owner, "SELECT count(*) FROM dead_letters"))[0][0],
            "ready": mirror.health.ready,
            "readyz": ", ".join(mirror.health.not_ready_reasons()),
            "batch_held_metric": metrics.REGISTRY.get_sample_value("flespi_mirror_batch_held"),
        }
        fixed_at = time.monotonic()
        await admin(owner, *fix_it)
        while (await query(owner, f"SELECT count(*) FROM {table}"))[0][0] < MESSAGES:
            assert time.monotonic() - fixed_at < 30, "the held batch never landed"
            await asyncio.sleep(0.05)
        landed_after = time.monotonic() - fixed_at
        while mirror.source.unacked:
            assert time.monotonic() - fixed_at < 30
            await asyncio.sleep(0.05)
        after = {
            "rows": (await query(owner, f"SELECT count(*) FROM {table}"))[0][0],
            "dead_letters": (await query(owner, "SELECT count(*) FROM dead_letters"))[0][0],
            "ready": mirror.health.ready,
            "landed_seconds_after_fix": round(landed_after, 2),
        }
    return {"while_held": while_held, "after_fix": after}


def device_topic(i: int) -> str:
    return f"flespi/message/gw/devices/{1000 + i % 10}"


def telemetry_topic(i: int) -> str:
    return f"flespi/state/gw/devices/{1000 + i % 10}/telemetry/param_{i}"


def assert_held_then_landed(figures: dict[str, Any], sqlstate: str) -> None:
    held, after = figures["while_held"], figures["after_fix"]
    assert held["unacked"] == MESSAGES, "nothing may be acknowledged while the batch is held"
    assert held["rows"] == 0 and held["dead_letters"] == 0
    assert not held["ready"]
    assert held["readyz"].startswith("batch held ([" + sqlstate), held["readyz"]
    assert held["batch_held_metric"] == 1
    assert after == {**after, "rows": MESSAGES, "dead_letters": 0, "ready": True}


TRIGGER = [
    "CREATE FUNCTION refuse_all() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'maintenance window: no writes'; END $$",
    "CREATE TRIGGER operator_guard BEFORE INSERT ON telemetry "
    "FOR EACH ROW EXECUTE FUNCTION refuse_all()",
]
CHECK = "ALTER TABLE telemetry ADD CONSTRAINT operator_small_ids CHECK (device_id < 1000)"

# (figures name, SQLSTATE, table, statements breaking it, statements fixing it; {role} = writer)
FAULTS = {
    "privilege_revoked": (
        "42501",
        "device_messages",
        ["REVOKE INSERT ON device_messages_recent FROM {role}"],
        ["GRANT INSERT ON device_messages_recent TO {role}"],
    ),
    "trigger_p0001": ("P0001", "telemetry", TRIGGER, ["DROP TRIGGER operator_guard ON telemetry"]),
    "check_23514": (
        "23514",
        "telemetry",
        [CHECK],
        ["ALTER TABLE telemetry DROP CONSTRAINT operator_small_ids"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_an_environment_error_holds_the_batch_and_everything_lands_after_the_fix(
    broker: MosquittoBroker, owner: AsyncEngine, writer_url: str, schema_name: str, fault: str
) -> None:
    """A least-privilege role losing INSERT, an operator's trigger, an operator's CHECK."""
    sqlstate, table, break_it, fix_it = FAULTS[fault]
    role = writer_url.split("://", 1)[1].split("@", 1)[0]
    settings = settings_for(broker.url, writer_url, schema_name, migrate=False)
    topic = device_topic if table == "device_messages" else telemetry_topic
    figures = await held_then_released(
        owner,
        settings,
        broker,
        topic,
        lambda i: {"timestamp": TS + i, "seq": i},
        table,
        [sql.format(role=role) for sql in break_it],
        [sql.format(role=role) for sql in fix_it],
    )
    record_figures(f"environment_{fault}", figures)
    assert_held_then_landed(figures, sqlstate)


# --------------------------------------------------------------------------------------------
# The store alone: splitting by halves


def telemetry_plan(count: int, bad: set[int] = frozenset()) -> WritePlan:  # type: ignore[assignment]
    """``count`` telemetry updates; those in ``bad`` carry a value jsonb refuses (22P02)."""
    plan = WritePlan()
    for i in range(count):
        value = "{not json" if i in bad else str(i)
        plan.add(TelemetryUpdate(1, f"p{i:06d}", value, TS, TS))
    return plan


async def test_one_refused_row_in_a_thousand_is_found_by_halving_not_a_savepoint_per_row(
    owner: AsyncEngine,
) -> None:
    result = await Store(owner).write(telemetry_plan(1000, bad={637}))
    assert result.rows[("telemetry", "upsert")] == 999
    assert result.dead_letters == {"database_rejected": 1}
    # 1000 -> 500 -> 250 -> ... -> 1: one split per level, about log2(1000).
    assert result.splits <= 10
    rows = await query(owner, "SELECT reason, detail FROM dead_letters")
    assert rows[0][0] == "database_rejected" and rows[0][1].startswith("[22P02]")


async def test_a_value_out_of_bigint_range_is_content_and_fails_alone(owner: AsyncEngine) -> None:
    plan = WritePlan()
    for device_id, digest in ((2**70, b"d" * 16), (7, b"e" * 16)):
        plan.add(DeviceMessage(device_id, TS, None, None, "{}", digest, TS))
    result = await Store(owner).write(plan)
    assert result.dead_letters == {"database_rejected": 1}
    assert result.rows[("device_messages", "append")] == 1


async def test_statement_timeout_splits_the_batch_until_the_parts_pass(
    database: TestDatabase, owner: AsyncEngine, writer_url: str, schema_name: str
) -> None:
    role = writer_url.split("://", 1)[1].split("@", 1)[0]
    await admin(owner, f"ALTER ROLE {role} SET statement_timeout = '40ms'")
    engine = create_engine(writer_url, schema_name)
    store = Store(engine)
    plan = telemetry_plan(20_000)
    attempts, splits = 0, 0
    try:
        while True:  # as the pipeline does: a part that fails alone is held and retried
            attempts += 1
            try:
                result = await store.write(plan)
                break
            except DatabaseUnavailable as exc:
                assert exc.detail.startswith("[57014]")
                assert attempts < 20
    finally:
        await engine.dispose()
    splits = result.splits
    record_figures(
        "statement_timeout_40ms", {"records": 20_000, "attempts": attempts, "splits": splits}
    )
    assert splits > 0, "a 20,000-row upsert should not fit in 40 ms"
    assert result.rows[("telemetry", "upsert")] == 20_000
    assert not result.dead_letters
    assert (await query(owner, "SELECT count(*) FROM telemetry"))[0][0] == 20_000


async def test_an_environment_error_on_one_row_holds_the_whole_batch(owner: AsyncEngine) -> None:
    await admin(
        owner,
        "ALTER TABLE telemetry ADD CONSTRAINT operator_names CHECK (name <> 'p000500')",
    )
    with pytest.raises(DatabaseUnavailable) as held:
        await Store(owner).write(telemetry_plan(1000))
    assert held.value.held and held.value.detail.startswith("[23514]")
    assert (await query(owner, "SELECT count(*) FROM telemetry"))[0][0] == 0
    assert (await query(owner, "SELECT count(*) FROM dead_letters"))[0][0] == 0


@pytest.mark.parametrize(
    ("sqlstate", "failure"),
    [
        ("22P02", Failure.CONTENT),
        ("22P05", Failure.CONTENT),
        ("22003", Failure.CONTENT),
        ("22021", Failure.CONTENT),
        ("54000", Failure.CONTENT),
        ("57014", Failure.SIZE),
        ("53200", Failure.SIZE),
        ("08006", Failure.SIZE),
        ("25P02", Failure.SIZE),
        ("42501", Failure.HELD),
        ("42P01", Failure.HELD),
        ("P0001", Failure.HELD),
        ("23514", Failure.HELD),
        ("40P01", Failure.HELD),
    ],
)
def test_errors_are_classified_by_sqlstate(sqlstate: str, failure: Failure) -> None:
    error = Exception("refused")
    error.sqlstate = sqlstate  # type: ignore[attr-defined]
    assert classify(error) is failure


@pytest.mark.parametrize(
    "bug",
    [
        CommandError("Can't locate revision identified by '0099'"),
        CompileError("no literal value renderer"),
        KeyError("telemetry.upsert"),
    ],
)
def test_a_bug_is_not_an_outage(bug: Exception) -> None:
    assert not is_retryable(bug)


@pytest.mark.parametrize(
    "outage",
    [ConnectionRefusedError(111, "refused"), TimeoutError(), OSError(104, "reset by peer")],
)
def test_an_unreachable_database_is_an_outage(outage: Exception) -> None:
    assert is_retryable(outage)


async def test_a_migration_bug_crashes_instead_of_being_retried(
    broker: MosquittoBroker, database: TestDatabase, owner: AsyncEngine, schema_name: str
) -> None:
    """A database stamped with a revision this code does not know: alembic's CommandError."""
    await admin(owner, "UPDATE alembic_version SET version_num = '0099'")
    settings = settings_for(broker.url, database.url, schema_name)
    engine = create_engine(database.url, schema_name)
    try:
        with pytest.raises(CommandError):
            await asyncio.wait_for(Mirror(settings, engine).prepare_database(), 10)
    finally:
        await engine.dispose()


async def test_a_command_timeout_splits_the_batch_in_new_transactions_until_parts_pass(
    database: TestDatabase, owner: AsyncEngine, schema_name: str
) -> None:
    """The client's command_timeout (asyncpg cancels the statement): 2 ms per row makes 200 rows
    take 0.4 s, over a 0.15 s timeout; parts of 25 rows pass."""
    await admin(
        owner,
        "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(0.002); RETURN NEW; END $$",
        "CREATE TRIGGER slow BEFORE INSERT ON telemetry FOR EACH ROW EXECUTE FUNCTION slow_row()",
    )

    async def connect() -> Any:
        return await asyncpg.connect(
            **asyncpg_connect_kwargs(database.url),
            server_settings={"search_path": schema_name},
            command_timeout=0.15,
        )

    engine = create_async_engine("postgresql+asyncpg://", async_creator=connect)
    store = Store(engine)
    try:
        result = await store.write(telemetry_plan(200))
    finally:
        await engine.dispose()
    assert result.rows[("telemetry", "upsert")] == 200 and not result.dead_letters
    assert store.part_limit is not None and store.part_limit < 200
    assert (await query(owner, "SELECT count(*) FROM telemetry"))[0][0] == 200


# --------------------------------------------------------------------------------------------
# One record too slow to write: set aside, the rest flows (issue 18 item 1)

SLOW_ONE = [
    "CREATE FUNCTION slow_poison() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN IF NEW.name = 'poison' THEN PERFORM pg_sleep(3); END IF; RETURN NEW; END $$",
    "CREATE TRIGGER slow_poison BEFORE INSERT OR UPDATE ON telemetry "
    "FOR EACH ROW EXECUTE FUNCTION slow_poison()",
]


async def test_a_record_that_times_out_alone_is_set_aside_and_the_rest_is_written(
    owner: AsyncEngine, writer_url: str, schema_name: str
) -> None:
    role = writer_url.split("://", 1)[1].split("@", 1)[0]
    await admin(owner, *SLOW_ONE, f"ALTER ROLE {role} SET statement_timeout = '300ms'")
    plan = telemetry_plan(64)
    plan.add(TelemetryUpdate(2, "poison", "1", TS, TS))
    engine = create_engine(writer_url, schema_name)
    try:
        with pytest.raises(DatabaseUnavailable):  # other callers (backfill, replay) still hold
            await Store(engine).write(plan)
        result = await Store(engine).write(plan, set_aside=True)
    finally:
        await engine.dispose()
    assert result.rows[("telemetry", "upsert")] == 64
    [(record, detail)] = result.set_aside
    assert record.name == "poison" and detail.startswith("[57014]")
    assert (await query(owner, "SELECT count(*) FROM telemetry"))[0][0] == 64


@pytest.mark.slow
async def test_one_record_that_times_out_alone_waits_aside_while_the_stream_flows(
    broker: MosquittoBroker, owner: AsyncEngine, writer_url: str, schema_name: str
) -> None:
    """Before: the batch was held and retried without end, and nothing after it committed."""
    role = writer_url.split("://", 1)[1].split("@", 1)[0]
    await admin(owner, *SLOW_ONE, f"ALTER ROLE {role} SET statement_timeout = '300ms'")
    settings = settings_for(broker.url, writer_url, schema_name, migrate=False)
    written = metrics.REGISTRY.get_sample_value(
        "flespi_mirror_set_aside_total", {"outcome": "written"}
    ) or 0.0
    async with running_mirror(settings) as running:
        mirror = running.mirror
        with publisher(broker.url) as pub:
            pub.publish("flespi/state/gw/devices/7/telemetry/poison", 1, TS)
            for i in range(MESSAGES):
                pub.publish(telemetry_topic(i), i, TS + i)
        deadline = time.monotonic() + 30
        while (await query(owner, "SELECT count(*) FROM telemetry"))[0][0] < MESSAGES:
            assert time.monotonic() < deadline, "the stream stopped behind one slow record"
            await asyncio.sleep(0.1)
        while mirror.source.unacked != 1 or not mirror.health.set_aside:
            assert time.monotonic() < deadline, (mirror.source.unacked, mirror.health)
            await asyncio.sleep(0.05)
        assert not mirror.health.ready
        assert any(r.startswith("set aside: 1 records") for r in mirror.health.not_ready_reasons())
        assert metrics.REGISTRY.get_sample_value("flespi_mirror_set_aside_records") == 1
        # the cause goes away: the record is written on a retry and acknowledged
        await admin(owner, "DROP TRIGGER slow_poison ON telemetry")
        while mirror.source.unacked or mirror.health.set_aside:
            assert time.monotonic() < deadline + 30, (mirror.source.unacked, mirror.health)
            await asyncio.sleep(0.1)
        assert mirror.health.ready
    rows = await query(owner, "SELECT value::text FROM telemetry WHERE name = 'poison'")
    assert rows == [("1",)]
    assert (await query(owner, "SELECT count(*) FROM dead_letters"))[0][0] == 0
    assert metrics.REGISTRY.get_sample_value(
        "flespi_mirror_set_aside_total", {"outcome": "written"}
    ) == written + 1
