"""Coalesce a batch of decoded records into the writes one transaction will make.

Pure. Per key the newest record wins (by ``ts``; on a tie the one that arrived last), so one
multi-row upsert never holds a key twice (PostgreSQL refuses ``ON CONFLICT DO UPDATE`` that
touches a row twice). Keys are sorted so concurrent writers lock rows in the same order and
cannot deadlock. History messages are deduplicated by their identity.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mirror.records import (
    ChannelMessage,
    DeviceMessage,
    Inbound,
    IntervalEvent,
    ModemMessage,
    ObjectPropertyUpdate,
    ObjectUpdate,
    PluginConfigUpdate,
    Record,
    Rejection,
    SettingUpdate,
    TelemetryUpdate,
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    message: Inbound
    rejection: Rejection


@dataclass
class WritePlan:
    """Everything one transaction writes, grouped by table, each list sorted by key."""

    telemetry: list[TelemetryUpdate] = field(default_factory=list)
    settings: list[SettingUpdate] = field(default_factory=list)
    plugin_configs: list[PluginConfigUpdate] = field(default_factory=list)
    objects: list[ObjectUpdate] = field(default_factory=list)
    object_properties: list[ObjectPropertyUpdate] = field(default_factory=list)
    intervals: list[IntervalEvent] = field(default_factory=list)
    device_messages: list[DeviceMessage] = field(default_factory=list)
    channel_messages: list[ChannelMessage] = field(default_factory=list)
    modem_messages: list[ModemMessage] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    superseded: int = 0  # records dropped because a newer one for the same key was in the batch
    # The received message behind each record kept (by id of the record), so a record the
    # database refuses can still be dead-lettered with its original topic and payload.
    origins: dict[int, Inbound] = field(default_factory=dict)

    def add(self, record: Record) -> None:
        rows: list[Record] = getattr(self, _PLAN_FIELD[type(record)])
        rows.append(record)

    def records(self) -> list[Record]:
        """Every record of the plan, table by table."""
        return [r for name in _PLAN_FIELD.values() for r in getattr(self, name)]


_PLAN_FIELD: dict[type, str] = {
    TelemetryUpdate: "telemetry",
    SettingUpdate: "settings",
    PluginConfigUpdate: "plugin_configs",
    ObjectUpdate: "objects",
    ObjectPropertyUpdate: "object_properties",
    IntervalEvent: "intervals",
    DeviceMessage: "device_messages",
    ChannelMessage: "channel_messages",
    ModemMessage: "modem_messages",
}
_HISTORY = (DeviceMessage, ChannelMessage, ModemMessage)


def coalesce(decoded: Iterable[tuple[Inbound, Record | Rejection]]) -> WritePlan:
    """Build the write plan for records given in arrival order."""
    plan = WritePlan()
    newest: dict[tuple[Any, ...], tuple[Record, Inbound]] = {}
    seen = 0
    for message, record in decoded:
        if isinstance(record, Rejection):
            plan.dead_letters.append(DeadLetter(message, record))
            continue
        seen += 1
        key = record.key
        current = newest.get(key)
        if current is None:
            newest[key] = (record, message)
        elif isinstance(record, _HISTORY):
            continue  # the same message again (a redelivery): keep the first copy
        elif record.ts >= current[0].ts:
            newest[key] = (record, message)  # newer, or as new and arrived later
    plan.superseded = seen - len(newest)
    # Keys start with their table name; within a table they share one shape, so they compare.
    for key in sorted(newest):
        record, message = newest[key]
        plan.add(record)
        plan.origins[id(record)] = message
    return plan
