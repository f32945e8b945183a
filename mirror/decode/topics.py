"""flespi topics and payloads → typed records, or a rejection saying why.

Pure: ``decode(message) -> Record | Rejection``. No I/O, no globals that change, no SQL. Every
fact about flespi's topic families lives here (see ``shared/flespi-mqtt.md``):

* telemetry payloads are bare JSON values; their time is the MQTT 5 user property ``timestamp``;
* a zero-length payload on a state topic means the thing was deleted;
* ``.../{id}/deleted`` = ``true`` deletes the whole object.

Records live in ``records.py``, payload and timestamp checks in ``payloads.py``, builders in
``builders.py``; the families and their topic patterns are declared in ``families.py``. This
module compiles those patterns once and routes each topic to its family by its first two levels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mirror.decode.builders import Builder, parse_id
from mirror.decode.families import FAMILIES
from mirror.decode.payloads import Invalid
from mirror.decode.records import Family, Inbound, Reason, Record, Rejection


@dataclass(frozen=True)
class Segment:
    """One level of a compiled pattern."""

    literal: str | None = None  # a fixed level
    name: str = ""  # the field it captures
    kind: str = "text"  # text, int, choice or rest
    choices: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, part: str) -> Segment:
        if not part.startswith("{"):
            return cls(literal=part)
        spec = part[1:-1]
        if spec.endswith("*"):
            return cls(name=spec[:-1], kind="rest")
        name, _, kind = spec.partition(":")
        if kind == "int":
            return cls(name=name, kind="int")
        if kind:
            return cls(name=name, kind="choice", choices=frozenset(kind.split("|")))
        return cls(name=name)

    @property
    def fixed(self) -> bool:
        return self.literal is not None or self.kind == "choice"


@dataclass(frozen=True)
class Route:
    """A compiled topic pattern of one family: matching is one regular expression over the
    whole topic (in C), then the ids it captured are checked."""

    pattern: str
    family: Family
    build: Builder
    segments: tuple[Segment, ...]
    regex: re.Pattern[str]
    ids: tuple[str, ...]  # captured fields that are flespi ids
    rest: str | None  # the field that captures the remaining levels, if any

    @classmethod
    def compile(cls, pattern: str, family: Family, build: Builder) -> Route:
        segments = tuple(Segment.parse(p) for p in pattern.split("/"))
        parts = []
        for seg in segments:
            if seg.literal is not None:
                parts.append(re.escape(seg.literal))
            elif seg.kind == "int":  # any text: a bad id refuses the message (INVALID_ID)
                parts.append(f"(?P<{seg.name}>[^/]*)")
            elif seg.kind == "rest":  # one or more levels, none empty
                parts.append(f"(?P<{seg.name}>[^/]+(?:/[^/]+)*)")
            elif seg.kind == "choice":
                choices = "|".join(re.escape(c) for c in sorted(seg.choices))
                parts.append(f"(?P<{seg.name}>(?:{choices}))")
            else:
                parts.append(f"(?P<{seg.name}>[^/]+)")
        ids = tuple(s.name for s in segments if s.kind == "int")
        rest = next((s.name for s in segments if s.kind == "rest"), None)
        regex = re.compile("/".join(parts))
        return cls(pattern, family, build, segments, regex, ids, rest)

    @property
    def specificity(self) -> int:
        return sum(1 for s in self.segments if s.fixed)

    def match(self, topic: str) -> dict[str, Any] | None:
        """Captured fields, or None when the shape differs. Raises on a bad id."""
        found = self.regex.fullmatch(topic)
        if found is None:
            return None
        fields: dict[str, Any] = found.groupdict()
        for name in self.ids:
            fields[name] = parse_id(fields[name], name)
        if self.rest is not None:
            fields[self.rest] = tuple(fields[self.rest].split("/"))
        return fields


def _compile() -> dict[tuple[str, str], tuple[Route, ...]]:
    """Routes grouped by their first two levels (``flespi/state``, ...), most specific first."""
    routes = [
        Route.compile(r.pattern, spec.family, r.build) for spec in FAMILIES for r in spec.routes
    ]
    routes.sort(key=lambda r: -r.specificity)  # stable: declaration order among equals
    grouped: dict[tuple[str, str], list[Route]] = {}
    for route in routes:
        first, second = route.segments[0].literal, route.segments[1].literal
        assert first is not None and second is not None, route.pattern
        grouped.setdefault((first, second), []).append(route)
    return {prefix: tuple(rs) for prefix, rs in grouped.items()}


ROUTES = _compile()
_CIDS: dict[str, int] = {}  # cid property text -> account id, parsed once


def decode(
    msg: Inbound, max_payload_bytes: int = 1024 * 1024, default_cid: int | None = None
) -> Record | Rejection:
    """Turn one received message into a record, or a rejection saying why. Never raises.

    ``default_cid`` is the account of the session's token (from the CONNACK), used when a
    message carries no ``cid`` user property.
    """
    levels = msg.topic.split("/")
    family = Family.UNKNOWN
    # The account, once: a bad cid property refuses the message, which still counts as the
    # session's account (as a message without one).
    raw_cid = msg.properties.get("cid")
    cid, bad_cid = default_cid, None
    if raw_cid is not None:
        cid = _CIDS.get(raw_cid)
        if cid is None:
            try:
                cid = parse_id(raw_cid, "cid")
                if len(_CIDS) < 1024:  # accounts are few; a flood of odd ones is not cached
                    _CIDS[raw_cid] = cid
            except Invalid as exc:
                cid, bad_cid = default_cid, exc
    try:
        for route in ROUTES.get((levels[0], levels[1]) if len(levels) > 1 else ("", ""), ()):
            fields = route.match(msg.topic)
            if fields is None:
                continue
            family = route.family
            if len(msg.payload) > max_payload_bytes:
                raise Invalid(
                    Reason.PAYLOAD_TOO_LARGE,
                    f"payload of {len(msg.payload)} bytes exceeds the {max_payload_bytes} limit",
                )
            if bad_cid is not None:
                raise bad_cid
            return route.build(fields, msg, cid)
        return Rejection(Reason.UNKNOWN_TOPIC, "topic matches no flespi topic family", cid=cid)
    except Invalid as rejection:
        return Rejection(rejection.reason, rejection.detail, family, cid)
    except Exception as exc:  # a decoder bug must cost one message, never the stream
        return Rejection(Reason.WRONG_SHAPE, f"could not decode: {type(exc).__name__}", family, cid)


# Records that carry neither flespi's receive time nor a message identity: their lag counts from
# the ``timestamp`` user property.
_PROPERTY_TIMED = frozenset(
    spec.record
    for spec in FAMILIES
    if not {"server_ts", "digest"} & set(getattr(spec.record, "__slots__", ()))
)


def lag_reference(msg: Inbound, record: Record | Rejection) -> float | None:
    """When flespi published what a message carries, for the lag metric; None when the
    message says nothing about lag: a rejection, or a retained message (a snapshot is old by
    design). Device and channel messages count from their ``server.timestamp`` (flespi's
    receive time), never from device time (a black-box backlog is history, not lag); the
    rest from the ``timestamp`` user property."""
    if msg.retain:
        return None
    if type(record) in _PROPERTY_TIMED:  # most messages: telemetry and the other state
        try:
            return float(msg.properties["timestamp"])
        except (KeyError, ValueError):
            return None
    if isinstance(record, Rejection):
        return None
    server_ts = getattr(record, "server_ts", None)
    if server_ts is not None:
        return float(server_ts)
    if getattr(record, "digest", None) is not None:
        return None  # a message without server time: its times are the device's
    try:
        return float(msg.properties["timestamp"])
    except (KeyError, ValueError):
        return None
