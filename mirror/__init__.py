"""flespi-mirror: a live PostgreSQL mirror of a flespi account over MQTT 5."""

__version__ = "0.1.0"
