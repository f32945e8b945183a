"""Every option of every command, declared once.

A declaration names the setting (the field of :class:`~mirror.config.Settings`, or of
:class:`~mirror.simulate.SimulationOptions` for ``simulate``), how a value is parsed, its
environment variable and its help. The default is the field's default. From the declarations
come the argparse flags, the ``--help`` text (every flag shows its variable), the option tables
of docs/configuration.md (a test compares them), and the environment a ``--workers`` supervisor
hands its workers.

A value is taken from, in order: the flag, the flag's ``--X-file`` (secrets), the variable, the
variable's ``X_FILE`` (secrets, as Kubernetes mounts them), a ``.env`` file in the working
directory, the default. A value that does not parse names its flag or variable.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from mirror.ops.config import ConfigError, ReplayOptions, Secret, Settings
from mirror.ops.resync_options import BackfillRequest, ReconcileRequest

Kind = Literal["value", "switch", "switch_off", "list"]
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


def target(command: str) -> type[Any]:
    """The settings class a command's options fill (simulate's is imported only when used:
    the daemon's start, before it handles SIGTERM, should import as little as it can)."""
    if command == "simulate":
        from mirror.sim.simulate import SimulationOptions

        return SimulationOptions
    return {
        "backfill": BackfillRequest,
        "reconcile": ReconcileRequest,
        "replay-dead-letters": ReplayOptions,
    }.get(command, Settings)


# The commands that talk to the broker and the database like the daemon (REST over MQTT).
RESYNC = ("backfill", "reconcile")


def text(value: str) -> str:
    return value


def integer(value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError("expected a whole number") from None


def number(value: str) -> float:
    try:
        return float(value.strip())
    except ValueError:
        raise ValueError("expected a number") from None


def iso_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError("expected an ISO 8601 time, e.g. 2026-03-10T12:00:00+00:00") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def secret(value: str) -> Secret:
    return Secret(value)


def words(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def switch(value: str) -> bool:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"expected one of {', '.join(TRUE_WORDS + FALSE_WORDS[:-1])}")


_UNSET: Any = object()


@dataclass(frozen=True)
class Option:
    """One setting: its field, parser, flag, variable and help."""

    name: str
    help: str
    parse: Callable[[str], Any] = text
    kind: Kind = "value"
    env: str | None = ""  # "": MIRROR_<NAME>; None: no variable
    flag: str = ""  # "": --name-with-dashes
    commands: tuple[str, ...] = ("run",)
    choices: tuple[str, ...] = ()
    secret: bool = False  # masked; also read from --X-file and X_FILE
    hidden: bool = False  # internal (the supervisor's --worker)
    to_workers: bool = True  # a --workers supervisor hands it to each worker
    metavar: str | None = None
    default: Any = _UNSET  # only when it differs from the field's default

    @property
    def variable(self) -> str | None:
        if self.env is None:
            return None
        return self.env or "MIRROR_" + self.name.upper()

    @property
    def option_string(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def default_for(self, command: str) -> Any:
        if self.default is not _UNSET:
            return self.default
        # The command's own settings first; Settings holds what every command shares (logging).
        for settings_class in (target(command), Settings):
            for f in dataclasses.fields(settings_class):
                if f.name != self.name:
                    continue
                if f.default is not dataclasses.MISSING:
                    return f.default
                if f.default_factory is not dataclasses.MISSING:
                    return f.default_factory()
        raise LookupError(f"{self.name} is not a field of {target(command).__name__}")

    def render(self, value: Any) -> str:
        """The value as its variable would spell it (for the workers' environment)."""
        if isinstance(value, Secret):
            return value.reveal()
        if isinstance(value, bool):
            return "1" if (value if self.kind == "switch" else not value) else "0"
        if isinstance(value, tuple):
            return ",".join(value)
        return "" if value is None else str(value)

    def convert(self, raw: str, source: str) -> Any:
        try:
            if self.kind == "switch":
                return switch(raw)
            if self.kind == "switch_off":
                return not switch(raw)
            if self.kind == "list":
                return words(raw)
            value = self.parse(raw)
        except ValueError as exc:
            shown = "***" if self.secret else repr(raw)
            raise ConfigError(f"{source}={shown}: {exc}") from None
        if self.choices and value not in self.choices:
            raise ConfigError(f"{source}={value!r}: use one of {', '.join(self.choices)}")
        return value


# The declarations. Help says what and why; flags, variables and defaults are added to it.
OPTIONS: tuple[Option, ...] = (
    Option(
        "database_url",
        "PostgreSQL URL (postgresql://user@host:5432/db?sslmode=verify-full). libpq's URL "
        "parameters (sslmode, sslrootcert, sslcert, sslkey, application_name, options, "
        "connect_timeout) are honoured. Without it, an embedded PostgreSQL is started.",
        parse=secret,
        commands=("run", "migrate", "replay-dead-letters", *RESYNC),
        secret=True,
        metavar="URL",
    ),
    Option(
        "schema",
        "PostgreSQL schema holding the mirror's tables; several mirrors can share a database.",
        commands=("run", "migrate", "replay-dead-letters", *RESYNC),
    ),
    Option(
        "data_dir",
        "Data directory of the embedded PostgreSQL (used without a database URL; default: "
        "the user data directory).",
        commands=("run", "migrate", "replay-dead-letters", *RESYNC),
        metavar="DIR",
    ),
    Option(
        "log_level",
        "Least severe log level shown.",
        parse=str.lower,
        commands=("run", "migrate", "replay-dead-letters", "simulate", *RESYNC),
        choices=("debug", "info", "warning", "error"),
    ),
    Option(
        "log_format",
        "text for people, json for log collectors (one object per line).",
        commands=("run", "migrate", "replay-dead-letters", "simulate", *RESYNC),
        choices=("text", "json"),
    ),
    Option(
        "mqtt_url",
        "Broker: mqtts:// is TLS with certificate verification, mqtt:// plain; MQTT over "
        "WebSockets: wss://host:443/path (TLS, verified) or ws://host:80/path, for networks that "
        "only let 443 out. Use ru-mqtt.flespi.io for the RU region. User info "
        "(user:password@) is refused: pass the token with --token-file.",
        metavar="URL",
        commands=("run", *RESYNC),
    ),
    Option(
        "token",
        "flespi token, sent as the MQTT username; never logged. Prefer --token-file or a "
        "variable: a flag's value shows in the process list.",
        parse=secret,
        env="FLESPI_TOKEN",
        secret=True,
        commands=("run", *RESYNC),
    ),
    Option(
        "token_in_password",
        "Send the token as the MQTT password instead.",
        kind="switch",
        commands=("run", *RESYNC),
    ),
    Option(
        "allow_plain_token",
        "Allow sending the token to a flespi host over plain mqtt://.",
        kind="switch",
        commands=("run", *RESYNC),
    ),
    Option(
        "ca_file",
        "CA bundle to verify the broker's TLS certificate (default: the system's CAs).",
        metavar="FILE",
        commands=("run", *RESYNC),
    ),
    Option(
        "client_id",
        "MQTT client id; the persistent session is keyed on it. Default: stable, derived from "
        "broker, token and schema.",
        to_workers=False,
        commands=("run", *RESYNC),
    ),
    Option(
        "topics",
        "Subscription filter (repeatable; any flespi filter syntax). The variable takes a "
        "comma-separated list.",
        kind="list",
        flag="--topic",
        metavar="FILTER",
    ),
    Option(
        "logs",
        "Also mirror flespi's platform logs (flespi/log/#) into platform_logs.",
        kind="switch",
    ),
    Option(
        "cids",
        "Mirror only this flespi account (repeatable): each --topic is subscribed under "
        "flespi's $filter/cid=ID/ prefix, and backfill, reconcile and the daemon's gap repair "
        "ask flespi only for this account's items (selector cid=ID) and leave other accounts' "
        "rows alone. Default: every account the token sees. The variable takes a "
        "comma-separated list.",
        kind="list",
        flag="--cid",
        metavar="ID",
        commands=("run", *RESYNC),
    ),
    Option("metrics_host", "Address of the HTTP listener (/metrics, /healthz, /readyz)."),
    Option("metrics_port", "Port of that listener (0: any free port).", parse=integer),
    Option(
        "session_expiry", "Seconds the broker keeps our session while we are away.", parse=integer
    ),
    Option(
        "keepalive",
        "MQTT keepalive in seconds: a connection silent for 1.5x this long is dropped and "
        "reconnected, and /readyz turns 503 meanwhile.",
        parse=integer,
    ),
    Option(
        "max_unacked",
        "Messages held unacknowledged at most: the memory bound. Also sent as MQTT 5 "
        "ReceiveMaximum (capped at 65535).",
        parse=integer,
    ),
    Option(
        "max_unacked_bytes",
        "Bytes (as received) held unacknowledged at most: the memory bound in bytes. Also sent "
        "as MQTT 5 Maximum Packet Size. See docs/sizing.md.",
        parse=integer,
    ),
    Option("batch_size", "Messages per transaction at most.", parse=integer),
    Option(
        "max_batch_bytes",
        "Bytes per transaction at most (a larger single message still goes alone).",
        parse=integer,
    ),
    Option(
        "flush_interval", "Seconds to wait for a batch to fill before committing it.", parse=number
    ),
    Option(
        "max_payload_bytes",
        "Larger payloads go to dead_letters (which keep the payload up to this size).",
        parse=integer,
        commands=("run", "replay-dead-letters"),
    ),
    Option(
        "reasons",
        "Replay only dead letters with this reason (repeatable), e.g. database_rejected; "
        "default every reason.",
        kind="list",
        flag="--reason",
        env=None,
        commands=("replay-dead-letters",),
        metavar="REASON",
    ),
    Option(
        "since",
        "Replay only dead letters received at or after this ISO 8601 time (UTC without an "
        "offset), e.g. 2026-03-10T12:00:00+00:00.",
        parse=iso_time,
        env=None,
        commands=("replay-dead-letters",),
        metavar="TIME",
    ),
    Option(
        "migrate",
        "Do not run migrations on start (run 'flespi-mirror migrate' separately).",
        kind="switch_off",
        flag="--no-migrate",
        env="MIRROR_NO_MIGRATE",
        to_workers=False,
    ),
    Option(
        "retention_days",
        "Drop history (messages) older than this many days, a day partition at a time; "
        "0 keeps it forever.",
        parse=integer,
    ),
    Option(
        "stall_after",
        "Seconds without a commit while messages wait (a lock, a statement that never ends, a "
        "frozen link after the broker sent them) before /readyz answers 503 'stalled' and "
        "flespi_mirror_stalled_seconds says so; 0 turns the check off.",
        parse=number,
    ),
    Option(
        "shutdown_timeout",
        "Seconds a stop (SIGTERM) may take to commit and acknowledge what is in hand; past it "
        "(and 5 s of grace) the process logs what it was waiting on and exits, leaving the rest "
        "unacknowledged for the broker to deliver again. Keep it below the pod's "
        "terminationGracePeriodSeconds.",
        parse=number,
    ),
    Option(
        "compact_after",
        "Pack device and channel messages older than this many hours into one compressed row "
        "per device (channel and ident) and hour, about a tenth of the size (docs/sizing.md), "
        "once their hour is over by this long; 0 leaves every message a row of its own.",
        parse=number,
    ),
    Option(
        "tombstone_days",
        "Remember deletions this long, so late redeliveries cannot resurrect rows. Keep it "
        "above the session expiry; 0 keeps them forever.",
        parse=integer,
    ),
    Option(
        "share_group",
        "Subscribe as a member of this MQTT 5 shared subscription group ($share/NAME/...; "
        "flespi's sticky NAME:COUNT passes through).",
        to_workers=False,
    ),
    Option(
        "workers",
        "Worker processes, members of one shared subscription group (--share-group, default "
        "derived from the client id); one /metrics for all.",
        parse=integer,
        to_workers=False,
    ),
    Option(
        "resync",
        "Ask the broker for every retained message again on this start (a full snapshot).",
        kind="switch",
    ),
    Option(
        "repair_gaps",
        "When the broker did not keep our session, do not backfill the gap from flespi's "
        "storage nor reconcile state over REST (see 'backfill' and 'reconcile').",
        kind="switch_off",
        flag="--no-gap-repair",
        env="MIRROR_NO_GAP_REPAIR",
    ),
    Option(
        "repair_overlap",
        "Seconds before the newest stored message that a gap repair fetches again (devices "
        "that report late).",
        parse=number,
    ),
    Option("worker", "", kind="switch", env=None, hidden=True, to_workers=False),
    # backfill and reconcile
    Option(
        "begin",
        "Start of the window: Unix seconds or ISO 8601 (UTC unless it names a zone). Required.",
        flag="--from",
        env=None,
        commands=("backfill",),
        metavar="TIME",
    ),
    Option(
        "end",
        "End of the window (default: now). Run again with the same --from and --to, a killed "
        "backfill resumes.",
        flag="--to",
        env=None,
        commands=("backfill",),
        metavar="TIME",
    ),
    Option(
        "devices",
        "A device id (repeatable). Default: every device flespi lists.",
        kind="list",
        flag="--device",
        env=None,
        commands=("backfill",),
        metavar="ID",
    ),
    Option(
        "intervals",
        "Fetch device messages only, not calculator intervals.",
        kind="switch_off",
        flag="--no-intervals",
        env=None,
        commands=("backfill",),
    ),
    Option(
        "page_size", "Messages per REST answer.", parse=integer, env=None, commands=("backfill",)
    ),
    Option(
        "max_delete_fraction",
        "Refuse to delete more than this share of a table's rows (a token that lost its rights "
        "lists nothing).",
        parse=number,
        env=None,
        commands=("reconcile",),
    ),
    # simulate
    Option(
        "mqtt_url",
        "Broker to publish to: mqtt://host:port or mqtts://host:port.",
        commands=("simulate",),
        metavar="URL",
    ),
    Option("username", "MQTT username.", env=None, commands=("simulate",)),
    Option("password", "MQTT password.", env=None, commands=("simulate",)),
    Option("devices", "Devices to simulate.", parse=integer, env=None, commands=("simulate",)),
    Option(
        "rate",
        "Live messages per second overall (0: as fast as possible).",
        parse=number,
        env=None,
        commands=("simulate",),
    ),
    Option("duration", "Seconds of live traffic.", parse=number, env=None, commands=("simulate",)),
    Option("seed", "Random seed.", parse=integer, env=None, commands=("simulate",)),
    Option(
        "retained_snapshot",
        "Skip publishing the retained state first.",
        kind="switch_off",
        flag="--no-snapshot",
        env=None,
        commands=("simulate",),
    ),
    Option(
        "drop_session",
        "After the traffic, do to this MQTT client id what flespi does to a session past its "
        "limit of unacknowledged messages: disconnect it, keeping its session (the broker's "
        "own limits, e.g. Mosquitto's max_queued_messages, drop what is over).",
        env=None,
        commands=("simulate",),
        metavar="CLIENT_ID",
    ),
    Option(
        "answer_rest",
        "Also answer flespi's REST API over MQTT (flespi/rest/...) from the simulated account's "
        "record, and keep answering after the traffic until interrupted.",
        kind="switch",
        env=None,
        commands=("simulate",),
    ),
)


def options_for(command: str) -> tuple[Option, ...]:
    return tuple(o for o in OPTIONS if command in o.commands)


def _shown_default(option: Option, command: str) -> str:
    value = option.default_for(command)
    if option.kind in ("switch", "switch_off") or value is None or option.secret:
        return ""
    if isinstance(value, tuple):
        return ", ".join(value)
    return str(value)


def help_text(option: Option, command: str) -> str:
    parts = [option.help]
    if option.variable:
        file_note = f" (or {option.variable}_FILE)" if option.secret else ""
        parts.append(f"Env {option.variable}{file_note}.")
    default = _shown_default(option, command)
    if default:
        parts.append(f"Default {default}.")
    return " ".join(p for p in parts if p).replace("%", "%%")


# ---------------------------------------------------------------------------------------------
# argparse


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line, naming what to read next."""

    def error(self, message: str) -> Any:  # argparse's signature returns NoReturn
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """Flags for ``command``'s options; every one defaults to None ("not on the line")."""
    for option in options_for(command):
        if option.hidden:
            parser.add_argument(option.option_string, action="store_true", help=argparse.SUPPRESS)
            continue
        help_ = help_text(option, command)
        if option.kind in ("switch", "switch_off"):
            parser.add_argument(
                option.option_string, dest=option.name, action="store_const", const="1",
                default=None, help=help_,
            )  # fmt: skip
        elif option.kind == "list":
            parser.add_argument(
                option.option_string, dest=option.name, action="append", default=None,
                metavar=option.metavar, help=help_,
            )  # fmt: skip
        else:
            parser.add_argument(
                option.option_string, dest=option.name, default=None,
                metavar=option.metavar or _metavar(option), help=help_,
            )  # fmt: skip
        if option.secret:
            parser.add_argument(
                option.option_string + "-file", dest=option.name + "__file", default=None,
                metavar="FILE", help=f"Read {option.option_string} from this file.",
            )  # fmt: skip


def _metavar(option: Option) -> str:
    return "{" + ",".join(option.choices) + "}" if option.choices else option.name.upper()


def _read_secret_file(path: str, source: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{source} {path}: cannot read it ({exc.strerror or exc})") from None


def resolve(command: str, args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """Every option of ``command`` with its value, from the flags, ``environ`` or the default."""
    values: dict[str, Any] = {}
    for option in options_for(command):
        values[option.name] = _resolve_one(option, command, vars(args), environ)
    return values


def _resolve_one(
    option: Option, command: str, flags: Mapping[str, Any], environ: Mapping[str, str]
) -> Any:
    flag = option.option_string
    given = flags.get(option.name)
    if option.hidden:
        return bool(given)
    if given is not None:
        if option.kind == "list":
            return tuple(given)
        if option.kind in ("switch", "switch_off"):
            return option.kind == "switch"
        return option.convert(given, flag)
    if option.secret and flags.get(option.name + "__file"):
        path = flags[option.name + "__file"]
        return option.convert(_read_secret_file(path, flag + "-file"), flag + "-file")
    variable = option.variable
    if variable and environ.get(variable, "") != "":
        return option.convert(environ[variable], variable)
    if variable and option.secret and environ.get(variable + "_FILE"):
        path = environ[variable + "_FILE"]
        return option.convert(_read_secret_file(path, variable + "_FILE"), variable + "_FILE")
    return option.default_for(command)


def environment(dotenv: Path | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The process environment over the ``.env`` file's variables (when the file exists)."""
    merged: dict[str, str] = {}
    if dotenv is not None and dotenv.is_file():
        from dotenv import dotenv_values

        merged.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
    merged.update(environ)
    return merged


# ---------------------------------------------------------------------------------------------
# What is derived for people and for workers


# run, backfill and reconcile talk to the broker and the database alike: the options all three
# take are documented once, in the "shared" table, and each command's table has only its own.
SHARED_TABLE = "shared"
SHARING_COMMANDS = ("run", *RESYNC)


def shared_options() -> tuple[Option, ...]:
    """The options every command of :data:`SHARING_COMMANDS` takes."""
    return tuple(o for o in options_for("run") if all(c in o.commands for c in SHARING_COMMANDS))


def table_options(table: str) -> tuple[Option, ...]:
    """The rows of the docs' option table ``table``: the shared one, or a command's own."""
    if table == SHARED_TABLE:
        return shared_options()
    own = options_for(table)
    if table in SHARING_COMMANDS:
        shared = shared_options()
        return tuple(o for o in own if o not in shared)
    return own


def markdown_table(table: str) -> str:
    """The docs' option table ``table`` (docs/configuration.md; a test compares them)."""
    command = SHARING_COMMANDS[0] if table == SHARED_TABLE else table
    rows = ["| Flag | Environment variable | Default | Meaning |", "| --- | --- | --- | --- |"]
    for option in table_options(table):
        if option.hidden:
            continue
        flag = f"`{option.option_string}`"
        if option.secret:
            flag += f", `{option.option_string}-file`"
        variable = f"`{option.variable}`" if option.variable else ""
        if option.variable and option.secret:
            variable += f", `{option.variable}_FILE`"
        default = _shown_default(option, command)
        if option.kind in ("switch", "switch_off"):
            default = "off"
        rows.append(
            f"| {flag} | {variable} | {f'`{default}`' if default else ''} | {option.help} |"
        )
    return "\n".join(rows)


def worker_environment(settings: Settings, overrides: Mapping[str, str]) -> dict[str, str]:
    """Every run option's variable as a worker must see it, secrets included (never argv)."""
    env: dict[str, str] = {}
    for option in options_for("run"):
        if option.variable and option.to_workers:
            env[option.variable] = option.render(getattr(settings, option.name))
    env.update(overrides)
    return env


def settings_fields(values: Mapping[str, Any], target: type[Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(target)}
    return {k: v for k, v in values.items() if k in names}


def variables() -> Iterable[str]:
    """Every variable an option reads (for the docs and tests)."""
    for option in OPTIONS:
        if option.variable:
            yield option.variable
