"""What a failure while starting means: wait for the database, or stop with one clear line.

Only a database that cannot be reached is waited for (refused or reset connections, timeouts,
a server starting up or out of connection slots). A database that answers "no" (no such
database, authentication failed, permission denied, a certificate that does not verify) is a
configuration error: waiting would hide it, so the daemon stops with one line naming the
setting and what to do, and exits 2. Anything else is a bug and crashes loudly, with its
traceback: it must not look like an outage.
"""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass

# SQLSTATEs of a server that is there but cannot take us yet.
_UNREACHABLE_SQLSTATES = {"57P03", "53300", "08000", "08001", "08003", "08004", "08006"}
_UNREACHABLE_ERRNOS = {
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ETIMEDOUT, errno.EPIPE, errno.ENOENT,
}  # fmt: skip
_DATABASE_SETTING = "--database-url / MIRROR_DATABASE_URL"
_BROKER_SETTING = "--mqtt-url / MIRROR_MQTT_URL"


@dataclass(frozen=True)
class Fatal:
    """One line for the log, and the exit status."""

    message: str
    exit_code: int = 2


class BrokerUnreachable(Exception):
    """No MQTT session could be had (the connection could not be opened, or a command got no
    session in time); the message names the broker and what to check."""

    @classmethod
    def opening(cls, where: str, cause: BaseException) -> BrokerUnreachable:
        """The connection to ``where`` could not be opened (refused, no such host, timeout,
        TLS)."""
        reason = str(cause) or type(cause).__name__
        return cls(f"cannot connect to the broker at {where} ({reason}): {broker_hint(cause)}")


def error_chain(exc: BaseException) -> list[BaseException]:
    """The exception and what it wraps: SQLAlchemy's ``orig``, causes, and contexts that
    Python shows (not those hidden by ``raise ... from None``)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        context = None if current.__suppress_context__ else current.__context__
        current = getattr(current, "orig", None) or current.__cause__ or context
    return chain


def sqlstate(exc: BaseException) -> str | None:
    for error in error_chain(exc):
        state = getattr(error, "sqlstate", None)
        if isinstance(state, str) and state:
            return state
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def database_unreachable(exc: BaseException) -> bool:
    """True when the database is away (retry), False when it answered or the code is wrong."""
    state = sqlstate(exc)
    if state is not None:
        return state in _UNREACHABLE_SQLSTATES
    for error in error_chain(exc):
        if isinstance(error, ssl.SSLCertVerificationError | PermissionError):
            return False
        if isinstance(error, FileNotFoundError) and error.filename:
            return False  # a certificate or key file named in the URL: not an outage
        if isinstance(error, socket.gaierror):
            return True  # a name that does not resolve yet (DNS of a starting cluster)
        if isinstance(error, TimeoutError | ConnectionError):
            return "rejected SSL upgrade" not in str(error)
        if isinstance(error, OSError) and (
            error.errno in _UNREACHABLE_ERRNOS or error.errno is None
        ):
            return True
    return False


def describe(exc: BaseException) -> Fatal | None:
    """One line for a configuration error met while starting; None for a bug."""
    if database_unreachable(exc):
        return Fatal(
            f"the database cannot be reached ({_first_line(exc)}): check the host and port in "
            f"{_DATABASE_SETTING} and that the server runs",
            exit_code=1,
        )
    if isinstance(exc, BrokerUnreachable):
        return Fatal(str(exc), exit_code=1)
    state = sqlstate(exc)
    if state is not None:
        return _describe_sqlstate(state, exc)
    for error in error_chain(exc):
        if isinstance(error, ssl.SSLCertVerificationError):
            return Fatal(
                f"the database's TLS certificate did not verify ({error.verify_message}): "
                f"set sslrootcert= to its CA in {_DATABASE_SETTING}, or sslmode=require to "
                "encrypt without verifying"
            )
        if isinstance(error, FileNotFoundError | PermissionError) and error.filename:
            return Fatal(
                f"cannot read {error.filename} ({error.strerror}): check sslrootcert, sslcert "
                f"and sslkey in {_DATABASE_SETTING}"
            )
        if "rejected SSL upgrade" in str(error):
            return Fatal(
                f"the database does not accept TLS ({_first_line(error)}): use sslmode=prefer "
                f"or enable ssl on the server ({_DATABASE_SETTING})"
            )
        if type(error).__name__ == "ClientConfigurationError":
            return Fatal(f"configuration error: {_DATABASE_SETTING}: {_first_line(error)}")
    return None


def _describe_sqlstate(state: str, exc: BaseException) -> Fatal | None:
    detail = next(
        (_first_line(e) for e in error_chain(exc) if getattr(e, "sqlstate", None) == state), ""
    )
    if state == "3D000":
        return Fatal(
            f"{detail}: create it (CREATE DATABASE ...) or fix the database name in "
            f"{_DATABASE_SETTING}"
        )
    if state.startswith("28"):
        return Fatal(
            f"{detail}: check the user and password in {_DATABASE_SETTING} (or its _FILE "
            "variant) and the server's pg_hba.conf"
        )
    if state == "42501":
        return Fatal(
            f"{detail}: migrations need a role that may create the schema and its objects; "
            "run 'flespi-mirror migrate' as the schema's owner and 'run --no-migrate' as a "
            "role with the grants in the README"
        )
    return None


def broker_hint(exc: BaseException) -> str:
    """What to check when no connection to the broker could be opened."""
    for error in error_chain(exc):
        if isinstance(error, ssl.SSLCertVerificationError):
            return (
                "the broker's TLS certificate did not verify: check --ca-file / MIRROR_CA_FILE "
                f"and the host in {_BROKER_SETTING}"
            )
        if isinstance(error, ssl.SSLError):
            return (
                f"TLS failed: check the scheme in {_BROKER_SETTING} (mqtts:// and wss:// speak "
                "TLS, mqtt:// and ws:// do not) and that the port is the broker's TLS port"
            )
    return f"check the host and port in {_BROKER_SETTING} and that the broker is running"
