"""``run --workers N``: N mirror processes, members of one MQTT 5 shared subscription group.

Python runs one core per process, so scaling out on one machine means processes. The supervisor
migrates the database once, starts N workers (each ``flespi-mirror run`` with its own client id
``<id>-w<i>`` and the group's ``--share-group``), restarts a worker that dies, forwards SIGTERM
so each drains, and serves one ``/metrics`` for all of them through prometheus-client's
multiprocess mode. Secrets reach the workers through their environment, never their arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from mirror.ops.config import Settings
from mirror.ops.options import worker_environment

log = logging.getLogger(__name__)

RESTART_DELAY_MAX = 30.0


def worker_command(
    settings: Settings, index: int, *, restarted: bool = False
) -> tuple[list[str], dict[str, str]]:
    """Arguments and environment additions for worker ``index`` (0-based).

    Every option reaches the worker through its environment variable (derived from the option
    declarations, so a new option cannot be forgotten here); the arguments carry no secret.
    A restarted worker does not ask for a full snapshot again: the first start did.
    """
    group = settings.share_group or settings.effective_client_id()
    env = worker_environment(
        settings,
        {
            "MIRROR_CLIENT_ID": f"{settings.effective_client_id()}-w{index}",
            "MIRROR_SHARE_GROUP": group,
            "MIRROR_NO_MIGRATE": "1",
            "MIRROR_WORKERS": "1",
        },
    )
    if restarted:
        env["MIRROR_RESYNC"] = "0"
    return [sys.executable, "-m", "mirror.cli", "run", "--worker"], env


@dataclass
class Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = 0.0
    process_count: int = 0  # processes started for this slot so far


@dataclass
class Supervisor:
    settings: Settings
    count: int
    workers: list[Worker] = field(default_factory=list)
    metrics_dir: str = ""
    stopping: bool = False

    def __post_init__(self) -> None:
        self.workers = [Worker(i) for i in range(self.count)]

    # Readiness of the whole: every worker alive and reporting ready.
    @property
    def ready(self) -> bool:
        return not self.not_ready_reasons()

    def not_ready_reasons(self) -> list[str]:
        reasons = []
        if self.stopping:
            reasons.append("stopping")
        dead = [w.index for w in self.workers if w.process is None or w.process.poll() is not None]
        if dead:
            reasons.append(f"workers not running: {dead}")
        elif _aggregated_ready(self.metrics_dir) < 1:
            reasons.append("a worker is not ready")
        return reasons

    def _start(self, worker: Worker) -> None:
        argv, extra_env = worker_command(
            self.settings, worker.index, restarted=worker.process_count > 0
        )
        env = {**os.environ, **extra_env, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir}
        worker.process = subprocess.Popen(argv, env=env)
        worker.process_count += 1
        worker.started = time.monotonic()
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    async def run(self) -> int:
        for worker in self.workers:
            self._start(worker)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            for worker in self.workers:
                process = worker.process
                if process is not None and process.poll() is not None:
                    _forget(self.metrics_dir, process.pid)
                    uptime = time.monotonic() - worker.started
                    worker.restarts = 0 if uptime > 60 else worker.restarts + 1
                    delay = min(RESTART_DELAY_MAX, 0.5 * 2**worker.restarts)
                    log.error(
                        "worker %d exited with %s; restarting in %.1fs",
                        worker.index, process.returncode, delay,
                    )  # fmt: skip
                    worker.process = None
                    loop.call_later(delay, self._restart_unless_stopping, worker)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        return await self._stop_all()

    def _restart_unless_stopping(self, worker: Worker) -> None:
        if not self.stopping and worker.process is None:
            self._start(worker)

    async def _stop_all(self) -> int:
        self.stopping = True
        log.info("stopping %d workers", len(self.workers))
        running = [w.process for w in self.workers if w.process and w.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout + 10
        codes = []
        for process in running:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                codes.append(await asyncio.to_thread(process.wait, remaining))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append(await asyncio.to_thread(process.wait))
        return 0 if all(code == 0 for code in codes) else 1


def _forget(metrics_dir: str, pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]


def _aggregated_ready(metrics_dir: str) -> float:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
    for family in registry.collect():
        if family.name == "flespi_mirror_ready":
            values = [s.value for s in family.samples]
            return min(values) if values else 0.0
    return 0.0


def multiprocess_dir() -> str:
    path = tempfile.mkdtemp(prefix="flespi-mirror-metrics-")
    return path


def remove_multiprocess_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
