"""Optional PostgreSQL extensions the mirror uses when a database has them.

PostGIS: the typed track (migration 0008) gains a ``geom`` column, a GiST index on the recent
rows' geometry, and ``device_track(since, until, area geometry)``. Whether a database has
PostGIS is read from ``pg_extension`` each time the schema is migrated (every start, and
``flespi-mirror migrate``), so installing PostGIS later (``CREATE EXTENSION postgis``) and
restarting is enough; dropping it (``DROP EXTENSION postgis CASCADE`` takes the geom flavour
with it) brings the plain objects back on the next start.

TimescaleDB is not used: the history tiers (history.py) meet the size and speed targets with
PostgreSQL alone, and no TimescaleDB build could be installed where the mirror is tested.
"""

from __future__ import annotations

import logging
from types import ModuleType

from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection

log = logging.getLogger(__name__)

TRACK_REVISION = "0008"  # the migration defining the typed track objects (its ``deploy``)

_TRACK_FLAVOUR = text(
    """
    SELECT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = current_schema() AND table_name = 'device_track'
                     AND column_name = 'geom'),
           to_regclass('device_track') IS NOT NULL
    """
)


def _track_module(script: ScriptDirectory) -> ModuleType:
    revision = script.get_revision(TRACK_REVISION)
    assert revision is not None, TRACK_REVISION
    return revision.module


def align(connection: Connection, schema: str, script: ScriptDirectory) -> str | None:
    """Give the typed track the flavour this database's extensions call for; returns the
    PostGIS schema when the geom flavour is deployed. A failure (a user's view depending on
    device_track, say) is logged and leaves the objects as they were: they stay correct."""
    module = _track_module(script)
    postgis: str | None = module.postgis_schema(connection)
    has_geom, exists = connection.execute(_TRACK_FLAVOUR).one()
    if exists and has_geom == (postgis is not None):
        return postgis if has_geom else None
    # The other flavour, or none: DROP EXTENSION postgis CASCADE took the geom objects along.
    try:
        with connection.begin_nested():
            module.deploy(lambda sql: connection.execute(text(sql)), schema, postgis)
    except Exception as exc:
        log.warning("could not switch device_track to %s PostGIS: %s",
                    "use" if postgis else "stop using", exc)  # fmt: skip
        return postgis if has_geom else None
    log.info("device_track %s PostGIS%s", "uses" if postgis else "no longer uses",
             f" (schema {postgis})" if postgis else "")  # fmt: skip
    return postgis
