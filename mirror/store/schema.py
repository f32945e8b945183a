"""The PostgreSQL schema: the public contract analysts and dashboards read.

Tables are defined without a schema name; the daemon and alembic set ``search_path`` to the
configured schema (``flespi`` by default), so one database can hold several mirrors.

State tables keep the newest value per key. Each has a ``*_tombstones`` twin holding the time of
the latest deletion per key, so an older update that arrives after a deletion (a redelivery, or
a reordering between shared-subscription members) cannot bring the row back. Alembic migrations
are written against these definitions; ``tests/test_migrations.py`` checks they agree.
"""

from __future__ import annotations

import re

from sqlalchemy import (
    REAL,
    BigInteger,
    Boolean,
    Column,
    Computed,
    Date,
    Double,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TIMESTAMP
from sqlalchemy.sql.schema import SchemaItem
from sqlalchemy.types import UserDefinedType

metadata = MetaData()

TS = TIMESTAMP(timezone=True)


def _cid() -> Column[int]:
    return Column(
        "cid",
        BigInteger,
        comment="flespi account (customer) id: the cid user property, else the token's account",
    )


def _tombstones(name: str, *key: Column[object], extra: tuple[SchemaItem, ...] = ()) -> Table:
    return Table(
        f"{name}_tombstones",
        metadata,
        *key,
        Column("ts", TS, nullable=False, comment="time of the latest deletion of this key"),
        PrimaryKeyConstraint(*(c.name for c in key)),
        *extra,
        comment=f"Deletions of {name} rows, so older updates cannot resurrect them.",
    )


telemetry = Table(
    "telemetry",
    metadata,
    Column("device_id", BigInteger, nullable=False, comment="flespi device id"),
    Column("name", Text, nullable=False, comment="parameter name, e.g. position.latitude"),
    Column("value", JSONB, nullable=False, comment="the parameter's latest value, as sent"),
    Column("ts", TS, nullable=False, comment="when the value appeared (MQTT 'timestamp')"),
    Column("received_at", TS, nullable=False, comment="when the mirror received it"),
    Column(
        "expires_at",
        TS,
        comment="when the value expires (MQTT message expiry); NULL: never",
    ),
    _cid(),
    PrimaryKeyConstraint("device_id", "name"),
    Index("telemetry_name_idx", "name"),
    Index("telemetry_cid_idx", "cid"),
    Index(
        "telemetry_expires_at_idx",
        "expires_at",
        postgresql_where=text("expires_at IS NOT NULL"),
    ),
    comment="Latest value of every device telemetry parameter.",
)
telemetry_tombstones = _tombstones(
    "telemetry", Column("device_id", BigInteger), Column("name", Text)
)

device_settings = Table(
    "device_settings",
    metadata,
    Column("device_id", BigInteger, nullable=False),
    Column("name", Text, nullable=False, comment="setting name; deeper levels as name/field"),
    Column("value", JSONB, nullable=False),
    Column("ts", TS, nullable=False),
    Column("received_at", TS, nullable=False),
    _cid(),
    PrimaryKeyConstraint("device_id", "name"),
    comment="Current device settings.",
)
device_settings_tombstones = _tombstones(
    "device_settings", Column("device_id", BigInteger), Column("name", Text)
)

plugin_device_configs = Table(
    "plugin_device_configs",
    metadata,
    Column("plugin_id", BigInteger, nullable=False),
    Column("device_id", BigInteger, nullable=False),
    Column("config", JSONB, nullable=False, comment="the plugin's configuration for the device"),
    Column("ts", TS, nullable=False),
    Column("received_at", TS, nullable=False),
    _cid(),
    PrimaryKeyConstraint("plugin_id", "device_id"),
    comment="Per-device plugin configurations.",
)
plugin_device_configs_tombstones = _tombstones(
    "plugin_device_configs", Column("plugin_id", BigInteger), Column("device_id", BigInteger)
)

objects = Table(
    "objects",
    metadata,
    Column("api", Text, nullable=False, comment="flespi API, e.g. gw, storage, platform"),
    Column("origin", Text, nullable=False, comment="item type, e.g. devices, channels, calcs"),
    Column("id", BigInteger, nullable=False, comment="item id (the cid for platform/customer)"),
    Column(
        "props",
        JSONB,
        nullable=False,
        comment="the whole object with newer property updates merged in",
    ),
    Column("base", JSONB, comment="the last whole-object payload, as sent"),
    Column("base_ts", TS, comment="timestamp of that whole-object payload"),
    Column("ts", TS, nullable=False, comment="newest timestamp of any update of the object"),
    Column("received_at", TS, nullable=False),
    _cid(),
    PrimaryKeyConstraint("api", "origin", "id"),
    Index("objects_cid_idx", "cid"),
    comment="flespi items (devices, channels, calcs, ...) with their properties.",
)
objects_tombstones = _tombstones(
    "objects", Column("api", Text), Column("origin", Text), Column("id", BigInteger)
)

object_properties = Table(
    "object_properties",
    metadata,
    Column("api", Text, nullable=False),
    Column("origin", Text, nullable=False),
    Column("id", BigInteger, nullable=False),
    Column("path", ARRAY(Text), nullable=False, comment="property path, e.g. {connections,42}"),
    Column("value", JSONB, nullable=False),
    Column("ts", TS, nullable=False),
    Column("received_at", TS, nullable=False),
    _cid(),
    PrimaryKeyConstraint("api", "origin", "id", "path"),
    comment="Individual property updates of flespi items (merged into objects.props).",
)
object_properties_tombstones = _tombstones(
    "object_properties",
    Column("api", Text),
    Column("origin", Text),
    Column("id", BigInteger),
    Column("path", ARRAY(Text)),
)

intervals = Table(
    "intervals",
    metadata,
    Column("calc_id", BigInteger, nullable=False),
    Column("device_id", BigInteger, nullable=False),
    Column(
        "interval_key",
        Text,
        nullable=False,
        comment="'id:<flespi id>', else 'begin:<begin>' of the interval as first seen",
    ),
    Column("interval_id", BigInteger, comment="flespi's interval id, when it sent one"),
    Column("begin", TS),
    Column("end", TS),
    Column("duration", Double, comment="seconds"),
    Column("event", Text, nullable=False, comment="last event: created, updated, ..."),
    Column("data", JSONB, nullable=False, comment="the whole interval, with every counter"),
    Column("ts", TS, nullable=False),
    Column("received_at", TS, nullable=False),
    _cid(),
    PrimaryKeyConstraint("calc_id", "device_id", "interval_key"),
    Index("intervals_device_begin_idx", "device_id", "begin"),
    Index("intervals_cid_idx", "cid"),
    # An interval without a flespi id is found by its span (migration 0004).
    Index("intervals_span_begin_idx", "calc_id", "device_id", "begin"),
    Index("intervals_span_end_idx", "calc_id", "device_id", "end"),
    comment="Calculator intervals per device.",
)
intervals_tombstones = _tombstones(
    "intervals",
    Column("calc_id", BigInteger),
    Column("device_id", BigInteger),
    Column("interval_key", Text),
    extra=(
        Column("interval_id", BigInteger, comment="flespi's id, if any"),
        Column("begin", TS, comment="begin of the deleted interval"),
        Column("end", TS, comment="end of the deleted interval"),
        Index("intervals_tombstones_span_begin_idx", "calc_id", "device_id", "begin"),
        Index("intervals_tombstones_span_end_idx", "calc_id", "device_id", "end"),
    ),
)

# History in two tiers (see history.py). Each message lands in a ``*_recent`` table, one row
# per message as before; the daemon's compaction moves the hours older than --compact-after into
# a ``*_hours`` table, one row per device (channel and ident) and UTC hour, the messages packed
# into arrays and one lz4-compressed JSON array. The views ``device_messages`` and
# ``channel_messages`` (migration 0007) show both tiers as one table.
device_messages_recent = Table(
    "device_messages_recent",
    metadata,
    Column("device_id", BigInteger, nullable=False),
    Column("ts", TS, nullable=False, comment="message 'timestamp' (device time)"),
    Column("digest", LargeBinary, nullable=False, comment="MD5 of the payload: its identity"),
    Column("server_ts", TS, comment="message 'server.timestamp'"),
    Column("ident", Text),
    Column("payload", JSONB, nullable=False, comment="the whole message, dotted keys"),
    Column("received_at", TS, nullable=False),
    _cid(),
    # The typed position, read from the payload as the message is stored (payloads.track).
    Column("latitude", Double),
    Column("longitude", Double),
    Column("altitude", REAL),
    Column("speed", REAL),
    Column("direction", REAL),
    Column("satellites", SmallInteger),
    Column("valid", Boolean),
    PrimaryKeyConstraint("device_id", "ts", "digest"),
    Index("device_messages_recent_ts_idx", "ts"),
    Index("device_messages_recent_cid_ts_idx", "cid", "ts"),
    comment="Device messages of the hours not compacted yet, each stored once "
    "(read them through the device_messages view).",
    postgresql_partition_by="RANGE (ts)",
)


def _packed(*columns: Column[object], key: tuple[str, ...]) -> tuple[SchemaItem, ...]:
    """The columns every ``*_hours`` table shares: one element per message, in (ts, digest)
    order, and the messages as one JSON array."""
    return (
        Column("hour", TS, nullable=False, comment="the UTC hour the messages' ts fall in"),
        Column("messages", Integer, nullable=False, comment="messages in the row"),
        Column("first_ts", TS, nullable=False),
        Column("last_ts", TS, nullable=False),
        Column(
            "ts_offsets",
            ARRAY(Integer),
            nullable=False,
            comment="each message's ts: microseconds after hour, minus 1,800,000,000",
        ),
        Column("digests", LargeBinary, nullable=False, comment="the 16-byte MD5s, concatenated"),
        Column("server_ts", ARRAY(TS), nullable=False),
        Column("received_at", ARRAY(TS), nullable=False),
        Column("cids", ARRAY(BigInteger), nullable=False),
        *columns,
        Column("payloads", JSONB, nullable=False, comment="the messages, a JSON array"),
        PrimaryKeyConstraint(*key, "hour"),
    )


class Box(UserDefinedType[object]):
    """PostgreSQL's built-in ``box`` (a GiST-indexable rectangle), not modelled by SQLAlchemy."""

    cache_ok = True

    def get_col_spec(self, **_: object) -> str:
        return "box"


device_message_hours = Table(
    "device_message_hours",
    metadata,
    Column("device_id", BigInteger, nullable=False),
    *_packed(
        Column("idents", ARRAY(Text), nullable=False),
        Column("latitude", ARRAY(Double), nullable=False),
        Column("longitude", ARRAY(Double), nullable=False),
        Column("altitude", ARRAY(REAL), nullable=False),
        Column("speed", ARRAY(REAL), nullable=False),
        Column("direction", ARRAY(REAL), nullable=False),
        Column("satellites", ARRAY(SmallInteger), nullable=False),
        Column("valid", ARRAY(Boolean), nullable=False),
        Column("bbox", Box(), comment="longitude/latitude bounds of the hour's positions"),
        key=("device_id",),
    ),
    Index("device_message_hours_hour_idx", "hour"),
    Index("device_message_hours_bbox_idx", "bbox", postgresql_using="gist"),
    comment="Device messages of past hours, one row per device and hour "
    "(read them through the device_messages view).",
    postgresql_partition_by="RANGE (hour)",
    info={"partition_options": "toast_tuple_target = 128"},
)

channel_messages_recent = Table(
    "channel_messages_recent",
    metadata,
    Column("channel_id", BigInteger, nullable=False),
    Column("ident", Text, nullable=False),
    Column("ts", TS, nullable=False),
    Column("digest", LargeBinary, nullable=False),
    Column("server_ts", TS),
    Column("payload", JSONB, nullable=False),
    Column("received_at", TS, nullable=False),
    _cid(),
    PrimaryKeyConstraint("channel_id", "ident", "ts", "digest"),
    Index("channel_messages_recent_ts_idx", "ts"),
    Index("channel_messages_recent_cid_ts_idx", "cid", "ts"),
    comment="Channel messages of the hours not compacted yet, each stored once "
    "(read them through the channel_messages view).",
    postgresql_partition_by="RANGE (ts)",
)

channel_message_hours = Table(
    "channel_message_hours",
    metadata,
    Column("channel_id", BigInteger, nullable=False),
    Column("ident", Text, nullable=False),
    *_packed(key=("channel_id", "ident")),
    Index("channel_message_hours_hour_idx", "hour"),
    comment="Channel messages of past hours, one row per channel, ident and hour "
    "(read them through the channel_messages view).",
    postgresql_partition_by="RANGE (hour)",
    info={"partition_options": "toast_tuple_target = 128"},
)

modem_messages = Table(
    "modem_messages",
    metadata,
    Column("modem_id", BigInteger, nullable=False),
    Column("phone", Text, nullable=False),
    Column("ts", TS, nullable=False),
    Column("digest", LargeBinary, nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("received_at", TS, nullable=False),
    _cid(),
    PrimaryKeyConstraint("modem_id", "phone", "ts", "digest"),
    comment="SMS received by modems, each stored once.",
    postgresql_partition_by="RANGE (ts)",
)

# Summaries of device messages, kept by the statement that inserts them (summaries.py).
device_latest_messages = Table(
    "device_latest_messages",
    metadata,
    Column("device_id", BigInteger, primary_key=True),
    Column("ts", TS, nullable=False),
    Column("digest", LargeBinary, nullable=False),
    Column("server_ts", TS),
    Column("ident", Text),
    Column("payload", JSONB, nullable=False),
    Column("received_at", TS, nullable=False),
    _cid(),
    comment="The newest message of each device (by device time), kept with every write.",
)

device_hours = Table(
    "device_hours",
    metadata,
    Column("device_id", BigInteger, nullable=False),
    Column("hour", TS, nullable=False),
    Column("messages", Integer, nullable=False),
    Column("first_ts", TS, nullable=False),
    Column("last_ts", TS, nullable=False),
    _cid(),
    PrimaryKeyConstraint("device_id", "hour"),
    Index("device_hours_hour_idx", "hour"),
    comment="Device messages per device and UTC hour, kept with every write.",
)

device_days = Table(
    "device_days",
    metadata,
    Column("device_id", BigInteger, nullable=False),
    Column("day", Date, nullable=False),
    _cid(),
    Column("messages", Integer, nullable=False),
    Column("first_ts", TS, nullable=False),
    Column("last_ts", TS, nullable=False),
    Column("max_speed", REAL, comment="km/h, the highest position.speed of the day"),
    Column("mileage_min", Double, comment="the lowest vehicle.mileage (km) of the day"),
    Column("mileage_max", Double, comment="the highest vehicle.mileage (km) of the day"),
    Column("track_km", Double, nullable=False,
           comment="km along the day's valid positions, in time order"),
    Column("moving_seconds", Double, nullable=False,
           comment="seconds after a message at 5 km/h or more, gaps of up to 10 minutes"),
    Column(
        "distance_km",
        Double,
        Computed("coalesce(mileage_max - mileage_min, track_km)", persisted=True),
        comment="mileage_max - mileage_min, else track_km",
    ),
    Column("first_latitude", Double),
    Column("first_longitude", Double),
    Column("last_fix_ts", TS),
    Column("last_latitude", Double),
    Column("last_longitude", Double),
    Column("last_speed", REAL),
    Column(
        "needs_recount",
        Boolean,
        nullable=False,
        server_default=text("false"),
        comment="distance and moving time are being recomputed (messages arrived out of order)",
    ),
    PrimaryKeyConstraint("device_id", "day"),
    Index("device_days_day_idx", "day"),
    Index(
        "device_days_recount_idx", "device_id", "day", postgresql_where=text("needs_recount")
    ),
    comment="Each device's UTC day: messages, times, distance, top speed, moving time; kept "
    "with every write.",
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("topic", Text, nullable=False),
    Column("payload", LargeBinary, nullable=False, comment="first bytes of the payload"),
    Column("payload_size", Integer, nullable=False, comment="full payload size in bytes"),
    Column("properties", JSONB, nullable=False, comment="MQTT 5 user properties"),
    Column("reason", Text, nullable=False),
    Column("detail", Text, nullable=False),
    Column("received_at", TS, nullable=False),
    _cid(),
    Index("dead_letters_received_at_idx", "received_at"),
    Index("dead_letters_cid_idx", "cid"),
    comment="Messages that could not be mirrored, with the reason.",
)

calculator_devices = Table(
    "calculator_devices",
    metadata,
    Column("calc_id", BigInteger, nullable=False, comment="flespi calculator id"),
    Column("device_id", BigInteger, nullable=False, comment="flespi device id"),
    _cid(),
    Column("last", JSONB, comment="the last interval (.../last)"),
    Column("last_ts", TS),
    Column(
        "last_active",
        Boolean,
        comment="the 'active' user property of .../last: the last interval is still open",
    ),
    Column(
        "active",
        JSONB,
        comment="the active interval (.../active, activation events); JSON null: none",
    ),
    Column("active_ts", TS),
    Column("synced", JSONB, comment="the sync state (.../synced)"),
    Column("synced_ts", TS),
    Column("ts", TS, nullable=False, comment="newest timestamp of any field"),
    Column("received_at", TS, nullable=False),
    PrimaryKeyConstraint("calc_id", "device_id"),
    Index("calculator_devices_device_id_idx", "device_id"),
    Index("calculator_devices_cid_idx", "cid"),
    comment="A calculator's state for each device assigned to it.",
)

platform_logs = Table(
    "platform_logs",
    metadata,
    Column("api", Text, nullable=False, comment="flespi API, e.g. gw, platform"),
    Column("origin", Text, nullable=False, comment="origin path, e.g. devices/5/commands-queue/1"),
    Column("event_type", Text, nullable=False, comment="last topic level, e.g. created"),
    _cid(),
    Column("ts", TS, nullable=False, comment="the record's timestamp"),
    Column("digest", LargeBinary, nullable=False, comment="MD5 of the payload"),
    Column("event_code", BigInteger),
    Column("payload", JSONB, nullable=False, comment="the whole log record"),
    Column("received_at", TS, nullable=False),
    PrimaryKeyConstraint("api", "origin", "event_type", "ts", "digest"),
    Index("platform_logs_ts_idx", "ts"),
    Index("platform_logs_cid_ts_idx", "cid", "ts"),
    comment="flespi platform logs (flespi/log/...), each stored once.",
    postgresql_partition_by="RANGE (ts)",
)

other_messages = Table(
    "other_messages",
    metadata,
    Column("topic", Text, nullable=False, comment="the whole MQTT topic"),
    _cid(),
    Column("ts", TS, nullable=False, comment="payload 'timestamp', else the property"),
    Column("digest", LargeBinary, nullable=False, comment="MD5 of the payload"),
    Column("payload", JSONB, nullable=False),
    Column("received_at", TS, nullable=False),
    PrimaryKeyConstraint("topic", "ts", "digest"),
    Index("other_messages_ts_idx", "ts"),
    Index("other_messages_cid_ts_idx", "cid", "ts"),
    comment="flespi/message/... families not modelled yet (chats, containers, abques).",
    postgresql_partition_by="RANGE (ts)",
)

sync_state = Table(
    "sync_state",
    metadata,
    Column("name", Text, primary_key=True, comment="e.g. snapshot:<share group>"),
    Column("value", JSONB, nullable=False),
    Column("updated_at", TS, nullable=False),
    comment="The mirror's own bookkeeping (completed retained-state snapshots).",
)


# Kept by statement triggers on telemetry (migration 0003), never written by the daemon: each
# position parameter's value and ts per device, so the device_positions view is a key lookup
# for one device and one scan for all. A part is NULL when its telemetry row is absent.
def _chosen_position() -> dict[str, str]:
    """The whole 'position' object when it has a latitude and a longitude and is not older than
    the newer of position.latitude/longitude; else those parameters (revision 0001's rule)."""
    newer = "greatest(latitude_ts, longitude_ts)"
    use_whole = (
        f"whole_latitude IS NOT NULL AND whole_longitude IS NOT NULL AND "
        f"({newer} IS NULL OR latitude IS NULL OR whole_ts >= {newer})"
    )
    choices = {
        "position_latitude": ("whole_latitude", "latitude"),
        "position_longitude": ("whole_longitude", "longitude"),
        "position_altitude": ("coalesce(whole_altitude, altitude)", "altitude"),
        "position_speed": ("coalesce(whole_speed, speed)", "speed"),
        "position_ts": ("whole_ts", newer),
    }
    return {
        name: f"CASE WHEN {use_whole} THEN {whole} ELSE {parts} END"
        for name, (whole, parts) in choices.items()
    }


POSITION_PARTS = (
    "whole_latitude", "whole_longitude", "whole_altitude", "whole_speed", "whole_ts",
    "latitude", "latitude_ts", "longitude", "longitude_ts",
    "altitude", "altitude_ts", "speed", "speed_ts",
)  # fmt: skip
device_position_parts = Table(
    "device_position_parts",
    metadata,
    Column("device_id", BigInteger, primary_key=True),
    *(Column(name, TS if name.endswith("_ts") else Double) for name in POSITION_PARTS),
    # The position the device_positions view shows, chosen from the parts when a row is written.
    *(
        Column(name, TS if name.endswith("_ts") else Double, Computed(sql, persisted=True))
        for name, sql in _chosen_position().items()
    ),
    comment="Each device's position parameters, kept by triggers on telemetry "
    "(read them through the device_positions view).",
)

STATE_TABLES = (
    telemetry,
    device_settings,
    plugin_device_configs,
    objects,
    object_properties,
    intervals,
    calculator_devices,
)
# History tables are partitioned by day of ts (UTC): ``<table>_pYYYYMMDD`` partitions made
# ahead by the daemon, and ``<table>_default`` for rows outside them (see partitions.py).
HISTORY_TABLES = (
    device_messages_recent,
    device_message_hours,
    channel_messages_recent,
    channel_message_hours,
    modem_messages,
    platform_logs,
    other_messages,
)
VIEWS = ("devices", "device_positions", "device_messages", "channel_messages", "device_track")
# Indexes on expressions over the payload (GiST, the typed track's points: migration 0008's
# deploy), which name the schema's functions and so are not modelled here.
EXPRESSION_INDEXES = ("device_messages_recent_position_idx", "device_messages_recent_geom_idx")
PARTITION_NAME = re.compile(
    r"^(device_messages_recent|device_message_hours|channel_messages_recent"
    r"|channel_message_hours|modem_messages|platform_logs|other_messages)"
    r"_(default|p\d{8})$"
)
_PARTITION_KEY = re.compile(r"^RANGE \((\w+)\)$")


def partition_key(table: Table) -> str:
    """The column a history table is partitioned by (``ts``, or ``hour`` for packed hours)."""
    match = _PARTITION_KEY.match(table.dialect_options["postgresql"]["partition_by"])
    assert match, table.name
    return match.group(1)


def include_in_autogenerate(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    """alembic ``include_object`` hook: leave relations made outside ``metadata`` alone."""
    if type_ == "table":
        return not managed_outside_metadata(name)
    if type_ == "index" and name in EXPRESSION_INDEXES:
        return False
    table = getattr(obj, "table", None)
    return not managed_outside_metadata(getattr(table, "name", None))


def managed_outside_metadata(name: str | None) -> bool:
    """Relations that exist in the schema but not in ``metadata``: views, partitions, alembic's
    version table. Autogenerate and the schema-agreement test must leave them alone."""
    if name is None:
        return False
    return name in VIEWS or name == "alembic_version" or bool(PARTITION_NAME.match(name))
