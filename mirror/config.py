"""Settings of the daemon, and the one place where URLs and secrets are interpreted.

Every option has a flag and an environment variable (see ``cli.py`` and the README). Secrets are
wrapped in :class:`Secret` so that neither ``repr`` nor a log line nor an exception can show them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import URL, make_url

DEFAULT_MQTT_URL = "mqtts://mqtt.flespi.io:8883"
DEFAULT_TOPICS = ("flespi/state/#", "flespi/message/#", "flespi/interval/#")
DEFAULT_SCHEMA = "flespi"
FLESPI_HOST_SUFFIX = "flespi.io"
SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
SHARE_GROUP = re.compile(r"^[A-Za-z0-9_-]+(:[0-9]+){0,2}$")


class ConfigError(ValueError):
    """A setting is missing or wrong; the message says which and how to fix it."""


class Secret:
    """A string that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ConfigError(
                f"--mqtt-url {url!r}: the scheme must be mqtt:// (plain) or mqtts:// (TLS)"
            )
        if not parts.hostname:
            raise ConfigError(f"--mqtt-url {url!r}: no host")
        tls = parts.scheme in ("mqtts", "ssl")
        return cls(parts.hostname, parts.port or (8883 if tls else 1883), tls)

    @property
    def is_flespi(self) -> bool:
        return self.host == FLESPI_HOST_SUFFIX or self.host.endswith("." + FLESPI_HOST_SUFFIX)


@dataclass(frozen=True)
class Settings:
    mqtt_url: str = DEFAULT_MQTT_URL
    token: Secret = field(default_factory=lambda: Secret(""))
    token_in_password: bool = False
    allow_plain_token: bool = False
    ca_file: str | None = None
    database_url: Secret | None = None
    client_id: str | None = None
    topics: tuple[str, ...] = DEFAULT_TOPICS
    schema: str = DEFAULT_SCHEMA
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9465
    session_expiry: int = 3 * 24 * 3600
    keepalive: int = 60
    max_unacked: int = 20_000
    batch_size: int = 5_000
    flush_interval: float = 0.02
    max_payload_bytes: int = 1024 * 1024
    migrate: bool = True
    data_dir: str | None = None
    shutdown_timeout: float = 15.0
    retention_days: int = 0
    tombstone_days: int = 14
    partition_days_ahead: int = 7
    maintenance_interval: float = 3600.0
    share_group: str | None = None
    snapshot_quiet: float = 2.0

    def __post_init__(self) -> None:
        if not SCHEMA_NAME.match(self.schema):
            raise ConfigError(
                f"--schema {self.schema!r}: use lower-case letters, digits and '_' (max 63)"
            )
        broker = BrokerAddress.parse(self.mqtt_url)
        if self.token and broker.is_flespi and not broker.tls and not self.allow_plain_token:
            raise ConfigError(
                f"refusing to send the flespi token in clear text to {broker.host}: use mqtts:// "
                "or pass --allow-plain-token"
            )
        if not self.topics:
            raise ConfigError("--topic: at least one subscription filter is needed")
        for name in ("batch_size", "max_unacked", "max_payload_bytes", "keepalive"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.retention_days < 0:
            raise ConfigError("--retention-days must be 0 (keep forever) or positive")
        if self.share_group is not None and not SHARE_GROUP.match(self.share_group):
            raise ConfigError(
                f"--share-group {self.share_group!r}: a name, optionally with flespi's sticky "
                "suffix :COUNT or :FROM:COUNT (letters, digits, '_' and '-')"
            )
        if self.batch_size > self.max_unacked:
            raise ConfigError("--batch-size cannot exceed --max-unacked")

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """The filters as subscribed: in a shared subscription group when one is set."""
        if not self.share_group:
            return self.topics
        return tuple(f"$share/{self.share_group}/{topic}" for topic in self.topics)

    @property
    def snapshot_topics(self) -> tuple[str, ...]:
        """Filters that can carry retained state (what a snapshot must subscribe to)."""
        return tuple(
            t for t in self.topics if not t.startswith(("flespi/message/", "flespi/interval/"))
        )

    @property
    def broker(self) -> BrokerAddress:
        return BrokerAddress.parse(self.mqtt_url)

    def effective_client_id(self) -> str:
        """Stable across restarts, so the broker keeps our persistent session between runs.

        Derived from what identifies this mirror (broker, account token, target schema), hashed
        so that nothing of the token can be read back from it.
        """
        if self.client_id:
            return self.client_id
        material = "\0".join([self.mqtt_url, self.token.reveal(), self.schema])
        digest = hashlib.sha256(material.encode()).hexdigest()[:16]
        return f"flespi-mirror-{digest}"


# ---------------------------------------------------------------------------------------------
# Database URLs


def sqlalchemy_url(url: str) -> URL:
    """Accept plain ``postgresql://`` / ``postgres://`` URLs and use the asyncpg driver."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ConfigError("--database-url must be a postgresql:// URL")
    return parsed.set(drivername="postgresql+asyncpg")


def redact_url(url: str) -> str:
    """For log lines: the URL with its password masked."""
    return sqlalchemy_url(url).set(drivername="postgresql").render_as_string(hide_password=True)


def asyncpg_connect_kwargs(url: str) -> dict[str, Any]:
    """Keyword arguments for ``asyncpg.connect`` from a plain PostgreSQL URL."""
    parsed = sqlalchemy_url(url)
    kwargs: dict[str, Any] = {
        "user": parsed.username,
        "password": parsed.password,
        "database": parsed.database,
        "host": parsed.host,
        "port": parsed.port,
    }
    host = parsed.query.get("host")
    if host:
        kwargs["host"] = host if isinstance(host, str) else host[0]
    return {k: v for k, v in kwargs.items() if v is not None}
