"""LocalKafka without a broker: config text, tool checks, the jars cache, process handling."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streamrec import kafka_local
from streamrec.cli import app
from streamrec.kafka_local import (
    JARS_MARKER,
    POM,
    LocalKafka,
    LocalKafkaError,
    check_java,
    fetch_jars,
    free_port,
    free_ports,
    jars_current,
    java_major_version,
    new_cluster_id,
    pom_digest,
    port_free,
    server_properties,
)
from streamrec.settings import load_settings


def _props(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line and line[0] != "#")
    return dict(pairs)


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def current_jars(tmp_path: Path) -> Path:
    """A jars dir whose marker matches the repo's pom: start() needs no Maven."""
    jars = tmp_path / "jars"
    jars.mkdir()
    (jars / JARS_MARKER).write_text(pom_digest(POM) + "\n")
    return jars


@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# --- server.properties ---------------------------------------------------------------------
def test_server_properties_single_node_kraft_on_loopback(tmp_path: Path) -> None:
    props = _props(server_properties(19092, 19093, tmp_path / "data"))
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert props["log.dirs"] == str(tmp_path / "data")
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert props["auto.create.topics.enable"] == "false"
    assert "0.0.0.0" not in server_properties(19092, 19093, tmp_path)


def test_cluster_id_is_22_char_base64url() -> None:
    ids = {new_cluster_id() for _ in range(20)}
    assert len(ids) == 20
    for cid in ids:
        assert len(cid) == 22
        assert set(cid) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_from_settings_and_paths(tmp_path: Path) -> None:
    settings = load_settings(
        local_kafka_dir=tmp_path / "k",
        local_kafka_port=19092,
        local_kafka_controller_port=19093,
        jars_dir=tmp_path / "j",
        local_kafka_heap="256m",
    )
    broker = LocalKafka.from_settings(settings)
    assert (broker.port, broker.controller_port, broker.heap) == (19092, 19093, "256m")
    assert broker.bootstrap == "127.0.0.1:19092"
    assert broker.data_dir == (tmp_path / "k" / "data").resolve()
    assert broker.jars_dir == (tmp_path / "j").resolve()
    override = LocalKafka.from_settings(settings, port=1, controller_port=2, base_dir=tmp_path)
    assert (override.port, override.controller_port, override.base_dir) == (1, 2, tmp_path)


def test_same_broker_and_controller_port_rejected(tmp_path: Path) -> None:
    with pytest.raises(LocalKafkaError, match="must differ, both are 9092"):
        LocalKafka(tmp_path, port=9092, controller_port=9092)


# --- java and maven -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("output", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', 17),
        ('java version "1.8.0_292"', 8),
        ('openjdk version "21" 2023-09-19', 21),
        ('openjdk version "11.0.2" 2019-01-15 LTS', 11),
    ],
)
def test_java_major_version(output: str, major: int) -> None:
    assert java_major_version(output) == major


def test_java_version_unreadable() -> None:
    with pytest.raises(LocalKafkaError, match="could not read the Java version"):
        java_major_version("command not found")


def test_missing_java_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_local.shutil, "which", lambda _tool: None)
    with pytest.raises(LocalKafkaError, match=r"`java` was not found.*openjdk-17-jre-headless"):
        check_java()


def test_old_java_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    java = _script(tmp_path / "java", "echo 'openjdk version \"11.0.2\" 2019-01-15' >&2")
    monkeypatch.setattr(kafka_local.shutil, "which", lambda _tool: str(java))
    with pytest.raises(LocalKafkaError, match=r"needs Java 17 or newer.*is Java 11"):
        check_java()


def test_missing_mvn_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(kafka_local.shutil, "which", lambda _tool: None)
    with pytest.raises(LocalKafkaError, match=r"`mvn` was not found.*apt-get install maven"):
        fetch_jars(tmp_path / "jars")


def _fake_mvn(tmp_path: Path, body: str) -> Path:
    return _script(tmp_path / "mvn", body)


# The fake writes a kafka jar into -DoutputDirectory=..., as copy-dependencies would.
FAKE_MVN_OK = """
for arg in "$@"; do
  case "$arg" in -DoutputDirectory=*) out="${arg#-DoutputDirectory=}";; esac
done
touch "$out/kafka_2.13-4.1.2.jar"
echo ran >> "$(dirname "$0")/calls"
"""


def test_fetch_runs_maven_once_then_uses_marker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mvn = _fake_mvn(tmp_path, FAKE_MVN_OK)
    monkeypatch.setattr(kafka_local.shutil, "which", lambda _tool: str(mvn))
    jars = tmp_path / "jars"
    jars.mkdir()
    (jars / "kafka_2.13-3.0.0.jar").write_text("old")
    (jars / JARS_MARKER).write_text("digest-of-an-older-pom\n")

    assert not jars_current(jars)
    assert fetch_jars(jars) is True
    assert sorted(p.name for p in jars.glob("*.jar")) == ["kafka_2.13-4.1.2.jar"]
    assert (jars / JARS_MARKER).read_text().strip() == pom_digest(POM)
    assert jars_current(jars)

    # A current marker needs no Maven at all (no network on a second start).
    monkeypatch.setattr(kafka_local.shutil, "which", lambda _tool: None)
    assert fetch_jars(jars) is False
    assert (tmp_path / "calls").read_text().splitlines() == ["ran"]


def test_marker_follows_the_pom(tmp_path: Path) -> None:
    pom = tmp_path / "pom.xml"
    pom.write_text("<project>1</project>")
    jars = tmp_path / "jars"
    jars.mkdir()
    (jars / JARS_MARKER).write_text(pom_digest(pom))
    assert jars_current(jars, pom)
    pom.write_text("<project>2</project>")
    assert not jars_current(jars, pom)


def test_fetch_failure_shows_maven_output(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mvn = _fake_mvn(tmp_path, "echo 'Could not resolve org.apache.kafka:kafka_2.13'; exit 1")
    monkeypatch.setattr(kafka_local.shutil, "which", lambda _tool: str(mvn))
    with pytest.raises(LocalKafkaError, match=r"exit code 1.*\n.*Could not resolve") as info:
        fetch_jars(tmp_path / "jars")
    assert not jars_current(tmp_path / "jars")
    assert "expected the jars in" in str(info.value)


def test_fetch_without_kafka_jar_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mvn = _fake_mvn(tmp_path, "exit 0")
    monkeypatch.setattr(kafka_local.shutil, "which", lambda _tool: str(mvn))
    with pytest.raises(LocalKafkaError, match=r"holds no kafka_2\.13 jar"):
        fetch_jars(tmp_path / "jars")


def test_fetch_timeout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mvn = _fake_mvn(tmp_path, "exec sleep 10")
    monkeypatch.setattr(kafka_local.shutil, "which", lambda _tool: str(mvn))
    with pytest.raises(LocalKafkaError, match="took more than 0 s"):
        fetch_jars(tmp_path / "jars", timeout_s=0.3)


# --- ports --------------------------------------------------------------------------------
def test_port_free_and_taken(listening_port: int) -> None:
    assert not port_free(listening_port)
    assert port_free(free_port())
    assert len(set(free_ports(20))) == 20


def test_port_check_reraises_unexpected_errors() -> None:
    # 192.0.2.1 (TEST-NET-1) is not an address of this machine: EADDRNOTAVAIL, not "in use".
    with pytest.raises(OSError, match="assign requested address"):
        port_free(free_port(), host="192.0.2.1")


def test_start_refuses_a_port_in_use(
    tmp_path: Path, current_jars: Path, listening_port: int
) -> None:
    broker = LocalKafka(
        tmp_path / "k", port=listening_port, controller_port=free_port(), jars_dir=current_jars
    )
    with pytest.raises(LocalKafkaError, match=rf"broker port 127.0.0.1:{listening_port}.*in use"):
        broker.start()
    other = LocalKafka(
        tmp_path / "k", port=free_port(), controller_port=listening_port, jars_dir=current_jars
    )
    with pytest.raises(LocalKafkaError, match=rf"controller port 127.0.0.1:{listening_port}"):
        other.start()
    assert broker.pid() is None


# --- process handling with a fake JVM --------------------------------------------------------
@pytest.fixture
def fake_java_broker(
    tmp_path: Path, current_jars: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[LocalKafka, Path]:
    """A LocalKafka whose `java` is a script we control; storage counts as formatted."""
    port, cport = free_ports(2)
    broker = LocalKafka(tmp_path / "k", port=port, controller_port=cport, jars_dir=current_jars)
    broker.data_dir.mkdir(parents=True)
    (broker.data_dir / "meta.properties").write_text("formatted\n")
    java = tmp_path / "java"
    monkeypatch.setattr(kafka_local, "check_java", lambda: str(java))
    return broker, java


def test_broker_exiting_at_startup_reports_log_tail(
    fake_java_broker: tuple[LocalKafka, Path],
) -> None:
    broker, java = fake_java_broker
    _script(java, "echo 'ERROR Exiting Kafka due to fatal exception: bad listener'; exit 1")
    with pytest.raises(LocalKafkaError, match=r"exited during startup(.|\n)*bad listener"):
        broker.start(timeout_s=10)
    assert broker.pid() is None
    assert not broker.pid_file.exists()
    props = _props(broker.properties_file.read_text())
    assert props["listeners"].startswith(f"PLAINTEXT://127.0.0.1:{broker.port},")


def test_broker_not_answering_times_out_and_is_killed(
    fake_java_broker: tuple[LocalKafka, Path],
) -> None:
    broker, java = fake_java_broker
    # Alive, never listening: the main class name in argv makes it look like our broker.
    _script(java, "echo starting; sleep 30")
    with pytest.raises(LocalKafkaError, match=r"did not answer on 127.0.0.1:\d+ within 1 s"):
        broker.start(timeout_s=1)
    assert broker.pid() is None


def test_format_failure_is_reported(
    fake_java_broker: tuple[LocalKafka, Path],
) -> None:
    broker, java = fake_java_broker
    (broker.data_dir / "meta.properties").unlink()
    _script(java, "echo 'Invalid cluster.id'; exit 2")
    with pytest.raises(LocalKafkaError, match=r"formatting the storage(.|\n)*Invalid cluster.id"):
        broker.start(timeout_s=5)
    # The cluster id is chosen once and kept for the retry.
    first = broker.cluster_id_file.read_text()
    with pytest.raises(LocalKafkaError):
        broker.start(timeout_s=5)
    assert broker.cluster_id_file.read_text() == first


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    port, cport = free_ports(2)
    broker = LocalKafka(tmp_path / "k", port=port, controller_port=cport)
    broker.base_dir.mkdir(parents=True)
    # Ignores SIGTERM, like a JVM stuck in shutdown; bash keeps "kafka.Kafka" in its argv.
    ready = tmp_path / "ready"
    stubborn = _script(tmp_path / "stubborn", f"trap '' TERM; touch {ready}; sleep 30")
    proc = subprocess.Popen([str(stubborn), "kafka.Kafka"], start_new_session=True)
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    broker.pid_file.write_text(f"{proc.pid}\n")
    assert broker.pid() == proc.pid
    assert broker.status().running

    started = time.monotonic()
    assert broker.stop(timeout_s=0.5) is True
    elapsed = time.monotonic() - started
    # It waited out the SIGTERM grace period, then SIGKILL ended it.
    assert 0.5 <= elapsed < 8
    # Our own child: reap it (a killed, unreaped child still answers kill(pid, 0)); wait
    # raises TimeoutExpired if stop() left it running.
    proc.wait(timeout=5)
    assert proc.returncode is not None
    assert not broker.pid_file.exists()
    assert broker.stop() is False


def test_stale_pid_file_is_ignored(tmp_path: Path) -> None:
    port, cport = free_ports(2)
    broker = LocalKafka(tmp_path / "k", port=port, controller_port=cport)
    broker.base_dir.mkdir(parents=True)
    # Our own pid is alive but is not a broker (pid reuse after a reboot, say).
    broker.pid_file.write_text(f"{os.getpid()}\n")
    status = broker.status()
    assert (status.running, status.pid, status.answering, status.topics) == (
        False,
        None,
        False,
        None,
    )
    assert not broker.pid_file.exists()
    broker.pid_file.write_text("not a pid\n")
    assert broker.stop() is False


def test_log_tail_prefers_the_broker_log(tmp_path: Path) -> None:
    port, cport = free_ports(2)
    broker = LocalKafka(tmp_path / "k", port=port, controller_port=cport)
    assert broker.log_tail() == ""
    broker.base_dir.mkdir(parents=True)
    broker.stdout_file.write_text("jvm said hello\n")
    assert broker.log_tail() == "jvm said hello"
    broker.logs_dir.mkdir()
    broker.server_log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert broker.log_tail(3) == "line 97\nline 98\nline 99"


# --- CLI errors -------------------------------------------------------------------------------
def test_cli_error_is_one_red_line_not_a_traceback(
    tmp_path: Path, current_jars: Path, listening_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMREC_LOCAL_KAFKA_DIR", str(tmp_path / "k"))
    monkeypatch.setenv("STREAMREC_JARS_DIR", str(current_jars))
    result = CliRunner().invoke(
        app, ["kafka", "start", "--port", str(listening_port), "--controller-port", "1"]
    )
    assert result.exit_code == 1
    assert result.output.startswith(
        f"error: local kafka: the broker port 127.0.0.1:{listening_port}"
    )
    assert "Traceback" not in result.output
    assert result.exception is not None
    assert isinstance(result.exception, SystemExit)


def test_cli_logs_without_a_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_LOCAL_KAFKA_DIR", str(tmp_path / "nothing"))
    result = CliRunner().invoke(app, ["kafka", "logs"])
    assert result.exit_code == 1
    assert "no broker log yet under" in result.output
