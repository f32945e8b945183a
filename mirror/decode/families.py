"""Every flespi topic family, declared once: topic patterns, record, table, how rows are written.

The decoder (``topics.py``) compiles the patterns and calls the builders, the batcher
(``batch.py``) groups records by their family's table in this order, and ``statements.py``
generates each table's SQL from the ``writes`` declared here. Adding a family means adding one
:class:`FamilySpec` (plus its record, its builder and its table in ``schema.py``); the tests
generate topics from these patterns, so a new family is tested as soon as it is declared.

Pattern segments: a literal; ``{name}`` one non-empty level; ``{name:int}`` a flespi id;
``{name:a|b|c}`` one of the listed words; ``{name*}`` one or more levels to the end. When
several patterns match a topic's shape, the one with the most fixed levels (literals and word
lists) wins, then the one declared first: ``flespi/state/gw/devices/1/telemetry/x`` is telemetry,
not a property ``telemetry/x`` of the object ``gw/devices/1``. Pure data.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from mirror.decode import builders
from mirror.decode.builders import Builder
from mirror.decode.records import (
    CalculatorDeviceUpdate,
    ChannelMessage,
    DeviceMessage,
    Family,
    IntervalEvent,
    ModemMessage,
    ObjectPropertyUpdate,
    ObjectUpdate,
    OtherMessage,
    PlatformLog,
    PluginConfigUpdate,
    Record,
    SettingUpdate,
    TelemetryUpdate,
)


class Kind(StrEnum):
    """How a record attribute travels (a bound array of this PostgreSQL type) and is stored."""

    ID = "bigint"  # stored as is
    TEXT = "text"
    JSON = "json"  # text, cast to jsonb
    TIME = "time"  # Unix seconds (float8), stored with to_timestamp()
    NUMBER = "float8"
    BYTES = "bytea"
    BOOL = "boolean"


@dataclass(frozen=True)
class Col:
    """A table column filled from a record attribute (``attr``, default: the same name)."""

    name: str
    kind: Kind
    attr: str = ""

    @property
    def source(self) -> str:
        return self.attr or self.name


@dataclass(frozen=True)
class StateWrites:
    """Newest wins per key (multi-row upsert with a timestamp guard) and a ``*_tombstones``
    twin for deletions. A record whose ``present`` attribute is None is a deletion. The first
    of ``values`` breaks timestamp ties (see ``statements.py``)."""

    keys: tuple[Col, ...]
    values: tuple[Col, ...]
    present: str


@dataclass(frozen=True)
class AppendWrites:
    """History: each record appended once (``ON CONFLICT DO NOTHING`` on its identity)."""

    columns: tuple[Col, ...]


@dataclass(frozen=True)
class CustomWrites:
    """Written by hand-made statements in ``statements.py``, registered under ``name``."""

    name: str


Writes = StateWrites | AppendWrites | CustomWrites


@dataclass(frozen=True)
class RouteSpec:
    pattern: str
    build: Builder


@dataclass(frozen=True)
class FamilySpec:
    family: Family
    record: type[Record]
    table: str
    routes: tuple[RouteSpec, ...]
    writes: Writes


_DEVICE = Col("device_id", Kind.ID)
_RECEIVED = Col("received_at", Kind.TIME)
_CID = Col("cid", Kind.ID)
_MESSAGE_TAIL = (
    Col("ts", Kind.TIME),
    Col("digest", Kind.BYTES),
)

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        Family.TELEMETRY,
        TelemetryUpdate,
        "telemetry",
        (
            RouteSpec(
                "flespi/state/gw/devices/{device_id:int}/telemetry/{name}", builders.telemetry
            ),
        ),
        StateWrites(
            keys=(_DEVICE, Col("name", Kind.TEXT)),
            values=(Col("value", Kind.JSON), _CID, Col("expires_at", Kind.TIME)),
            present="value",
        ),
    ),
    FamilySpec(
        Family.SETTING,
        SettingUpdate,
        "device_settings",
        (RouteSpec("flespi/state/gw/devices/{device_id:int}/settings/{path*}", builders.setting),),
        StateWrites(
            keys=(_DEVICE, Col("name", Kind.TEXT)),
            values=(Col("value", Kind.JSON), _CID),
            present="value",
        ),
    ),
    FamilySpec(
        Family.PLUGIN_CONFIG,
        PluginConfigUpdate,
        "plugin_device_configs",
        (
            RouteSpec(
                "flespi/state/gw/plugins/{plugin_id:int}/devices/{device_id:int}",
                builders.plugin_config,
            ),
        ),
        StateWrites(
            keys=(Col("plugin_id", Kind.ID), _DEVICE),
            values=(Col("config", Kind.JSON), _CID),
            present="config",
        ),
    ),
    FamilySpec(
        Family.OBJECT,
        ObjectUpdate,
        "objects",
        (
            RouteSpec("flespi/state/platform/customer", builders.customer),
            RouteSpec("flespi/state/{api}/{origin}/{object_id:int}", builders.whole_object),
        ),
        CustomWrites("objects"),
    ),
    FamilySpec(
        Family.OBJECT_PROPERTY,
        ObjectPropertyUpdate,
        "object_properties",
        (
            RouteSpec("flespi/state/platform/customer/{path*}", builders.customer),
            RouteSpec(
                "flespi/state/{api}/{origin}/{object_id:int}/{path*}", builders.object_property
            ),
        ),
        CustomWrites("object_properties"),
    ),
    FamilySpec(
        Family.INTERVAL,
        IntervalEvent,
        "intervals",
        (
            RouteSpec(
                "flespi/interval/gw/calcs/{calc_id:int}/devices/{device_id:int}"
                "/{event:created|updated|deleted|activated|deactivated|active|finished}",
                builders.interval,
            ),
        ),
        # Matched by flespi's id, else by time span (an interval without an id has no key
        # that survives an update): the database function intervals_apply.
        CustomWrites("intervals"),
    ),
    FamilySpec(
        Family.CALCULATOR_DEVICE,
        CalculatorDeviceUpdate,
        "calculator_devices",
        (
            RouteSpec(
                "flespi/state/gw/calcs/{calc_id:int}/devices/{device_id:int}"
                "/{field:last|active|synced}",
                builders.calculator_device,
            ),
        ),
        CustomWrites("calculator_devices"),
    ),
    FamilySpec(
        Family.DEVICE_MESSAGE,
        DeviceMessage,
        "device_messages",
        (
            RouteSpec("flespi/message/gw/devices/{device_id:int}", builders.device_message),
            # The older form carries the device name as well (any levels after the id).
            RouteSpec("flespi/message/gw/devices/{device_id:int}/{name*}", builders.device_message),
        ),
        AppendWrites(
            (
                _DEVICE,
                *_MESSAGE_TAIL,
                Col("server_ts", Kind.TIME),
                Col("ident", Kind.TEXT),
                Col("payload", Kind.JSON),
                _RECEIVED,
                _CID,
                # The typed position (payloads.track), for device_track and its indexes.
                Col("latitude", Kind.NUMBER),
                Col("longitude", Kind.NUMBER),
                Col("altitude", Kind.NUMBER),
                Col("speed", Kind.NUMBER),
                Col("direction", Kind.NUMBER),
                Col("satellites", Kind.ID),
                Col("valid", Kind.BOOL),
            )
        ),
    ),
    FamilySpec(
        Family.CHANNEL_MESSAGE,
        ChannelMessage,
        "channel_messages",
        (
            RouteSpec(
                "flespi/message/gw/channels/{channel_id:int}/{ident*}", builders.channel_message
            ),
        ),
        AppendWrites(
            (
                Col("channel_id", Kind.ID),
                Col("ident", Kind.TEXT),
                *_MESSAGE_TAIL,
                Col("server_ts", Kind.TIME),
                Col("payload", Kind.JSON),
                _RECEIVED,
                _CID,
            )
        ),
    ),
    FamilySpec(
        Family.MODEM_MESSAGE,
        ModemMessage,
        "modem_messages",
        (RouteSpec("flespi/message/gw/modems/{modem_id:int}/{phone}", builders.modem_message),),
        AppendWrites(
            (
                Col("modem_id", Kind.ID),
                Col("phone", Kind.TEXT),
                *_MESSAGE_TAIL,
                Col("payload", Kind.JSON),
                _RECEIVED,
                _CID,
            )
        ),
    ),
    FamilySpec(
        Family.PLATFORM_LOG,
        PlatformLog,
        "platform_logs",
        (RouteSpec("flespi/log/{api}/{origin}/{rest*}", builders.platform_log),),
        AppendWrites(
            (
                Col("api", Kind.TEXT),
                Col("origin", Kind.TEXT),
                Col("event_type", Kind.TEXT),
                *_MESSAGE_TAIL,
                Col("event_code", Kind.ID),
                Col("payload", Kind.JSON),
                _RECEIVED,
                _CID,
            )
        ),
    ),
    FamilySpec(
        Family.OTHER_MESSAGE,
        OtherMessage,
        "other_messages",
        # Chats, containers, abques...: whatever flespi/message/ holds that no route above
        # models (the least specific pattern, so it never shadows one).
        (RouteSpec("flespi/message/{category}/{rest*}", builders.other_message),),
        AppendWrites(
            (Col("topic", Kind.TEXT), *_MESSAGE_TAIL, Col("payload", Kind.JSON), _RECEIVED, _CID)
        ),
    ),
)

FAMILY_OF_RECORD: dict[type, FamilySpec] = {spec.record: spec for spec in FAMILIES}
