"""The Grafana dashboards: well formed, every PromQL parses, every SQL runs on a mirrored database.

deploy/grafana/flespi-mirror-sre.json reads Prometheus, deploy/grafana/flespi-mirror-fleet.json
reads the mirror's PostgreSQL schema (tables and the devices/device_positions views, unqualified:
the datasource's role has search_path set to the mirror schema, as the daemon's connections do).
Grafana variables and macros are replaced by what Grafana would send before a query is checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from mirror.sim.simulate import SimulationOptions, run_simulation
from mirror.sim.traffic import FIRST_DEVICE_ID
from mirror.store.database import create_engine
from tests.helpers import (
    promtool,
    publisher,
    registry_series_names,
    running_mirror,
    settings_for,
    settle,
)
from tests.launchers import MosquittoBroker, TestDatabase

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
SRE = GRAFANA / "flespi-mirror-sre.json"
FLEET = GRAFANA / "flespi-mirror-fleet.json"

PROMETHEUS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
POSTGRES = {"type": "grafana-postgresql-datasource", "uid": "${DS_POSTGRES}"}
DATASOURCE_OF = {SRE: PROMETHEUS, FLEET: POSTGRES}

# What Grafana substitutes in PromQL before sending it.
PROMQL_VARIABLES = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "job": ".+",
    "instance": ".+",
}
STALE_DEVICE_ID = 2_000_001
DEVICE_ID = FIRST_DEVICE_ID + 1  # the simulator's first device: every opening event is its
AREA = "(-180,-90),(180,90)"  # the dashboard's default area: the whole world


def load(path: Path) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data (rows left out, panels of collapsed rows included)."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace $name and ${name}; fail on any variable left, so a new one is not missed."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"no test value for Grafana variable ${name} in {text!r}"
        return values[name]

    result = re.sub(r"\$\{(\w+)\}|\$(\w+)", one, text)
    return result


def metric_names_in(expr: str) -> set[str]:
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    pattern = r"\b(?:flespi_mirror_\w+|process_\w+|python_\w+|up)\b(?!\s*[(=!~])"
    return set(re.findall(pattern, without_strings))


def prometheus_queries() -> dict[str, str]:
    """Every PromQL of the SRE dashboard, variables substituted, by where it comes from."""
    dashboard = load(SRE)
    queries: dict[str, str] = {}
    for panel in panels(dashboard):
        for target in panel["targets"]:
            where = f"panel {panel['id']} ({panel['title']}) {target['refId']}"
            queries[where] = substitute(target["expr"], PROMQL_VARIABLES)
    for name, variable in variables(dashboard).items():
        if variable["type"] != "query":
            continue
        query = variable["query"]
        if isinstance(query, dict):
            query = query["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert match, f"variable {name}: only label_values(<selector>, <label>) is used"
        queries[f"variable {name}"] = substitute(match.group(1), PROMQL_VARIABLES)
    return queries


# ---------------------------------------------------------------------------------------------
# Shape of both dashboards


@pytest.mark.parametrize("path", [SRE, FLEET], ids=lambda p: p.name)
def test_dashboard_is_importable_json_with_a_datasource_variable(path: Path) -> None:
    dashboard = load(path)
    assert dashboard["uid"] == path.stem and dashboard["title"].startswith("flespi-mirror")
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert "id" not in dashboard or dashboard["id"] is None, "an exported id breaks imports"
    expected = DATASOURCE_OF[path]
    variable_name = expected["uid"].strip("${}")
    ds_variable = variables(dashboard)[variable_name]
    assert ds_variable["type"] == "datasource"
    assert ds_variable["query"] == expected["type"]
    nested = [child for p in dashboard["panels"] for child in p.get("panels", [])]
    ids = [p["id"] for p in (*dashboard["panels"], *nested)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    titles = [p["title"] for p in panels(dashboard)]
    assert len(titles) == len(set(titles)), "panel titles repeat"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


@pytest.mark.parametrize("path", [SRE, FLEET], ids=lambda p: p.name)
def test_every_panel_has_the_datasource_and_at_least_one_target(path: Path) -> None:
    expected = DATASOURCE_OF[path]
    dashboard = load(path)
    assert panels(dashboard)
    for panel in panels(dashboard):
        assert panel.get("datasource") == expected, panel["title"]
        assert panel.get("targets"), f"{panel['title']} has no query"
        assert panel.get("title") and panel.get("description"), panel["id"]
        for target in panel["targets"]:
            assert target.get("datasource", expected) == expected, panel["title"]
            query = target.get("expr") if expected is PROMETHEUS else target.get("rawSql")
            assert query and query.strip(), f"{panel['title']} {target['refId']} is empty"
    for variable in variables(dashboard).values():
        if variable["type"] == "query":
            assert variable["datasource"] == expected, variable["name"]


# ---------------------------------------------------------------------------------------------
# The SRE dashboard (Prometheus)


def test_sre_dashboard_shows_throughput_lag_errors_database_latency_and_unacked() -> None:
    used = set().union(*(metric_names_in(q) for q in prometheus_queries().values()))
    for series in (
        "flespi_mirror_messages_received_total",
        "flespi_mirror_rows_written_total",
        "flespi_mirror_lag_seconds_bucket",
        "flespi_mirror_dead_letters_total",
        "flespi_mirror_database_errors_total",
        "flespi_mirror_reconnects_total",
        "flespi_mirror_commit_duration_seconds_bucket",
        "flespi_mirror_batch_messages_sum",
        "flespi_mirror_unacked_messages",
        "flespi_mirror_ready",
        "flespi_mirror_mqtt_connected",
        "flespi_mirror_last_commit_timestamp_seconds",
        "flespi_mirror_build_info",
    ):
        assert series in used, f"no panel shows {series}"


def test_every_promql_expression_parses_with_promtool(tmp_path: Path) -> None:
    queries = prometheus_queries()
    rules = [
        {"record": f"dashboard:query_{n}:check", "expr": expr}
        for n, expr in enumerate(queries.values())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "sre-dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    if result.returncode != 0:
        listing = "\n".join(f"query_{n}: {w}" for n, w in enumerate(queries))
        pytest.fail(f"promtool rejects a dashboard query:\n{result.stderr}\n{listing}")
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_promql_uses_only_series_the_mirror_exports() -> None:
    known = registry_series_names()
    for where, expr in prometheus_queries().items():
        used = metric_names_in(expr)
        assert used, f"{where}: no metric of the mirror in {expr!r}"
        assert used <= known, f"{where}: unknown series {used - known}"


# ---------------------------------------------------------------------------------------------
# The fleet dashboard (PostgreSQL)


def _interval_seconds(text: str) -> int:
    match = re.fullmatch(r"'?(\d+)([smhd])'?", text.strip())
    assert match, f"unsupported interval {text!r}"
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def grafana_sql(raw: str, device_id: int, start: datetime, end: datetime) -> str:
    """The SQL Grafana's PostgreSQL datasource would send for this rawSql."""

    def time_filter(match: re.Match[str]) -> str:
        column = match.group(1).strip()
        return f"{column} BETWEEN '{start.isoformat()}' AND '{end.isoformat()}'"

    def time_group_alias(match: re.Match[str]) -> str:
        column, interval = (part.strip() for part in match.group(1).split(",", 1))
        seconds = _interval_seconds(interval)
        return (
            f'to_timestamp(floor(extract(epoch FROM {column}) / {seconds}) * {seconds}) AS "time"'
        )

    sql = re.sub(r"\$__timeFilter\(([^)]*)\)", time_filter, raw)
    sql = re.sub(r"\$__timeGroupAlias\(([^)]*)\)", time_group_alias, sql)
    sql = sql.replace("$__timeFrom()", f"'{start.isoformat()}'")
    sql = sql.replace("$__timeTo()", f"'{end.isoformat()}'")
    return substitute(sql, {"device": str(device_id), "area": AREA})


def sql_targets() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for panel in panels(load(FLEET)):
        for target in panel["targets"]:
            where = f"{panel['title']} {target['refId']}"
            assert where not in found, f"two queries are named {where}"
            found[where] = panel | {"target": target}
    return found


def test_fleet_dashboard_has_online_count_geomap_stale_table_and_one_device() -> None:
    dashboard = load(FLEET)
    by_title = {p["title"]: p for p in panels(dashboard)}
    online = by_title["Devices online"]
    assert online["type"] == "stat" and "connected" in online["targets"][0]["rawSql"]
    geomap = by_title["Last positions"]
    assert geomap["type"] == "geomap"
    position_sql = geomap["targets"][0]["rawSql"]
    assert "device_positions" in position_sql and "devices" in position_sql
    layer = geomap["options"]["layers"][0]
    assert layer["location"] == {"mode": "coords", "latitude": "latitude", "longitude": "longitude"}
    stale = by_title["Stale devices"]
    assert stale["type"] == "table" and "interval '1 hour'" in stale["targets"][0]["rawSql"]
    device = variables(dashboard)["device"]
    assert device["type"] == "query" and "FROM devices" in device["query"]
    per_device = [p for p in panels(dashboard) if "$device" in p["title"]]
    assert len(per_device) >= 2
    for panel in per_device:
        assert "device_id = $device" in panel["targets"][0]["rawSql"], panel["title"]
    for panel in panels(dashboard):
        sql = panel["targets"][0]["rawSql"]
        assert not re.search(r"\bflespi\.", sql), "tables are unqualified (search_path)"
        macros = set(re.findall(r"\$__\w+", sql))
        allowed = {"$__timeFilter", "$__timeGroupAlias", "$__timeFrom", "$__timeTo"}
        assert macros <= allowed, f"{panel['title']}: {macros}"


def test_fleet_dashboard_answers_the_fleet_questions_from_windows_and_summaries() -> None:
    """The six questions of docs/history.md each have a panel, and no panel reads a history
    view with a time condition (a view reads every packed hour of the device: the functions
    of the same name read only the window's)."""
    sql_of = {p["title"]: p["targets"][0]["rawSql"] for p in panels(load(FLEET))}
    assert "device_track($__timeFrom(), $__timeTo())" in sql_of["Track of $device"]
    assert "device_messages($__timeFrom(), $__timeTo())" in sql_of["Battery level of $device"]
    assert "FROM device_latest_messages" in sql_of["Latest message of every device"]
    assert "FROM device_days" in sql_of["Daily mileage"]
    assert "CAST('$area' AS box)" in sql_of["Devices inside $area during the last hour"]
    assert "FROM device_hours" in sql_of["Device messages per hour"]
    for title, sql in sql_of.items():
        views = re.findall(r"\b(?:device_messages|channel_messages|device_track)\b(?!\s*\()", sql)
        assert not views, f"{title} reads a history view: use the window function"


async def _rows(engine: AsyncEngine, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    async with engine.connect() as conn:
        result = await conn.exec_driver_sql(sql)
        return list(result.keys()), [tuple(row) for row in result.fetchall()]


async def _wait_for(engine: AsyncEngine, sql: str, minimum: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    count = None
    while time.monotonic() < deadline:
        count = (await _rows(engine, sql))[1][0][0]
        if count >= minimum:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{sql!r} stayed at {count}, expected at least {minimum}")


@contextlib.asynccontextmanager
async def grafana_reader(
    owner: AsyncEngine, database: TestDatabase, schema: str
) -> AsyncIterator[AsyncEngine]:
    """An engine logged in as a read-only role set up as docs/operations.md says: SELECT on the
    schema and search_path set on the role (the engine itself sets no search_path)."""
    role = f"grafana_{schema}"
    password = "grafana-test"
    async with owner.begin() as conn:
        for statement in (
            f"CREATE ROLE {role} LOGIN PASSWORD '{password}'",
            f'GRANT CONNECT ON DATABASE "{database.name}" TO {role}',
            f"GRANT USAGE ON SCHEMA {schema} TO {role}",
            f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}",
            f"ALTER ROLE {role} SET search_path = {schema}",
        ):
            await conn.exec_driver_sql(statement)
    url = make_url(database.url).set(username=role, password=password)
    reader = create_engine(url.render_as_string(hide_password=False), None)
    try:
        yield reader
    finally:
        await reader.dispose()
        async with owner.begin() as conn:
            await conn.exec_driver_sql(f"DROP OWNED BY {role}")
            await conn.exec_driver_sql(f"DROP ROLE {role}")


async def run_fleet_queries(
    owner: AsyncEngine, database: TestDatabase, schema: str
) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
    """Every SQL of the fleet dashboard, as Grafana's read-only role would run it."""
    async with grafana_reader(owner, database, schema) as reader:
        dashboard = load(FLEET)
        start = datetime.now(UTC) - timedelta(hours=6)
        end = datetime.now(UTC) + timedelta(minutes=5)

        device_query = variables(dashboard)["device"]["query"]
        columns, rows = await _rows(reader, grafana_sql(device_query, DEVICE_ID, start, end))
        assert columns == ["__value", "__text"]
        values = {row[0] for row in rows}
        assert {DEVICE_ID, STALE_DEVICE_ID} <= values
        assert any(text == f"parked-trailer ({STALE_DEVICE_ID})" for _, text in rows)

        results: dict[str, tuple[list[str], list[tuple[Any, ...]]]] = {}
        for where, panel in sql_targets().items():
            target = panel["target"]
            sql = grafana_sql(target["rawSql"], DEVICE_ID, start, end)
            try:
                results[where] = await _rows(reader, sql)
            except Exception as error:  # name the panel, then fail
                pytest.fail(f"{where}: {error}\n{sql}")
            columns, rows = results[where]
            assert rows, f"{where} returned no rows:\n{sql}"
            if target["format"] == "time_series":
                assert "time" in columns, f"{where}: a time series needs a 'time' column"
            if panel["type"] == "stat":
                assert len(rows) == 1 and rows[0][0] > 0, f"{where}: {rows}"
        with pytest.raises(DBAPIError, match="permission denied"):
            await _rows(reader, "DELETE FROM telemetry")
        return results


async def test_every_sql_query_returns_rows_from_a_mirrored_database(
    broker: MosquittoBroker, database: TestDatabase, schema_name: str
) -> None:
    settings = settings_for(broker.url, database.url, schema_name)
    async with running_mirror(settings) as running:
        options = SimulationOptions(
            mqtt_url=broker.url, devices=3, rate=0, duration=2, max_messages=300
        )
        report = await asyncio.to_thread(run_simulation, options)
        assert report.published > 300
        with publisher(broker.url) as pub:  # a parked trailer, silent for two hours
            now = time.time()
            pub.publish(
                f"flespi/state/gw/devices/{STALE_DEVICE_ID}",
                {
                    "id": STALE_DEVICE_ID,
                    "name": "parked-trailer",
                    "configuration": {"ident": "359999999999999"},
                    "connected": False,
                    "last_active": int(now - 7200),
                },
                ts=now,
                retain=True,
            )
        owner = running.engine
        await _wait_for(owner, "SELECT count(*) FROM devices", 4)
        await _wait_for(owner, "SELECT count(*) FROM device_positions", 3)
        await _wait_for(
            owner, f"SELECT count(*) FROM device_messages WHERE device_id = {DEVICE_ID}", 1
        )
        await settle(running)
        results = await run_fleet_queries(owner, database, schema_name)

    columns, rows = results["Last positions A"]
    positions = [dict(zip(columns, row, strict=True)) for row in rows]
    assert {p["device_id"] for p in positions} == {FIRST_DEVICE_ID + n for n in (1, 2, 3)}
    for p in positions:
        assert -90 <= p["latitude"] <= 90 and -180 <= p["longitude"] <= 180
        assert p["device"].split("-")[0] in {"truck", "van", "car"}

    columns, rows = results["Stale devices A"]
    stale = [dict(zip(columns, row, strict=True)) for row in rows]
    assert [s["device_id"] for s in stale] == [STALE_DEVICE_ID]
    assert stale[0]["name"] == "parked-trailer" and stale[0]["silent for"] > 7000

    columns, rows = results["Current telemetry of $device A"]
    telemetry = {row[0]: row[1] for row in rows}
    assert {"position.latitude", "position.longitude", "battery.level"} <= set(telemetry)

    columns, rows = results["Speed of $device A"]
    assert all(row[1] is not None for row in rows)

    simulated = {FIRST_DEVICE_ID + n for n in (1, 2, 3)}
    columns, rows = results["Track of $device A"]
    assert rows and all(-90 <= r[1] <= 90 and -180 <= r[2] <= 180 for r in rows)
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    columns, rows = results["Latest message of every device A"]
    assert {row[0] for row in rows} == simulated
    columns, rows = results["Daily mileage A"]
    assert {row[0] for row in rows} == simulated and all(row[5] > 0 for row in rows)
    columns, rows = results["Devices inside $area during the last hour A"]
    assert {row[0] for row in rows} == simulated
    columns, rows = results["Device messages per hour A"]
    hourly = sum(row[1] for row in rows)
    async with running.engine.connect() as conn:
        stored = await conn.exec_driver_sql(
            "SELECT count(*) FROM device_messages WHERE date_trunc('hour', ts, 'UTC') = ANY($1)",
            ([row[0] for row in rows],),
        )
    assert hourly == stored.scalar() > 0

    async with grafana_reader(running.engine, database, schema_name) as reader:
        for statement in readme_example_sql():  # README's examples, as the same reader
            try:
                await _rows(reader, statement)
            except Exception as error:
                pytest.fail(f"README's example SQL fails: {error}\n{statement}")


def readme_example_sql() -> list[str]:
    """The statements of README's "Example SQL" block."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Example SQL", 1)[1].split("```sql", 1)[1].split("```", 1)[0]
    code = "\n".join(line for line in block.splitlines() if not line.startswith("--"))
    statements = [s.strip() for s in code.split(";") if s.strip()]
    assert any("device_track(" in s for s in statements), "README lost its fleet questions"
    return statements
