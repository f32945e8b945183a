"""Fixtures: a real Mosquitto per test and one fresh PostgreSQL database per test session.

Each test gets its own PostgreSQL schema inside the session's database (the mirror's --schema
option), so tests never see each other's rows and no test needs to clean up.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from mirror.sim.rest_responder import AccountRecord, RestResponder
from mirror.store import partitions
from mirror.store.database import create_engine, migrate
from tests.launchers import MosquittoBroker, TestDatabase, fresh_database


@pytest.fixture(scope="session")
def database() -> Iterator[TestDatabase]:
    with fresh_database() as db:
        yield db


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    b = MosquittoBroker().start()
    try:
        yield b
    finally:
        b.cleanup()


@pytest.fixture
def schema_name() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def record() -> AccountRecord:
    """The simulated flespi account's record (empty; a module may fill its own)."""
    return AccountRecord()


@pytest.fixture
def responder(broker: MosquittoBroker, record: AccountRecord) -> Iterator[RestResponder]:
    """The simulator's flespi REST API over MQTT, answering from ``record``."""
    responder = RestResponder(broker.url, record).start()
    try:
        yield responder
    finally:
        responder.stop()


@pytest.fixture
async def engine(database: TestDatabase, schema_name: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the test's schema, migrated, with today's partitions made."""
    engine = create_engine(database.url, schema_name)
    await migrate(engine, schema_name)
    await partitions.maintain(engine)
    yield engine
    await engine.dispose()
