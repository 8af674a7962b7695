"""Start, watch and stop worker processes (demo, benchmarks, integration tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

from streamrec.replay import scrape_metrics
from streamrec.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``STREAMREC_*`` environment that reproduces ``settings`` in a child process."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"STREAMREC_{name.upper()}"] = str(value)
    return env


class WorkerProcess:
    """A ``streamrec worker`` subprocess with its own log file."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        passthrough: bool = False,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.passthrough = passthrough
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://{self.settings.metrics_host}:{self.settings.metrics_port}/metrics"

    def start(self, timeout_s: float = 60.0) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **settings_env(self.settings), **self.extra_env}
        cmd = [sys.executable, "-m", "streamrec", "worker"]
        if self.passthrough:
            cmd.append("--passthrough")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self.wait_metrics(timeout_s)
        return self

    def _poll_start(self, timeout_s: float, ready: Callable[[], bool], waiting_for: str) -> None:
        """Call ``ready`` every 0.2 s until it is true; fail if the worker exits first or
        ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"worker exited with code {self.proc.returncode} during start-up; "
                    f"last log lines:\n{self.tail()}"
                )
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"worker: {waiting_for} not within {timeout_s:.0f} s; last log lines:\n{self.tail()}"
        )

    def wait_metrics(self, timeout_s: float) -> None:
        def up() -> bool:
            try:
                with urlopen(self.metrics_url, timeout=1):
                    return True
            except (URLError, OSError):
                return False

        self._poll_start(timeout_s, up, f"metrics endpoint {self.metrics_url} up")

    def wait_assigned(self, timeout_s: float) -> None:
        """Wait until the worker reports lag for a partition of the events topic: it has its
        partitions and has fetched from them. Its metrics endpoint is up a second or two
        earlier, and events sent in between wait for the worker (a demo would show that wait
        as latency)."""
        want = f'topic="{self.settings.topic_events}"'

        def assigned() -> bool:
            try:
                metrics = scrape_metrics(self.metrics_url, timeout=1.0)
            except (URLError, OSError):
                return False
            return any(
                k.startswith("streamrec_consumer_lag_messages{") and want in k for k in metrics
            )

        self._poll_start(timeout_s, assigned, f"a partition of {self.settings.topic_events}")

    def tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the worker (crash tests)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
