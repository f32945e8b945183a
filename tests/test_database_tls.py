"""TLS to PostgreSQL with libpq's URL parameters, as managed services hand them out.

A private cluster (initdb) with ssl=on and an openssl-made certificate; over TCP it accepts only
TLS connections with a password (``hostssl ... scram-sha-256``, plain ``host`` rejected), so a
mirror that connects at all connected over TLS.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.helpers import ROOT, Publisher, daemon_process, stop_process, wait_for_log
from tests.launchers import PrivatePostgres, TestCertificates, _run_admin, make_test_certificates

PASSWORD = "s3cret-" + uuid.uuid4().hex[:8]


class TlsPostgres:
    def __init__(self, server: PrivatePostgres, certificates: TestCertificates) -> None:
        self.server = server
        self.certificates = certificates

    @property
    def admin_url(self) -> str:
        """Over the Unix socket (trusted), for setting up."""
        return f"postgresql://postgres@/postgres?host={self.server.workdir}&port={self.server.port}"

    def url(self, *, password: str = PASSWORD, query: str = "") -> str:
        ca = self.certificates.ca_file
        params = f"sslmode=verify-full&sslrootcert={ca}" + (f"&{query}" if query else "")
        return f"postgresql://mirror:{password}@127.0.0.1:{self.server.port}/fleet?{params}"


@pytest.fixture(scope="module")
def tls_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsPostgres]:
    certificates = make_test_certificates(
        tmp_path_factory.mktemp("pgtls"), hostnames=("localhost",), ips=("127.0.0.1",)
    )
    server = PrivatePostgres().init()
    data = server.datadir
    for source, name in (
        (certificates.cert_file, "server.crt"),
        (certificates.key_file, "server.key"),
    ):
        shutil.copy(source, data / name)
        shutil.chown(data / name, user=server.run_as)
        (data / name).chmod(0o600)
    (data / "pg_hba.conf").write_text(
        "local all all trust\n"
        "hostssl all all 127.0.0.1/32 scram-sha-256\n"
        "host all all 127.0.0.1/32 reject\n"
    )
    with (data / "postgresql.conf").open("a") as conf:
        conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
    server.start()
    tls = TlsPostgres(server, certificates)
    _run_admin(tls.admin_url, f"CREATE ROLE mirror LOGIN PASSWORD '{PASSWORD}'")
    _run_admin(tls.admin_url, "CREATE DATABASE fleet OWNER mirror")
    try:
        yield tls
    finally:
        server.cleanup()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mirror.cli", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_migrate_and_run_over_verified_tls_with_libpq_parameters(
    tls_postgres, broker, schema_name, tmp_path
):
    url = tls_postgres.url(query="application_name=fleet-mirror&connect_timeout=5")
    migrated = cli("migrate", "--schema", schema_name, "--database-url", url)
    assert migrated.returncode == 0, migrated.stderr
    log = tmp_path / "daemon.log"
    proc = daemon_process(broker.url, url, schema_name, log_path=log)
    try:
        wait_for_log(log, "subscribed to")
        Publisher(broker.url).publish(
            "flespi/state/gw/devices/9/telemetry/battery.level", 77, 1_731_990_000.0
        )
        deadline = time.monotonic() + 20
        while "77" not in _psql(tls_postgres, f"SELECT value FROM {schema_name}.telemetry"):
            assert time.monotonic() < deadline, "the telemetry row never arrived"
            time.sleep(0.2)
        sessions = _psql(
            tls_postgres,
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
            "WHERE a.application_name = 'fleet-mirror'",
        )
        assert sessions.split() and set(sessions.split()) == {"t"}, sessions
    finally:
        assert stop_process(proc, signal.SIGTERM) == 0
    assert PASSWORD not in log.read_text()


def test_a_password_in_the_query_is_used_and_never_shown(
    tls_postgres, broker, schema_name, tmp_path
):
    url = tls_postgres.url(password="", query=f"password={PASSWORD}").replace("mirror:@", "mirror@")
    log = tmp_path / "daemon.log"
    proc = daemon_process(broker.url, url, schema_name, log_path=log)
    try:
        wait_for_log(log, "subscribed to")
    finally:
        assert stop_process(proc, signal.SIGTERM) == 0
    text = log.read_text()
    assert "password=***" in text and PASSWORD not in text


def test_a_certificate_that_does_not_verify_stops_with_one_line(
    tls_postgres, tmp_path, schema_name
):
    stranger = make_test_certificates(tmp_path / "other", hostnames=("localhost",))
    url = tls_postgres.url().replace(str(tls_postgres.certificates.ca_file), str(stranger.ca_file))
    result = cli("run", "--mqtt-url", "mqtt://127.0.0.1:1", "--schema", schema_name,
                 "--database-url", url)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if "CRITICAL" in x]
    assert "certificate did not verify" in line and "sslrootcert" in line


def test_a_wrong_password_stops_with_one_line_without_it(tls_postgres, schema_name):
    result = cli("migrate", "--schema", schema_name, "--database-url",
                 tls_postgres.url(password="not-the-password"))  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "not-the-password" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if "CRITICAL" in x]
    assert "password authentication failed" in line and "--database-url" in line


def _psql(tls: TlsPostgres, sql: str) -> str:
    import asyncio

    import asyncpg

    async def go() -> str:
        conn = await asyncpg.connect(
            host=str(tls.server.workdir), port=tls.server.port, user="postgres", database="fleet"
        )
        try:
            return " ".join(str(v) for r in await conn.fetch(sql) for v in r.values())
        finally:
            await conn.close()

    return asyncio.run(go()).replace("True", "t").replace("False", "f")
