"""A real single-node Apache Kafka broker (KRaft) for local runs and integration tests.

The broker's jars come from Maven Central through ``deploy/kafka/pom.xml`` and run on the
machine's Java 17+. Everything the broker owns lives under one base directory::

    <base>/server.properties   generated on every start
    <base>/cluster.id          chosen once, at the first start
    <base>/data/               log.dirs (formatted once)
    <base>/logs/server.log     broker log (log4j2, rolled at 20 MB)
    <base>/kafka.out           the JVM's own stdout/stderr (crashes before logging starts)
    <base>/kafka.pid           pid of the running broker (its own process group)

It binds 127.0.0.1 only: a developer's broker is never reachable from the network.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from streamrec.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY_DIR = REPO_ROOT / "deploy" / "kafka"
POM = DEPLOY_DIR / "pom.xml"
LOG4J2 = DEPLOY_DIR / "log4j2.properties"
JARS_MARKER = ".pom.sha256"
MIN_JAVA = 17
HOST = "127.0.0.1"
# The JVM class that is the broker: used to tell our broker from an unrelated process that
# happens to reuse a stale pid.
BROKER_MAIN = "kafka.Kafka"


class LocalKafkaError(RuntimeError):
    """The local broker could not be fetched, started, stopped or reached."""


@dataclass(frozen=True)
class KafkaStatus:
    """What ``streamrec kafka status`` shows. ``topics`` counts non-internal topics."""

    running: bool
    pid: int | None
    bootstrap: str
    base_dir: Path
    answering: bool
    topics: int | None = None


def _which(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise LocalKafkaError(
            f"local kafka: `{tool}` was not found on PATH; the local broker needs it. "
            f"Install it (Debian/Ubuntu: `apt-get install {package}`) and retry."
        )
    return path


def java_major_version(version_output: str) -> int:
    """Parse ``java -version`` output ('1.8.0_292' -> 8, '17.0.15' -> 17, '21' -> 21)."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if match is None:
        raise LocalKafkaError(
            "local kafka: could not read the Java version; expected `java -version` to print "
            f'`version "N..."`, got: {version_output.strip()[:200]!r}'
        )
    major = int(match.group(1))
    if major == 1 and match.group(2) is not None:
        major = int(match.group(2))
    return major


def check_java() -> str:
    """Return the path of a usable ``java`` (17 or newer), or raise naming what to install."""
    java = _which("java", "openjdk-17-jre-headless")
    proc = subprocess.run(
        [java, "-version"], capture_output=True, text=True, timeout=60, check=False
    )
    major = java_major_version(proc.stderr + proc.stdout)
    if major < MIN_JAVA:
        raise LocalKafkaError(
            f"local kafka: Kafka 4 needs Java {MIN_JAVA} or newer, but `{java}` is Java {major}. "
            "Install a newer JRE (Debian/Ubuntu: `apt-get install openjdk-17-jre-headless`) "
            "and put it first on PATH."
        )
    return java


def pom_digest(pom: Path = POM) -> str:
    """sha256 of the pom: the jars dir is current when its marker holds this digest."""
    return hashlib.sha256(pom.read_bytes()).hexdigest()


def jars_current(jars_dir: Path, pom: Path = POM) -> bool:
    """True when ``jars_dir`` was filled from exactly this pom (no network needed)."""
    marker = jars_dir / JARS_MARKER
    return marker.is_file() and marker.read_text().strip() == pom_digest(pom)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise fetches: test sessions running side by side share one jars cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_jars(jars_dir: Path, pom: Path = POM, timeout_s: float = 600.0) -> bool:
    """Copy the broker's jars into ``jars_dir`` with Maven. Returns False when already current."""
    jars_dir = jars_dir.resolve()
    if jars_current(jars_dir, pom):
        return False
    mvn = _which("mvn", "maven")
    with _file_lock(jars_dir.parent / f"{jars_dir.name}.lock"):
        if jars_current(jars_dir, pom):
            return False
        jars_dir.mkdir(parents=True, exist_ok=True)
        # Jars of an older pom would sit on the same classpath as the new ones.
        for stale in jars_dir.glob("*.jar"):
            stale.unlink()
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={jars_dir}",
        ]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise LocalKafkaError(
                f"local kafka: fetching jars with Maven took more than {timeout_s:.0f} s; "
                "check network access to Maven Central (or a mirror in ~/.m2/settings.xml)."
            ) from exc
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
            raise LocalKafkaError(
                f"local kafka: `{' '.join(cmd)}` failed with exit code {proc.returncode}; "
                f"expected the jars in {jars_dir}. Maven said:\n{tail}"
            )
        if not any(jars_dir.glob("kafka_2.13-*.jar")):
            raise LocalKafkaError(
                f"local kafka: Maven succeeded but {jars_dir} holds no kafka_2.13 jar; "
                f"check that {pom} still depends on org.apache.kafka:kafka_2.13."
            )
        (jars_dir / JARS_MARKER).write_text(pom_digest(pom) + "\n")
    return True


def new_cluster_id() -> str:
    """A KRaft cluster id: base64url of 16 random bytes, without padding (22 chars)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def server_properties(port: int, controller_port: int, data_dir: Path) -> str:
    """The broker+controller config of a single-node KRaft cluster bound to 127.0.0.1."""
    lines = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"{HOST}:{controller_port}",
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data_dir),
        # One node: internal topics cannot have more replicas than brokers.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Fewer internal partitions: the first consumer group on a fresh broker is ready sooner.
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.num.partitions": "4",
        "group.initial.rebalance.delay.ms": "0",
        # Topics are created on purpose (`streamrec topics create`) with the partition counts
        # co-partitioning needs; a typo'd or forgotten topic must fail, not appear with 1 partition.
        "auto.create.topics.enable": "false",
    }
    header = "# Generated by streamrec (streamrec/kafka_local.py) at every start; edits are lost.\n"
    return header + "".join(f"{key}={value}\n" for key, value in lines.items())


def port_free(port: int, host: str = HOST) -> bool:
    """True when nothing listens on host:port (a bind succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option the JVM sets, so a port in TIME_WAIT after our own stop counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_port(host: str = HOST) -> int:
    """A port the OS says is free right now (for tests and ad-hoc brokers)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct free ports: all sockets stay bound until every port is chosen,
    so the OS cannot hand out the same port twice."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _tcp_open(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _pid_alive(pid: int) -> bool:
    """True when ``pid`` is a live (not zombie) broker process."""
    child = _CHILDREN.get(pid)
    if child is not None:
        # Our own child: poll() is exact, and right even before exec() has set its argv.
        return child.poll() is None
    # Reap it if it is our own exited child, or it would linger as a zombie that kill(0) sees.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Someone else's process reuses the pid: certainly not our broker.
        return False
    proc_dir = Path(f"/proc/{pid}")
    if proc_dir.is_dir():
        try:
            stat = (proc_dir / "stat").read_text()
            cmdline = (proc_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        state = stat.rsplit(")", 1)[-1].split()[0]
        if state in ("Z", "X"):
            # It died after the reap above: reap it now, so that it does not stay a zombie.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return False
        return BROKER_MAIN.encode() in cmdline
    return True


# Popen handles of brokers this process started: keeps them from being garbage collected
# (a ResourceWarning) and lets stop() reap them.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class LocalKafka:
    """One local broker rooted at ``base_dir``. All methods are safe to call repeatedly."""

    def __init__(
        self,
        base_dir: Path,
        *,
        port: int = 9092,
        controller_port: int = 9093,
        jars_dir: Path = REPO_ROOT / ".cache" / "kafka-jars",
        heap: str = "1g",
        pom: Path = POM,
        log4j2: Path = LOG4J2,
    ) -> None:
        if port == controller_port:
            raise LocalKafkaError(
                f"local kafka: the broker port and the controller port must differ, both are {port}"
            )
        self.base_dir = base_dir.resolve()
        self.port = port
        self.controller_port = controller_port
        self.jars_dir = jars_dir.resolve()
        self.heap = heap
        self.pom = pom
        self.log4j2 = log4j2

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        base_dir: Path | None = None,
        port: int | None = None,
        controller_port: int | None = None,
    ) -> LocalKafka:
        """The broker ``streamrec kafka ...`` manages; relative paths resolve against the cwd."""
        return cls(
            base_dir if base_dir is not None else settings.local_kafka_dir,
            port=port if port is not None else settings.local_kafka_port,
            controller_port=(
                controller_port
                if controller_port is not None
                else settings.local_kafka_controller_port
            ),
            jars_dir=settings.jars_dir,
            heap=settings.local_kafka_heap,
        )

    # --- paths ------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def logs_dir(self) -> Path:
        return self.base_dir / "logs"

    @property
    def server_log(self) -> Path:
        return self.logs_dir / "server.log"

    @property
    def stdout_file(self) -> Path:
        return self.base_dir / "kafka.out"

    @property
    def pid_file(self) -> Path:
        return self.base_dir / "kafka.pid"

    @property
    def properties_file(self) -> Path:
        return self.base_dir / "server.properties"

    @property
    def cluster_id_file(self) -> Path:
        return self.base_dir / "cluster.id"

    # --- lifecycle ----------------------------------------------------------------------
    def fetch(self) -> bool:
        """Fetch the jars unless the cache is current. Returns True when Maven ran."""
        return fetch_jars(self.jars_dir, self.pom)

    def pid(self) -> int | None:
        """Pid of our running broker, or None (a stale pid file is removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if _pid_alive(pid):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def start(self, timeout_s: float = 60.0) -> KafkaStatus:
        """Start the broker (or find it running) and wait until it answers metadata requests."""
        pid = self.pid()
        if pid is not None:
            # Already running, perhaps started with other ports than this object's.
            self._wait_ready(pid, timeout_s, self._started_port() or self.port)
            return self.status()
        java = check_java()
        self.fetch()
        for name, port in (("broker", self.port), ("controller", self.controller_port)):
            if not port_free(port):
                raise LocalKafkaError(
                    f"local kafka: the {name} port {HOST}:{port} is already in use by another "
                    f"process (no broker of ours runs from {self.base_dir}). Stop that process "
                    "or pick other ports (--port / --controller-port, or "
                    "STREAMREC_LOCAL_KAFKA_PORT / STREAMREC_LOCAL_KAFKA_CONTROLLER_PORT)."
                )
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.properties_file.write_text(
            server_properties(self.port, self.controller_port, self.data_dir)
        )
        self._format_storage(java)
        cmd = [
            java,
            f"-Xmx{self.heap}",
            "-Djava.awt.headless=true",
            *self._log_flags(),
            "-cp",
            f"{self.jars_dir}/*",
            BROKER_MAIN,
            str(self.properties_file),
        ]
        with self.stdout_file.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                # Own session and process group: Ctrl-C in the shell that started it, or the
                # end of a pytest run, does not take the broker down half-way.
                start_new_session=True,
            )
        _CHILDREN[proc.pid] = proc
        self.pid_file.write_text(f"{proc.pid}\n")
        try:
            self._wait_ready(proc.pid, timeout_s, self.port)
        except LocalKafkaError:
            self._terminate(proc.pid, timeout_s=10.0)
            raise
        return self.status()

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the broker: SIGTERM, then SIGKILL after ``timeout_s``. False if it was not up."""
        pid = self.pid()
        if pid is None:
            return False
        self._terminate(pid, timeout_s)
        return True

    def status(self) -> KafkaStatus:
        """Whether our broker runs, and whether it answers a metadata request."""
        pid = self.pid()
        topics: int | None = None
        port = self.port
        if pid is not None:
            # The running broker may have been started with other ports than this object's.
            port = self._started_port() or self.port
            if _tcp_open(port):
                topics = self._count_topics(timeout_s=5.0, port=port)
        return KafkaStatus(
            running=pid is not None,
            pid=pid,
            bootstrap=f"{HOST}:{port}",
            base_dir=self.base_dir,
            answering=topics is not None,
            topics=topics,
        )

    def log_tail(self, lines: int = 50) -> str:
        """The last ``lines`` lines of the broker log (or of the JVM output if there is none)."""
        for path in (self.server_log, self.stdout_file):
            if path.is_file() and path.stat().st_size > 0:
                return _tail(path, lines)
        return ""

    # --- internals ----------------------------------------------------------------------
    def _log_flags(self) -> list[str]:
        return [
            f"-Dlog4j2.configurationFile={self.log4j2}",
            f"-Dkafka.logs.dir={self.logs_dir}",
        ]

    def _format_storage(self, java: str) -> None:
        if (self.data_dir / "meta.properties").is_file():
            return
        if self.cluster_id_file.is_file():
            cluster_id = self.cluster_id_file.read_text().strip()
        else:
            cluster_id = new_cluster_id()
            self.cluster_id_file.write_text(cluster_id + "\n")
        cmd = [
            java,
            *self._log_flags(),
            "-cp",
            f"{self.jars_dir}/*",
            "kafka.tools.StorageTool",
            "format",
            # ``=`` form: a base64 cluster id may start with '-', which argparse takes for a flag.
            f"--cluster-id={cluster_id}",
            "-c",
            str(self.properties_file),
            "--standalone",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
            raise LocalKafkaError(
                f"local kafka: formatting the storage in {self.data_dir} failed with exit code "
                f"{proc.returncode}. To start over, stop the broker and delete {self.base_dir}. "
                f"StorageTool said:\n{tail}"
            )

    def _wait_ready(self, pid: int, timeout_s: float, port: int) -> None:
        bootstrap = f"{HOST}:{port}"
        deadline = time.monotonic() + timeout_s
        while True:
            if not _pid_alive(pid):
                self.pid_file.unlink(missing_ok=True)
                raise LocalKafkaError(
                    f"local kafka: the broker (pid {pid}) exited during startup; expected it to "
                    f"answer on {bootstrap}. Last lines of its log:\n{self.log_tail(30)}"
                )
            # A TCP probe first: librdkafka logs every refused connection, the probe is quiet.
            if _tcp_open(port) and self._count_topics(timeout_s=2.0, port=port) is not None:
                return
            if time.monotonic() > deadline:
                raise LocalKafkaError(
                    f"local kafka: the broker (pid {pid}) did not answer on {bootstrap} "
                    f"within {timeout_s:.0f} s. Last lines of its log:\n{self.log_tail(30)}"
                )
            time.sleep(0.2)

    def _started_port(self) -> int | None:
        try:
            text = self.properties_file.read_text()
        except FileNotFoundError:
            return None
        match = re.search(r"^advertised\.listeners=PLAINTEXT://[^:]+:(\d+)$", text, re.M)
        return int(match.group(1)) if match else None

    def _count_topics(self, timeout_s: float, port: int | None = None) -> int | None:
        # Imported here: `streamrec kafka stop/logs` should not pay for librdkafka.
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        bootstrap = f"{HOST}:{port or self.port}"
        admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
        try:
            metadata = admin.list_topics(timeout=timeout_s)
        except KafkaException:
            return None
        return sum(1 for name in metadata.topics if not name.startswith("__"))

    def _terminate(self, pid: int, timeout_s: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        if not self._wait_exit(pid, timeout_s):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            self._wait_exit(pid, 10.0)
        self.pid_file.unlink(missing_ok=True)

    def _wait_exit(self, pid: int, timeout_s: float) -> bool:
        proc = _CHILDREN.get(pid)
        if proc is not None:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                return False
            _CHILDREN.pop(pid, None)
            return True
        deadline = time.monotonic() + timeout_s
        while _pid_alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True


def _tail(path: Path, lines: int) -> str:
    # Read only the end: a broker log can be tens of megabytes.
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 256 * 1024))
        text = handle.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])
