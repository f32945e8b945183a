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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mirror.builders import Builder, parse_id
from mirror.families import FAMILIES
from mirror.payloads import Invalid
from mirror.records import Family, Inbound, Reason, Record, Rejection


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
    """A compiled topic pattern of one family: matching is one pass over the levels."""

    pattern: str
    family: Family
    build: Builder
    segments: tuple[Segment, ...]

    @classmethod
    def compile(cls, pattern: str, family: Family, build: Builder) -> Route:
        return cls(pattern, family, build, tuple(Segment.parse(p) for p in pattern.split("/")))

    @property
    def specificity(self) -> int:
        return sum(1 for s in self.segments if s.fixed)

    def match(self, levels: Sequence[str]) -> dict[str, Any] | None:
        """Captured fields, or None when the shape differs. Raises on a bad id."""
        segs = self.segments
        rest = segs[-1].kind == "rest"
        if len(levels) < len(segs) if rest else len(levels) != len(segs):
            return None
        ids: list[tuple[str, str]] = []
        fields: dict[str, Any] = {}
        for seg, level in zip(segs, levels, strict=False):
            if seg.literal is not None:
                if level != seg.literal:
                    return None
            elif seg.kind == "int":
                ids.append((seg.name, level))  # converted once the whole shape matched
            elif seg.kind == "rest":
                tail = tuple(levels[len(segs) - 1 :])
                if "" in tail:
                    return None
                fields[seg.name] = tail
            elif level == "" or (seg.kind == "choice" and level not in seg.choices):
                return None
            else:
                fields[seg.name] = level
        for name, text in ids:
            fields[name] = parse_id(text, name)
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


def message_cid(msg: Inbound, default_cid: int | None) -> int | None:
    """The account a message belongs to: its ``cid`` user property, else the session's."""
    raw = msg.properties.get("cid")
    return default_cid if raw is None else parse_id(raw, "cid")


def decode(
    msg: Inbound, max_payload_bytes: int = 1024 * 1024, default_cid: int | None = None
) -> Record | Rejection:
    """Turn one received message into a record, or a rejection saying why. Never raises.

    ``default_cid`` is the account of the session's token (from the CONNACK), used when a
    message carries no ``cid`` user property.
    """
    levels = msg.topic.split("/")
    family = Family.UNKNOWN
    cid = _lenient_cid(msg, default_cid)
    try:
        for route in ROUTES.get((levels[0], levels[1]) if len(levels) > 1 else ("", ""), ()):
            fields = route.match(levels)
            if fields is None:
                continue
            family = route.family
            if len(msg.payload) > max_payload_bytes:
                raise Invalid(
                    Reason.PAYLOAD_TOO_LARGE,
                    f"payload of {len(msg.payload)} bytes exceeds the {max_payload_bytes} limit",
                )
            return route.build(fields, msg, message_cid(msg, default_cid))
        return Rejection(Reason.UNKNOWN_TOPIC, "topic matches no flespi topic family", cid=cid)
    except Invalid as rejection:
        return Rejection(rejection.reason, rejection.detail, family, cid)
    except Exception as exc:  # a decoder bug must cost one message, never the stream
        return Rejection(Reason.WRONG_SHAPE, f"could not decode: {type(exc).__name__}", family, cid)


def _lenient_cid(msg: Inbound, default_cid: int | None) -> int | None:
    """The account of a message that may be refused: a bad ``cid`` property counts as none."""
    try:
        return message_cid(msg, default_cid)
    except Invalid:
        return default_cid


def lag_reference(msg: Inbound, record: Record | Rejection) -> float | None:
    """When flespi published what a message carries, for the lag metric; None when the
    message says nothing about lag: a rejection, or a retained message (a snapshot is old by
    design). Device and channel messages count from their ``server.timestamp`` (flespi's
    receive time), never from device time (a black-box backlog is history, not lag); the
    rest from the ``timestamp`` user property."""
    if isinstance(record, Rejection) or msg.retain:
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
