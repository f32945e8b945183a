"""The services a scenario starts for itself: a Mosquitto (tests/launchers.py) and a PostgreSQL.

PostgreSQL is a private cluster of this machine's PostgreSQL binaries (``initdb`` + ``pg_ctl``) in
a temporary directory on a free port, so that a scenario measures against a server nobody else
is using (the machine's shared server on 5432 also runs other people's test suites), and so the
memory scenario can stop and restart it for a database outage. As root, the server runs as user
``postgres`` via ``runuser``. When no binaries are found, the scenario falls back to
:func:`tests.launchers.fresh_database` (the machine's server, or an embedded one) and says so; the
outage scenario then cannot run.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.launchers import MosquittoBroker, free_port, fresh_database


def _pg_bindir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists() and Path(candidate, "pg_ctl").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on 127.0.0.1 and a free port."""

    def __init__(self) -> None:
        bindir = _pg_bindir()
        if bindir is None:
            raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl) found")
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="bench-pg-"))
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # initdb refuses to run as root: run the server as the 'postgres' system user.
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self.as_user, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def init(self) -> PrivatePostgres:
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        return self.start()

    def start(self) -> PrivatePostgres:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options,
            "-l", str(self.root / "server.log"), "-w", "-t", "60", "start",
        )  # fmt: skip
        return self

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def create_database(self, name: str) -> str:
        _admin(self.admin_url, f'CREATE DATABASE "{name}"')
        return self.url(name)

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def _admin(url: str, sql: str) -> None:
    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


async def _fetch(url: str, sql: str) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


def fetch(url: str, sql: str) -> list[Any]:
    return asyncio.run(_fetch(url, sql))


class Services:
    """What one scenario runs against; ``postgres`` is None on the fallback database."""

    def __init__(self, broker: MosquittoBroker, database_url: str, postgres: PrivatePostgres | None,
                 note: str) -> None:  # fmt: skip
        self.broker = broker
        self.database_url = database_url
        self.postgres = postgres
        self.note = note


@contextlib.contextmanager
def services(need_private: bool = False) -> Iterator[Services]:
    """A fresh Mosquitto and a fresh database for one scenario, torn down afterwards."""
    broker = MosquittoBroker().start()
    try:
        postgres: PrivatePostgres | None = None
        try:
            postgres = PrivatePostgres().init()
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            if need_private:
                raise RuntimeError(f"this scenario needs a private PostgreSQL: {exc}") from exc
        if postgres is not None:
            try:
                name = f"bench_{uuid.uuid4().hex[:8]}"
                yield Services(broker, postgres.create_database(name), postgres,
                               f"private PostgreSQL ({postgres.bindir.parent.name})")  # fmt: skip
            finally:
                postgres.cleanup()
        else:
            with fresh_database("flespi_mirror_bench") as db:
                yield Services(broker, db.url, None, "shared PostgreSQL (fallback)")
    finally:
        broker.cleanup()
