"""flespi-mirror: a live PostgreSQL mirror of a flespi account over MQTT 5.

The package is in wings that follow a message's way (tests/test_layout.py keeps the rules):

- ``session``: the daemon's own MQTT 5 session (bytes, topic and properties in; acks out).
- ``decode``: what a topic and payload mean, and the typed record each becomes.
- ``store``: batches coalesced and written to PostgreSQL; the schema, history and compaction.
- ``repair``: what the live stream missed, fetched over flespi's REST API.
- ``ops``: options, settings, metrics and health, errors told in words.
- ``sim``: a flespi stand-in (traffic, REST responder) for tests, benchmarks, the quick start.

At the top: ``pipeline`` (session -> decode -> store -> ack, and the daemon's helpers),
``snapshot`` (the retained state for shared subscriptions), ``workers`` (the ``--workers``
supervisor) and ``cli``.
"""

__version__ = "0.1.0"
