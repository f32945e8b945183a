"""The naive peer: the mirror a user would write in an afternoon, to compare the daemon against.

aiomqtt's per-message iterator, ``json.loads`` per message, one ``INSERT … ON CONFLICT DO
UPDATE`` per message through SQLAlchemy async (asyncpg) in autocommit mode, and aiomqtt's default
acknowledgement (paho acks each QoS 1 message as soon as it is received, before it is stored).
No batching, no backpressure, no dead letters. Its tables live in its own schema.

``python -m bench.naive --url URL --client-id ID --database-url URL --schema S --expect N``
prints one JSON line with the timings (the benchmark kills it if it stalls).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bench.workload import MIRROR_TOPICS

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS telemetry (
    device_id bigint NOT NULL, name text NOT NULL, value jsonb, ts double precision,
    PRIMARY KEY (device_id, name));
CREATE TABLE IF NOT EXISTS messages (
    device_id bigint NOT NULL, ts double precision NOT NULL, payload jsonb,
    PRIMARY KEY (device_id, ts));
"""

UPSERT_TELEMETRY = text(
    "INSERT INTO telemetry (device_id, name, value, ts) VALUES (:device_id, :name, :value, :ts) "
    "ON CONFLICT (device_id, name) DO UPDATE SET value = EXCLUDED.value, ts = EXCLUDED.ts"
)
INSERT_MESSAGE = text(
    "INSERT INTO messages (device_id, ts, payload) VALUES (:device_id, :ts, :payload) "
    "ON CONFLICT (device_id, ts) DO UPDATE SET payload = EXCLUDED.payload"
)


async def run(
    url: str, client_id: str, database_url: str, schema: str, expect: int
) -> dict[str, Any]:
    engine = create_async_engine(
        database_url.replace("postgresql://", "postgresql+asyncpg://", 1),
        connect_args={"server_settings": {"search_path": schema}},
    )
    async with engine.begin() as conn:
        await conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        for statement in SCHEMA_SQL.split(";"):
            if statement.strip():
                await conn.exec_driver_sql(statement)
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    state: dict[str, Any] = {"count": 0, "started": time.time()}
    client = aiomqtt.Client(
        host,
        int(port),
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=props,
        timeout=600,
    )
    async with engine.connect() as db, client:
        state["connected"] = time.time()
        db = await db.execution_options(isolation_level="AUTOCOMMIT")
        # The broker answers SUBSCRIBE only after the queued backlog: do not wait for it.
        subscribing = asyncio.create_task(
            client.subscribe([(t, 1) for t in MIRROR_TOPICS], timeout=600)
        )
        async for message in client.messages:
            props_in = dict(getattr(message.properties, "UserProperty", []) or [])
            ts = float(props_in.get("timestamp", time.time()))
            parts = message.topic.value.split("/")
            payload = message.payload
            value = json.loads(payload)  # type: ignore[arg-type]
            if parts[1] == "state" and parts[5] == "telemetry":
                await db.execute(
                    UPSERT_TELEMETRY,
                    {
                        "device_id": int(parts[4]),
                        "name": parts[6],
                        "value": json.dumps(value),
                        "ts": ts,
                    },
                )
            elif parts[1] == "message":
                await db.execute(
                    INSERT_MESSAGE,
                    {
                        "device_id": int(parts[4]),
                        "ts": float(value.get("timestamp", ts)),
                        "payload": json.dumps(value),
                    },
                )
            state["count"] += 1
            if state["count"] == 1:
                state["first"] = time.time()
            if state["count"] >= expect:
                state["last"] = time.time()
                break
        subscribing.cancel()
    await engine.dispose()
    if "last" not in state:
        state["error"] = f"only {state['count']} of {expect} messages stored"
    else:
        state["seconds"] = state["last"] - state["connected"]
        state["rate"] = expect / state["seconds"]
    return state


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--database-url", required=True)
    p.add_argument("--schema", required=True)
    p.add_argument("--expect", type=int, required=True)
    a = p.parse_args()
    result = asyncio.run(run(a.url, a.client_id, a.database_url, a.schema, a.expect))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
