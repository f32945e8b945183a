"""The command line: structured logs, clear configuration errors, version."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from tests.helpers import ROOT, daemon_process, stop_process, wait_for_log


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mirror.cli", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=60, env=env,
    )  # fmt: skip


def test_json_log_format_writes_one_json_object_per_line(broker, database, schema_name, tmp_path):
    log = tmp_path / "daemon.log"
    proc = daemon_process(
        broker.url, database.url, schema_name, "--log-format", "json", log_path=log
    )
    wait_for_log(log, "subscribed to")
    assert stop_process(proc, signal.SIGTERM) == 0
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any("subscribed to" in e["message"] for e in entries)
    # No per-message noise: a start and a stop are a handful of lines.
    assert len(entries) < 15


def test_plain_token_to_flespi_is_refused_with_a_clear_error():
    result = cli(
        "run",
        "--mqtt-url", "mqtt://mqtt.flespi.io:1883",
        "--database-url", "postgresql://nobody@127.0.0.1:1/none",
        "--token", "secret-token-value",
    )  # fmt: skip
    assert result.returncode == 2
    assert "refusing to send the flespi token in clear text" in result.stderr
    assert "secret-token-value" not in result.stderr + result.stdout


def test_bad_schema_name_is_refused():
    result = cli(
        "migrate", "--schema", "Robert'); DROP", "--database-url", "postgresql://x@127.0.0.1:1/x"
    )
    assert result.returncode == 2
    assert "--schema" in result.stderr


def test_version():
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("flespi-mirror 0.1.0")
