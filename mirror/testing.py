"""Real services for tests and benchmarks: a private Mosquitto and a fresh PostgreSQL database.

Tests and benchmarks talk to real processes, never mocks. Each broker gets its own port and a
config of ours: Debian's defaults cap a client's queue at 1000 messages and drop the rest
silently, which would hide exactly the losses the tests look for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_mosquitto() -> str:
    for candidate in MOSQUITTO_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    raise RuntimeError(
        "the 'mosquitto' broker binary is missing: run 'make test' (it installs Debian's package "
        "when it can) or install it yourself (apt-get install mosquitto)"
    )


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@dataclass
class MosquittoBroker:
    """A Mosquitto process of our own on 127.0.0.1 and a free port."""

    port: int = field(default_factory=free_port)
    persistence: bool = False
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mosq-")))
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            # Unlimited queues and in-flight windows: a test must never lose a message to a
            # broker limit it did not ask for.
            "max_queued_messages 0",
            "max_queued_bytes 0",
            "max_inflight_messages 0",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            f"log_dest file {self.workdir}/mosquitto.log",
            "log_type error",
            "log_type warning",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # As root Mosquitto drops to user 'mosquitto', who cannot write our private workdir.
            lines.append("user root")
        return "\n".join(lines) + "\n"

    def start(self) -> MosquittoBroker:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text())
        self.process = subprocess.Popen(
            [find_mosquitto(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port("127.0.0.1", self.port)
        except TimeoutError:
            self.stop()
            logfile = self.workdir / "mosquitto.log"
            log = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
            raise RuntimeError(f"mosquitto did not start on port {self.port}: {log}") from None
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# PostgreSQL


def local_postgres_url() -> str | None:
    """The machine's PostgreSQL when it answers, as a plain URL to its maintenance database."""
    explicit = os.environ.get("MIRROR_TEST_POSTGRES_URL")
    if explicit:
        return explicit
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            pass
    except OSError:
        return None
    user = os.environ.get("PGUSER", "postgres")
    return f"postgresql://{user}@127.0.0.1:5432/postgres"


def _with_database(url: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=database).render_as_string(hide_password=False)


def _run_admin(url: str, sql: str) -> None:
    """Run one statement on the maintenance database (CREATE/DROP DATABASE cannot run in a txn)."""
    import asyncio

    import asyncpg

    async def go() -> None:
        from mirror.config import asyncpg_connect_kwargs

        conn = await asyncpg.connect(**asyncpg_connect_kwargs(url))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


@dataclass
class TestDatabase:
    """A database created fresh for one test session, dropped afterwards."""

    __test__ = False  # not a pytest test class

    admin_url: str
    name: str
    embedded: object | None = None

    @property
    def url(self) -> str:
        return _with_database(self.admin_url, self.name)

    def drop(self) -> None:
        with contextlib.suppress(Exception):
            _run_admin(self.admin_url, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


@contextlib.contextmanager
def fresh_database(prefix: str = "flespi_mirror_test") -> Iterator[TestDatabase]:
    """A new, empty database on the machine's PostgreSQL, or on an embedded one if none runs."""
    admin = local_postgres_url()
    embedded = None
    if admin is None:
        from mirror.embedded import EmbeddedPostgres

        embedded = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="pg-")) / "data")
        admin = embedded.start()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    _run_admin(admin, f'CREATE DATABASE "{name}"')
    db = TestDatabase(admin_url=admin, name=name, embedded=embedded)
    try:
        yield db
    finally:
        db.drop()
        if embedded is not None:
            embedded.stop()
