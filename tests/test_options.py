"""Options are declared once (mirror/ops/options.py); flags, --help, docs and workers derive."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mirror.cli import build_parser, settings_from
from mirror.ops.config import ConfigError, Secret, Settings
from mirror.ops.options import (
    OPTIONS,
    SHARED_TABLE,
    SHARING_COMMANDS,
    environment,
    markdown_table,
    options_for,
    resolve,
)
from mirror.workers import worker_command
from tests.helpers import ROOT


def values_for(argv: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    args = build_parser().parse_args(argv)
    return resolve(args.command, args, env or {})


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mirror.cli", *args], cwd=cwd, capture_output=True, text=True,
        timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **(env or {})},
    )  # fmt: skip


CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()


def documented_table(name: str) -> str:
    block = re.search(
        rf"<!-- options:{name} -->\n(.*?)\n<!-- /options:{name} -->", CONFIGURATION, re.DOTALL
    )
    assert block, f"docs/configuration.md has no options:{name} block"
    return block.group(1)


def documented_flags(name: str) -> list[str]:
    """The first flag of each row of a documented option table."""
    return re.findall(r"^\| `(--[\w-]+)`", documented_table(name), re.MULTILINE)


@pytest.mark.parametrize("table", [SHARED_TABLE, *SHARING_COMMANDS, "simulate"])
def test_documented_option_table_is_the_declarations(table):
    assert documented_table(table) == markdown_table(table), (
        "docs/configuration.md's option table differs from mirror/ops/options.py: run "
        ".venv/bin/python scripts/update-option-tables.py"
    )


@pytest.mark.parametrize("command", [*SHARING_COMMANDS, "simulate"])
def test_every_option_of_a_command_is_documented_in_exactly_one_table(command):
    """run, backfill and reconcile: the shared table plus their own; simulate: its own."""
    shown = documented_flags(command)
    if command in SHARING_COMMANDS:
        shown += documented_flags(SHARED_TABLE)
    declared = [o.option_string for o in options_for(command) if not o.hidden]
    assert sorted(shown) == sorted(declared)


def test_the_shared_table_holds_what_run_backfill_and_reconcile_all_take():
    shared = set(documented_flags(SHARED_TABLE))
    assert {"--database-url", "--mqtt-url", "--token", "--schema", "--cid"} <= shared
    for command in SHARING_COMMANDS:
        assert not shared & set(documented_flags(command)), command


@pytest.mark.parametrize("command", ["run", "migrate", "simulate", "backfill", "reconcile"])
def test_every_flag_in_help_names_its_variable(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    help_text = " ".join(sub.format_help().split())
    for option in options_for(command):
        if option.hidden:
            continue
        assert option.option_string in help_text
        if option.variable:
            assert f"Env {option.variable}" in help_text, option.name


def test_declared_defaults_are_the_settings_defaults():
    values = values_for(["run"])
    assert settings_from(values) == Settings()


def test_every_settings_field_a_user_sets_is_declared():
    declared = {o.name for o in options_for("run")}
    internal = {
        "maintenance_interval",
        "partition_days_ahead",
        "snapshot_quiet",
        "compaction_interval",
        "compaction_pause",
        "compaction_defer",
    }
    assert {f.name for f in dataclasses.fields(Settings)} - declared == internal


SUPERVISOR_ARGS = (
    "run --mqtt-url mqtts://broker.example:8883 --schema fleet --log-level debug --log-format json "
    "--resync --batch-size 77 --max-unacked 900 --topic flespi/state/# --topic flespi/message/# "
    "--no-migrate --workers 3 --keepalive 17 --token-in-password --ca-file /ca.pem "
    "--retention-days 9 --metrics-port 0"
)


def test_a_worker_gets_every_option_of_its_supervisor():
    secrets = {"FLESPI_TOKEN": "tok", "MIRROR_DATABASE_URL": "postgresql://u:pw@db/x"}
    supervisor = settings_from(values_for(SUPERVISOR_ARGS.split(), secrets))
    argv, env = worker_command(supervisor, 1)
    assert "tok" not in " ".join(argv) and "pw" not in " ".join(argv)
    worker = settings_from(values_for(argv[argv.index("run") :], env))
    expected = dataclasses.replace(
        supervisor,
        client_id=f"{supervisor.effective_client_id()}-w1",
        share_group=supervisor.effective_client_id(),
        migrate=False,
        workers=1,
        worker=True,
    )
    assert worker == expected
    # A restarted worker does not ask for the whole retained state again.
    _, env = worker_command(supervisor, 1, restarted=True)
    assert settings_from(values_for(["run", "--worker"], env)).resync is False


def test_flag_beats_variable_beats_file_beats_dotenv(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    dotenv = tmp_path / ".env"
    dotenv.write_text("FLESPI_TOKEN=from-dotenv\nMIRROR_SCHEMA=dotenv_schema\n")
    env = environment(dotenv, {"FLESPI_TOKEN_FILE": str(token_file)})
    assert env["FLESPI_TOKEN"] == "from-dotenv"  # .env fills what the environment lacks
    assert values_for(["run"], {"FLESPI_TOKEN_FILE": str(token_file)})["token"] == Secret(
        "from-file"
    )
    assert values_for(["run"], {**env, "FLESPI_TOKEN": "from-env"})["token"] == Secret("from-env")
    assert values_for(["run", "--token-file", str(token_file)], env)["token"] == Secret("from-file")
    assert values_for(["run", "--token", "flag"], env)["token"] == Secret("flag")
    assert environment(dotenv, {"MIRROR_SCHEMA": "s"})["MIRROR_SCHEMA"] == "s"


def test_a_bad_value_names_its_variable():
    with pytest.raises(ConfigError, match=r"^MIRROR_BATCH_SIZE='many': expected a whole number"):
        values_for(["run"], {"MIRROR_BATCH_SIZE": "many"})
    with pytest.raises(ConfigError, match=r"^--batch-size='many'"):
        values_for(["run", "--batch-size", "many"])
    with pytest.raises(ConfigError, match=r"FLESPI_TOKEN_FILE /nonexistent: cannot read it"):
        values_for(["run"], {"FLESPI_TOKEN_FILE": "/nonexistent"})


def test_a_bad_variable_is_one_line_naming_it_and_exits_2():
    result = cli("run", env={"MIRROR_BATCH_SIZE": "many"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "MIRROR_BATCH_SIZE='many': expected a whole number" in lines[0]


def test_a_configuration_error_is_one_json_object_with_log_format_json():
    result = cli("run", "--log-format", "json", env={"MIRROR_BATCH_SIZE": "0"})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "critical"
    assert "--batch-size / MIRROR_BATCH_SIZE: must be positive" in entry["message"]


def test_dotenv_in_the_working_directory_is_read(tmp_path):
    (tmp_path / ".env").write_text("MIRROR_SCHEMA=123abc\n")
    result = cli("migrate", cwd=tmp_path)
    assert result.returncode == 2
    assert "--schema / MIRROR_SCHEMA: '123abc'" in result.stderr


def test_every_option_name_is_declared_once_per_command():
    for command in ("run", "migrate", "simulate"):
        names = [o.name for o in options_for(command)]
        assert len(names) == len(set(names)), command
    assert all(o.help or o.hidden for o in OPTIONS)


def test_json_log_lines_carry_milliseconds():
    from mirror.cli import JsonFormatter

    record = logging.LogRecord("mirror", logging.INFO, __file__, 1, "hello", None, None)
    record.created = 1_731_990_000.125
    entry = json.loads(JsonFormatter().format(record))
    assert entry["time"] == "2024-11-19T04:20:00.125+00:00"


def test_a_schema_starting_with_a_digit_says_why():
    with pytest.raises(ConfigError, match="must start with a letter or '_'"):
        Settings(schema="123abc")


def test_run_against_flespi_without_a_token_says_so_at_once():
    started = time.monotonic()
    result = cli("run", env={"MIRROR_DATABASE_URL": "postgresql://x@127.0.0.1:1/x"})
    assert result.returncode == 2 and time.monotonic() - started < 30
    assert "mqtt.flespi.io needs a flespi token" in result.stderr
    assert "--token-file" in result.stderr


def test_simulate_prints_the_broker_it_publishes_to(broker):
    result = cli("simulate", "--mqtt-url", broker.url, "--duration", "0", "--no-snapshot")
    assert result.returncode == 0, result.stderr
    assert f"to {broker.url}" in result.stdout and f"to {broker.url}" in result.stderr


def test_cid_is_a_repeatable_flag_and_a_comma_separated_variable():
    assert settings_from(values_for(["run", "--cid", "7", "--cid", "42"])).cids == ("7", "42")
    assert settings_from(values_for(["run"], {"MIRROR_CIDS": "7, 42"})).cids == ("7", "42")
    assert cli("run", "--cid", "x").returncode == 2
