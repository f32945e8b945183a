"""Hypothesis strategies built from the family declarations (see ``mirror/decode/families.py``)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from mirror.decode.builders import MAX_ID
from mirror.decode.topics import Route, Segment

NOW = 1_732_000_000.0

# A topic level: any text MQTT allows in a topic name, without the level separator and the
# wildcards (flespi never publishes those inside a level).
LEVEL = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/+#\x00"),
    min_size=1,
    max_size=12,
)
SANE_TIME = st.floats(1_000_000_000, NOW, allow_nan=False).map(lambda t: round(t, 6))


def _level(segment: Segment) -> st.SearchStrategy[str]:
    if segment.literal is not None:
        return st.just(segment.literal)
    if segment.kind == "int":
        return st.integers(0, MAX_ID).map(str)
    if segment.kind == "choice":
        return st.sampled_from(sorted(segment.choices))
    if segment.kind == "rest":
        return st.lists(LEVEL, min_size=1, max_size=4).map("/".join)
    return LEVEL


def topic_for(route: Route) -> st.SearchStrategy[str]:
    """Topics of exactly this route's shape."""
    return st.tuples(*(_level(s) for s in route.segments)).map("/".join)


# Text without U+0000 (jsonb refuses it; whether an escaped NUL is stored is payloads.py's call)
# and without backslashes: payloads.py takes the text \\u0000 (an escaped backslash) for an
# escaped NUL today, which is being fixed separately (issue 9 item 7).
TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\\"), max_size=8
)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3),
    max_leaves=8,
)


@st.composite
def valid_payload(draw: st.DrawFn) -> bytes:
    """A JSON object every family accepts: an interval id and times, a message timestamp."""
    begin = draw(SANE_TIME)
    value: dict[str, Any] = draw(st.dictionaries(TEXT, JSON_VALUES, max_size=4))
    value.update(
        id=draw(st.integers(0, MAX_ID)),
        begin=begin,
        end=begin + draw(st.integers(0, 3_600)),
        timestamp=draw(SANE_TIME),
    )
    return json.dumps(value).encode()


def any_payload() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=100),
        JSON_VALUES.map(lambda v: json.dumps(v).encode()),
        valid_payload(),
        st.just(b""),
    )


def valid_properties() -> st.SearchStrategy[dict[str, str]]:
    return st.fixed_dictionaries(
        {
            "timestamp": SANE_TIME.map(lambda t: f"{t:.6f}"),
            "cid": st.integers(0, MAX_ID).map(str),
        }
    )
