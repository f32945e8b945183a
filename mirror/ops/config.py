"""Settings of the daemon, and the one place where URLs and secrets are interpreted.

Every option has a flag and an environment variable (see ``cli.py`` and the README). Secrets are
wrapped in :class:`Secret` so that neither ``repr`` nor a log line nor an exception can show them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

DEFAULT_MQTT_URL = "mqtts://mqtt.flespi.io:8883"
DEFAULT_TOPICS = ("flespi/state/#", "flespi/message/#", "flespi/interval/#")
LOG_TOPIC = "flespi/log/#"  # platform logs: subscribed with --logs
FILTER_PREFIX = "$filter/"  # flespi's subscription filter: $filter/cid=N/<topic filter>
DEFAULT_SCHEMA = "flespi"
FLESPI_HOST_SUFFIX = "flespi.io"
SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
PACKET_OVERHEAD_BYTES = 64 * 1024  # topic (<= 64 KiB by MQTT) and properties of one PUBLISH
SHARE_GROUP = re.compile(r"^[A-Za-z0-9_-]+(:[0-9]+){0,2}$")


class ConfigError(ValueError):
    """A setting is missing or wrong; the message says which and how to fix it.

    ``setting`` names the option (a :class:`Settings` field) when one is to blame, so the command
    line can name its flag and environment variable.
    """

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


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


SCHEMES = {  # scheme: (TLS, WebSocket, default port)
    "mqtt": (False, False, 1883),
    "tcp": (False, False, 1883),
    "mqtts": (True, False, 8883),
    "ssl": (True, False, 8883),
    "ws": (False, True, 80),
    "wss": (True, True, 443),
}


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    websocket: bool = False
    path: str = "/"

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        if "@" in parts.netloc:
            # Never used silently: the token goes in --token-file / FLESPI_TOKEN, not in a URL
            # that shows in the process list and in every log line naming the broker.
            raise ConfigError(
                "user info in the broker URL is not used: remove 'user:password@' and pass the "
                "token with --token-file or FLESPI_TOKEN",
                setting="mqtt_url",
            )
        shown = redact_mqtt_url(url)
        if parts.scheme not in SCHEMES:
            raise ConfigError(
                f"{shown!r}: the scheme must be mqtt:// (plain), mqtts:// (TLS), "
                "ws:// (WebSockets) or wss:// (WebSockets over TLS)",
                setting="mqtt_url",
            )
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"{shown!r}: the port is not a number", setting="mqtt_url") from None
        if not parts.hostname:
            raise ConfigError(f"{shown!r}: no host", setting="mqtt_url")
        tls, websocket, default_port = SCHEMES[parts.scheme]
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.hostname, port or default_port, tls, websocket, path)

    @property
    def scheme(self) -> str:
        return (
            ("wss" if self.tls else "ws") if self.websocket else ("mqtts" if self.tls else "mqtt")
        )

    @property
    def websocket_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    def __str__(self) -> str:
        """For log lines: scheme, host, port (and path), never credentials."""
        path = self.path.split("?", 1)[0] if self.websocket else ""
        return f"{self.scheme}://{self.host}:{self.port}{path}"

    @property
    def is_flespi(self) -> bool:
        return self.host == FLESPI_HOST_SUFFIX or self.host.endswith("." + FLESPI_HOST_SUFFIX)


def _without_filter_prefix(topic: str) -> str:
    """The topic filter behind flespi's ``$filter/<condition>/`` prefix, if it has one."""
    if topic.startswith(FILTER_PREFIX):
        return topic[len(FILTER_PREFIX) :].partition("/")[2]
    return topic


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
    logs: bool = False  # also subscribe to LOG_TOPIC
    cids: tuple[str, ...] = ()  # flespi account ids: subscribe with $filter/cid=N/ each
    schema: str = DEFAULT_SCHEMA
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9465
    session_expiry: int = 3 * 24 * 3600
    keepalive: int = 30
    max_unacked: int = 20_000
    max_unacked_bytes: int = 64 * 1024 * 1024
    batch_size: int = 5_000
    max_batch_bytes: int = 16 * 1024 * 1024
    flush_interval: float = 0.02
    max_payload_bytes: int = 1024 * 1024
    migrate: bool = True
    data_dir: str | None = None
    shutdown_timeout: float = 15.0
    retention_days: int = 0
    stall_after: float = 30.0  # seconds without a commit while messages wait: not ready
    compact_after: float = 0.25  # hours; 0: history stays one row per message
    compaction_interval: float = 60.0  # seconds between compaction passes once caught up
    compaction_pause: float = 1.0  # sleep this many times a step's duration after it
    compaction_defer: float = 30.0  # most seconds a step waits for a backlog drain to end
    tombstone_days: int = 14
    partition_days_ahead: int = 7
    maintenance_interval: float = 3600.0
    share_group: str | None = None
    snapshot_quiet: float = 2.0
    workers: int = 1
    worker: bool = False  # a process started by a --workers supervisor
    resync: bool = False
    log_level: str = "info"
    log_format: str = "text"
    repair_gaps: bool = True  # after a lost broker session: backfill history, reconcile state
    repair_overlap: float = 3600.0  # seconds before the newest stored message fetched again

    def __post_init__(self) -> None:
        self._check_schema()
        if self.database_url:  # a URL that cannot work fails here, before anything starts
            database_target(self.database_url.reveal())
        broker = BrokerAddress.parse(self.mqtt_url)
        if self.token and broker.is_flespi and not broker.tls and not self.allow_plain_token:
            raise ConfigError(
                f"refusing to send the flespi token in clear text to {broker.host}: use mqtts:// "
                "or pass --allow-plain-token",
                setting="mqtt_url",
            )
        if not self.topics:
            raise ConfigError("at least one subscription filter is needed", setting="topics")
        for cid in self.cids:
            if not cid.isascii() or not cid.isdigit() or int(cid) <= 0:
                raise ConfigError(f"{cid!r}: a flespi account id is a positive number", "cids")
        if self.cids and any(t.startswith(FILTER_PREFIX) for t in self.topics):
            raise ConfigError(
                "--cid puts its own $filter/cid=N/ before each --topic; drop it from the "
                "topics, or drop --cid and keep the $filter/ topics",
                setting="cids",
            )
        for name in (
            "batch_size",
            "max_unacked",
            "max_unacked_bytes",
            "max_batch_bytes",
            "max_payload_bytes",
            "keepalive",
            "workers",
            "shutdown_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"must be positive, not {getattr(self, name)}", setting=name)
        for name in (
            "retention_days", "tombstone_days", "session_expiry", "compact_after", "stall_after"
        ):
            if getattr(self, name) < 0:
                raise ConfigError("must be 0 or positive", setting=name)
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError("a TCP port is 0 to 65535", setting="metrics_port")
        if self.share_group is not None and not SHARE_GROUP.match(self.share_group):
            raise ConfigError(
                f"{self.share_group!r}: a name, optionally with flespi's sticky "
                "suffix :COUNT or :FROM:COUNT (letters, digits, '_' and '-')",
                setting="share_group",
            )
        if self.batch_size > self.max_unacked:
            raise ConfigError(
                f"{self.batch_size} exceeds the unacknowledged bound ({self.max_unacked})",
                setting="batch_size",
            )
        if self.max_unacked_bytes < self.max_payload_bytes + PACKET_OVERHEAD_BYTES:
            raise ConfigError(
                f"{self.max_unacked_bytes} cannot hold one largest message: at least "
                f"max payload bytes + {PACKET_OVERHEAD_BYTES}",
                setting="max_unacked_bytes",
            )
        if self.max_batch_bytes > self.max_unacked_bytes:
            raise ConfigError(
                f"{self.max_batch_bytes} exceeds the unacknowledged bound in bytes "
                f"({self.max_unacked_bytes})",
                setting="max_batch_bytes",
            )
        if self.keepalive > 65535:
            raise ConfigError("at most 65535 seconds (MQTT's limit)", setting="keepalive")

    @property
    def max_packet_bytes(self) -> int:
        """MQTT 5 Maximum Packet Size we send in CONNECT: the memory bound itself. The broker
        never sends a larger packet (MQTT 5: it discards it), so one message cannot break the
        bound; a payload above ``max_payload_bytes`` but within it still reaches dead_letters."""
        return self.max_unacked_bytes

    def _check_schema(self) -> None:
        if SCHEMA_NAME.match(self.schema):
            return
        if self.schema and not self.schema[0].isdigit() and self.schema.lower() == self.schema:
            why = "use lower-case letters, digits and '_' only, at most 63"
        elif self.schema[:1].isdigit():
            why = "a schema name must start with a letter or '_' (PostgreSQL would need quotes)"
        elif not self.schema:
            why = "empty"
        else:
            why = "use lower-case letters, digits and '_' only (upper case would need quotes)"
        raise ConfigError(f"{self.schema!r}: {why}", setting="schema")

    def require_token(self) -> None:
        """flespi refuses a connection without a token: say so now, not after a retry loop."""
        if self.broker.is_flespi and not self.token:
            raise ConfigError(
                f"{self.broker.host} needs a flespi token: put it in a file and pass "
                "--token-file FILE (or FLESPI_TOKEN_FILE), or set FLESPI_TOKEN or a .env line "
                "FLESPI_TOKEN=...",
                setting="token",
            )

    @property
    def filters(self) -> tuple[str, ...]:
        """--topic filters, plus the platform logs' with --logs; with --cid, each filter once
        per account under flespi's ``$filter/cid=N/`` prefix."""
        topics = self.topics
        if self.logs and LOG_TOPIC not in self.topics:
            topics = (*topics, LOG_TOPIC)
        return self._for_accounts(topics)

    @property
    def accounts(self) -> tuple[int, ...]:
        """The flespi accounts of --cid, as numbers (validated above)."""
        return tuple(int(cid) for cid in self.cids)

    def _for_accounts(self, topics: tuple[str, ...]) -> tuple[str, ...]:
        if not self.cids:
            return topics
        return tuple(f"{FILTER_PREFIX}cid={cid}/{t}" for cid in self.cids for t in topics)

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """The filters as subscribed: in a shared subscription group when one is set."""
        if not self.share_group:
            return self.filters
        return tuple(f"$share/{self.share_group}/{topic}" for topic in self.filters)

    @property
    def snapshot_topics(self) -> tuple[str, ...]:
        """Filters that can carry retained state (what a snapshot must subscribe to)."""
        return self._for_accounts(
            tuple(
                t
                for t in self.topics
                if not _without_filter_prefix(t).startswith(
                    ("flespi/message/", "flespi/interval/", "flespi/log/")
                )
            )
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
#
# Managed PostgreSQL services hand out libpq URLs (``?sslmode=require&sslrootcert=...``). asyncpg
# parses most of libpq's URL parameters itself when given the URL as its DSN; the few it does not
# are mapped here, and any other is refused by name, as libpq refuses it, rather than being sent
# to the server as a setting it does not know.

# Parameters asyncpg's DSN parser understands (asyncpg/connect_utils.py).
_ASYNCPG_DSN_PARAMETERS = frozenset(
    (
        "host", "port", "dbname", "database", "user", "password", "passfile", "service",
        "sslmode", "sslcert", "sslkey", "sslrootcert", "sslcrl", "sslpassword", "sslnegotiation",
        "ssl_min_protocol_version", "ssl_max_protocol_version", "target_session_attrs",
        "krbsrvname", "gsslib",
    )
)  # fmt: skip
# libpq parameters that become a server setting of the connection's start-up packet.
_STARTUP_PARAMETERS = frozenset(("application_name", "options"))
_SECRET_PARAMETERS = frozenset(("password", "sslpassword"))
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class ReplayOptions:
    """What ``replay-dead-letters`` takes beyond the database options
    (mirror/store/dead_letters.py)."""

    reasons: tuple[str, ...] = ()
    since: datetime | None = None


@dataclass(frozen=True)
class DatabaseTarget:
    """What ``asyncpg.connect`` needs for a libpq URL: its DSN, start-up settings, timeout."""

    dsn: str = field(repr=False)
    server_settings: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None

    def connect_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"dsn": self.dsn}
        if self.server_settings:
            kwargs["server_settings"] = dict(self.server_settings)
        if self.timeout is not None:
            kwargs["timeout"] = self.timeout
        return kwargs


def database_target(url: str) -> DatabaseTarget:
    """Interpret a ``postgresql://`` URL with libpq's parameters; errors never show a secret."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in _SCHEMES:
        raise ConfigError(f"{redact_url(url)!r}: not a postgresql:// URL", setting="database_url")
    if "," not in parts.netloc:  # libpq's multi-host lists have no single port to check
        try:
            parts.port  # noqa: B018 - parsing it is the check
        except ValueError:
            raise ConfigError(
                f"{redact_url(url)!r}: the port is not a number", setting="database_url"
            ) from None
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ConfigError(
            f"{redact_url(url)!r}: the query (after '?') is not name=value pairs joined by '&'",
            setting="database_url",
        ) from None
    kept: list[tuple[str, str]] = []
    settings: dict[str, str] = {}
    timeout: float | None = None
    for name, value in query:
        if name == "sslmode" and value not in _SSLMODES:
            raise ConfigError(
                f"sslmode={value!r} in the URL: use one of {', '.join(_SSLMODES)}",
                setting="database_url",
            )
        if name in _ASYNCPG_DSN_PARAMETERS:
            kept.append((name, value))
        elif name in _STARTUP_PARAMETERS:
            settings[name] = value
        elif name == "fallback_application_name":
            settings.setdefault("application_name", value)
        elif name == "connect_timeout":
            try:
                timeout = float(value) if float(value) > 0 else None
            except ValueError:
                raise ConfigError(
                    f"connect_timeout={value!r} in the URL: expected seconds",
                    setting="database_url",
                ) from None
        else:
            raise ConfigError(
                f"the URL parameter {name!r} is not supported (supported: "
                + ", ".join(sorted(_ASYNCPG_DSN_PARAMETERS | _STARTUP_PARAMETERS))
                + ", fallback_application_name, connect_timeout)",
                setting="database_url",
            )
    dsn = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(kept), ""))
    return DatabaseTarget(dsn, settings, timeout)


def redact_url(url: str) -> str:
    """The URL with every credential masked: the password in the user info and in the query."""
    parts = urlsplit(url.strip())
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    try:
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        query = []
    masked = [(k, "***" if k in _SECRET_PARAMETERS else v) for k, v in query]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(masked, safe="*/:"), ""))


def psql_url(url: str, schema: str) -> str:
    """``url`` for people to paste into psql: libpq's ``options`` sets the search path, so the
    README's unqualified queries (``SELECT * FROM devices``) find the mirror's schema."""
    parts = urlsplit(url)
    option = "options=" + quote(f"-csearch_path={schema}", safe="")
    query = f"{parts.query}&{option}" if parts.query else option
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def redact_mqtt_url(url: str) -> str:
    """A broker URL with any user info masked."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def asyncpg_connect_kwargs(url: str) -> dict[str, Any]:
    """Keyword arguments for ``asyncpg.connect`` from a PostgreSQL URL."""
    return database_target(url).connect_kwargs()
