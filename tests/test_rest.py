"""The REST-over-MQTT client against the simulator's flespi responder on a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mirror.ops import metrics
from mirror.ops.config import Settings
from mirror.repair.rest import RestClient, RestError, RestOptions, RestTimeout, assemble
from mirror.repair.rest_carrier import standalone_rest_client
from mirror.sim.rest_responder import AccountRecord, RestResponder
from mirror.sim.traffic import GHOST_DEVICE_ID
from tests.helpers import ROOT, wait_for_log
from tests.launchers import MosquittoBroker
from tests.test_simulate import Subscriber

DEVICE = 1_000_001


def _message(ts: float, n: int) -> bytes:
    body = {"ident": "35000001", "timestamp": ts, "device.id": DEVICE, "n": n, "pad": "x" * 40}
    return json.dumps(body, separators=(",", ":")).encode()


@pytest.fixture
def record() -> AccountRecord:
    record = AccountRecord()
    device = json.dumps({"id": DEVICE, "name": "truck-1"}).encode()
    record.observe(f"flespi/state/gw/devices/{DEVICE}", device, 1_700_000_000.0)
    for n in range(300):
        ts = 1_700_000_000.0 + n + 0.123456
        record.observe(f"flespi/message/gw/devices/{DEVICE}", _message(ts, n), ts)
    return record


def _options(**changes: object) -> RestOptions:
    values: dict[str, object] = {"timeout": 5.0, "attempts": 3, "backoff": 0.05}
    values.update(changes)
    return RestOptions(**values)  # type: ignore[arg-type]


def _client(
    broker: MosquittoBroker, options: RestOptions
) -> contextlib.AbstractAsyncContextManager[RestClient]:
    settings = Settings(mqtt_url=broker.url, client_id="rest-test")
    return standalone_rest_client(settings, options)


def _count(outcome: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "flespi_mirror_rest_requests_total", {"outcome": outcome}
    )
    return value or 0.0


async def test_a_get_returns_the_result_list_matched_by_correlation(
    broker: MosquittoBroker, responder: RestResponder
) -> None:
    async with _client(broker, _options()) as rest:
        devices = await rest.get("gw/devices/all")
        page = await rest.get(
            f"gw/devices/{DEVICE}/messages",
            {"from": 1_700_000_010, "to": 1_700_000_019.5, "count": 5},
        )
    assert [d["id"] for d in devices] == [DEVICE]
    assert [m["n"] for m in page] == [10, 11, 12, 13, 14]


async def test_a_chunked_answer_is_reassembled_from_many_pieces(
    broker: MosquittoBroker, responder: RestResponder, record: AccountRecord
) -> None:
    responder.behaviour.chunk_bytes = 100  # a 300-message page is ~30 kB: hundreds of chunks
    async with _client(broker, _options()) as rest:
        page = await rest.get(f"gw/devices/{DEVICE}/messages", {"from": 0, "to": 2e9})
    assert [m["n"] for m in page] == list(range(300))
    assert responder.requests == 1


async def test_an_error_answer_fails_at_once_with_its_code_and_reason(
    broker: MosquittoBroker, responder: RestResponder
) -> None:
    responder.behaviour.error_code = 403
    before = _count("error")
    async with _client(broker, _options()) as rest:
        with pytest.raises(RestError) as caught:
            await rest.get("gw/devices/all")
    assert caught.value.http_code == 403
    assert "simulated failure" in str(caught.value)
    assert caught.value.attempts == 1  # a 4xx is not retried
    assert responder.requests == 1
    assert _count("error") == before + 1


async def test_server_errors_are_retried_with_backoff_until_answered(
    broker: MosquittoBroker, responder: RestResponder
) -> None:
    responder.behaviour.error_code = 503
    responder.behaviour.errors_left = 2
    retried = _count("retried")
    async with _client(broker, _options(attempts=4)) as rest:
        devices = await rest.get("gw/devices/all")
    assert [d["id"] for d in devices] == [DEVICE]
    assert responder.requests == 3
    assert _count("retried") == retried + 2


async def test_a_flespi_that_never_answers_times_out_after_every_attempt(
    broker: MosquittoBroker, responder: RestResponder
) -> None:
    responder.behaviour.silent = True
    before = _count("timeout")
    async with _client(broker, _options(timeout=0.3, attempts=2)) as rest:
        with pytest.raises(RestTimeout) as caught:
            await rest.get("gw/devices/all")
    assert caught.value.attempts == 2
    assert responder.requests == 2
    assert _count("timeout") == before + 1


async def test_a_slow_answer_within_the_timeout_is_taken_and_a_late_one_ignored(
    broker: MosquittoBroker, responder: RestResponder
) -> None:
    responder.behaviour.delay = 0.6
    async with _client(broker, _options(timeout=3.0)) as rest:
        assert [d["id"] for d in await rest.get("gw/devices/all")] == [DEVICE]
    async with _client(broker, _options(timeout=0.2, attempts=3)) as rest:
        with pytest.raises(RestTimeout):
            await rest.get("gw/devices/all")  # each answer arrives after its attempt gave up
    assert responder.requests == 4


async def test_requests_in_flight_never_exceed_the_concurrency(
    broker: MosquittoBroker, responder: RestResponder
) -> None:
    responder.behaviour.delay = 0.2
    seen: list[float] = []
    async with _client(broker, _options(concurrency=2)) as rest:
        publish = rest._publish

        async def counting(topic: str, payload: bytes, properties: object) -> None:
            seen.append(metrics.REGISTRY.get_sample_value("flespi_mirror_rest_requests_in_flight"))
            await publish(topic, payload, properties)  # type: ignore[arg-type]

        rest._publish = counting  # type: ignore[assignment]
        pages = await asyncio.gather(*(rest.get("gw/devices/all") for _ in range(6)))
    assert len(pages) == 6 and all(p for p in pages)
    assert len(seen) == 6 and max(seen) <= 2


def test_chunks_that_are_pieces_of_one_body_are_joined() -> None:
    body = json.dumps({"result": [{"id": 1}, {"id": 2}]}).encode()
    response = assemble([body[:7], body[7:20], body[20:]], 200)
    assert response.result == [{"id": 1}, {"id": 2}]


def test_chunks_that_are_envelopes_each_are_concatenated() -> None:
    chunks = [b'{"result":[{"id":1}]}', b'{"result":[{"id":2},{"id":3}]}']
    response = assemble(chunks, 200)
    assert [r["id"] for r in response.result] == [1, 2, 3]


def test_an_error_envelope_without_http_code_counts_as_an_error() -> None:
    response = assemble([b'{"errors":[{"code":7,"reason":"no such device"}]}'], None)
    assert response.http_code == 400
    assert response.error_reason == "no such device"


async def test_simulate_answers_rest_with_every_message_it_published(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    # '#': the simulator also uses the older topic that carries the device name
    witness = Subscriber(broker.url, "flespi/message/gw/devices/#")
    command = [
        sys.executable, "-m", "mirror.cli", "simulate", "--mqtt-url", broker.url,
        "--devices", "3", "--rate", "0", "--duration", "1", "--answer-rest",
    ]
    log = (tmp_path / "simulate.log").open("w+")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_log(tmp_path / "simulate.log", "answering REST over MQTT")
        seen = -1
        while seen != len(witness.messages):  # the witness's last deliveries may trail a little
            seen = len(witness.messages)
            await asyncio.sleep(0.3)
        published: dict[int, set[bytes]] = {}
        for message in witness.messages:
            device = int(message.topic.split("/")[4])
            published.setdefault(device, set()).add(message.payload)
        assert published, "the simulator published no device messages"
        async with _client(broker, _options()) as rest:
            devices = await rest.get("gw/devices/all")
            answered = {
                d: {
                    json.dumps(m, separators=(",", ":")).encode()
                    for m in await rest.get(f"gw/devices/{d}/messages", {"from": 0, "to": 2e9})
                }
                for d in published
            }
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(10)
        witness.close()
    # the fleet, and perhaps the one device a "removal" event creates and deletes again: the
    # one-second run may end between the two, and then the account holds it (as flespi would)
    fleet = {d["id"] for d in devices if d["id"] < GHOST_DEVICE_ID}
    assert len(fleet) == 3
    assert all(d["name"] == "temporary" for d in devices if d["id"] >= GHOST_DEVICE_ID)
    assert answered == published
