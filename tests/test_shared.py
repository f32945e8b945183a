"""Scale-out: members of one MQTT 5 shared subscription group, and the retained snapshot."""

from __future__ import annotations

import asyncio
import contextlib

from mirror.snapshot import marker_name
from tests.helpers import Publisher, query, running_mirror, settings_for, settle

BASE_TS = 1_731_990_000.0


def member(broker, database, schema, name: str, **overrides):
    return settings_for(
        broker.url,
        database.url,
        schema,
        client_id=f"{schema}-{name}",
        share_group="mirror",
        snapshot_quiet=0.5,
        **overrides,
    )


async def wait_until(predicate, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


async def test_a_shared_member_gets_the_retained_state_through_an_elected_snapshot(
    broker, database, schema_name
):
    pub = Publisher(broker.url)
    for device in range(50):
        for param in ("a", "b"):
            pub.publish(
                f"flespi/state/gw/devices/{device}/telemetry/{param}", device, BASE_TS, retain=True
            )
    pub.close()
    async with running_mirror(member(broker, database, schema_name, "m1")) as running:
        mirror = running.mirror

        async def snapshot_done() -> bool:
            return mirror.snapshot is not None and mirror.snapshot.done.is_set()

        await wait_until(snapshot_done)
        await settle(running)
        assert mirror.snapshot.taken == 100
        assert await query(running.engine, "SELECT count(*) FROM telemetry") == [(100,)]
        marker = await query(
            running.engine,
            "SELECT value->>'retained_messages' FROM sync_state WHERE name = :n",
            n=marker_name("mirror"),
        )
        assert marker == [("100",)]
    # A second start finds the snapshot recorded and does not take it again.
    async with running_mirror(member(broker, database, schema_name, "m1")) as running:
        await wait_until(lambda: _done(running.mirror))
        assert running.mirror.snapshot.taken == 0


async def _done(mirror) -> bool:
    return mirror.snapshot is not None and mirror.snapshot.done.is_set()


async def test_members_split_live_traffic_and_newest_wins_while_members_leave_and_rejoin(
    broker, database, schema_name
):
    messages = 600
    last: dict[int, tuple[int, float]] = {}
    taken_by_second_before_leaving = 0
    stack = contextlib.AsyncExitStack()
    first = await stack.enter_async_context(
        running_mirror(member(broker, database, schema_name, "m1"))
    )
    second_cm = running_mirror(member(broker, database, schema_name, "m2"))
    second = await second_cm.__aenter__()
    try:
        pub = Publisher(broker.url)
        for i in range(messages):
            device = i % 10
            # Timestamps go backwards every third message: an out-of-order update per device.
            ts = BASE_TS + i - (5 if i % 3 == 0 else 0)
            pub.publish(f"flespi/state/gw/devices/{device}/telemetry/n", i, ts)
            if device not in last or ts >= last[device][1]:
                last[device] = (i, ts)
            pub.publish(
                f"flespi/message/gw/devices/{device}",
                {"timestamp": BASE_TS + i, "seq": i},
                BASE_TS + i,
            )
            if i == messages // 2:
                await settle(second)
                taken_by_second_before_leaving = second.mirror.committed_messages
                await second_cm.__aexit__(None, None, None)  # a member leaves mid-stream
                second = None
        pub.close()
        await settle(first)
        second_cm = running_mirror(member(broker, database, schema_name, "m2"))
        second = await second_cm.__aenter__()  # and rejoins: its session's queue is delivered
        await settle(second)
        await settle(first)
        engine = first.engine
        seqs = sorted(
            int(r[0]) for r in await query(engine, "SELECT payload->>'seq' FROM device_messages")
        )
        assert seqs == list(range(messages))
        state = dict(await query(engine, "SELECT device_id, value::int FROM telemetry"))
        assert state == {device: value for device, (value, _ts) in last.items()}
        # Both members took a share of the live traffic while both were in the group.
        assert first.mirror.committed_messages > 0
        assert taken_by_second_before_leaving > 0
    finally:
        if second is not None:
            await second_cm.__aexit__(None, None, None)
        await stack.aclose()
