"""Kafka client wiring from Settings (confluent and Faust), and the topic layout."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import faust
import pytest
from pydantic import SecretStr

from streamrec.kafka_config import (
    KafkaConfigError,
    bootstrap_servers,
    confluent_config,
    describe,
    faust_broker_kwargs,
    ssl_context,
)
from streamrec.kafka_local import free_port
from streamrec.settings import Settings, load_settings
from streamrec.topics import (
    TopicError,
    TopicSpec,
    design_topics,
    ensure_topics,
    list_topics,
)

PASSWORD = "s3cr3t-Pa55"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and its key (the certificate doubles as the CA)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *[
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=kafka",
                "-days",
                "1",
            ],
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def _sasl_ssl(cert: Path, key: Path, **extra: object) -> Settings:
    values: dict[str, object] = {
        "kafka_bootstrap": "b1.example:9093, b2.example:9093",
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "recs",
        "kafka_sasl_password": SecretStr(PASSWORD),
        "kafka_ssl_cafile": cert,
        "kafka_ssl_certfile": cert,
        "kafka_ssl_keyfile": key,
    }
    values.update(extra)
    return load_settings(**values)


# --- confluent ------------------------------------------------------------------------------
def test_plaintext_config_is_minimal() -> None:
    settings = load_settings(kafka_bootstrap="127.0.0.1:9092")
    assert confluent_config(settings) == {
        "bootstrap.servers": "127.0.0.1:9092",
        "security.protocol": "PLAINTEXT",
    }
    assert faust_broker_kwargs(settings) == {
        "broker": "kafka://127.0.0.1:9092",
        "broker_credentials": None,
    }


def test_sasl_ssl_confluent_config(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    config = confluent_config(_sasl_ssl(cert, key))
    assert config == {
        "bootstrap.servers": "b1.example:9093,b2.example:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "recs",
        "sasl.password": PASSWORD,
        "ssl.ca.location": str(cert),
        "ssl.certificate.location": str(cert),
        "ssl.key.location": str(key),
    }
    assert isinstance(config, dict)


def test_password_never_in_repr_or_logs(
    tls_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = tls_files
    settings = _sasl_ssl(cert, key)
    config = confluent_config(settings)
    kwargs = faust_broker_kwargs(settings)
    shown = [repr(settings), str(settings), repr(config), str(config), f"{config}"]
    shown += [repr(kwargs), str(kwargs["broker_credentials"]), describe(settings)]
    for text in shown:
        assert PASSWORD not in text
    assert "sasl.password" in repr(config)
    assert "recs" in describe(settings)
    print(config, kwargs, settings)
    assert PASSWORD not in capsys.readouterr().out


def test_sasl_ssl_faust_credentials(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    kwargs = faust_broker_kwargs(_sasl_ssl(cert, key))
    assert kwargs["broker"] == "kafka://b1.example:9093;kafka://b2.example:9093"
    creds = kwargs["broker_credentials"]
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.protocol.value == "SASL_SSL"
    assert creds.mechanism.value == "SCRAM-SHA-512"
    assert (creds.username, creds.password) == ("recs", PASSWORD)
    assert creds.ssl_context is not None
    assert creds.ssl_context.verify_mode == ssl.CERT_REQUIRED
    # The CA file was loaded: exactly our one self-signed certificate.
    assert len(creds.ssl_context.get_ca_certs()) == 1


def test_sasl_plaintext_has_no_tls() -> None:
    settings = load_settings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="u",
        kafka_sasl_password=SecretStr(PASSWORD),
    )
    creds = faust_broker_kwargs(settings)["broker_credentials"]
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.protocol.value == "SASL_PLAINTEXT"
    assert creds.ssl_context is None
    assert "ssl.ca.location" not in confluent_config(settings)


def test_ssl_only_uses_system_cas_without_a_ca_file() -> None:
    settings = load_settings(kafka_security_protocol="SSL")
    creds = faust_broker_kwargs(settings)["broker_credentials"]
    assert isinstance(creds, faust.SSLCredentials)
    assert creds.context.verify_mode == ssl.CERT_REQUIRED
    assert confluent_config(settings) == {
        "bootstrap.servers": "127.0.0.1:9092",
        "security.protocol": "SSL",
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "u"},
            "SASL_SSL needs STREAMREC_KAFKA_SASL_MECHANISM, STREAMREC_KAFKA_SASL_PASSWORD",
        ),
        (
            {"kafka_sasl_username": "u", "kafka_sasl_password": SecretStr(PASSWORD)},
            "SASL credentials are set but the security protocol is PLAINTEXT",
        ),
        (
            {"kafka_ssl_cafile": Path("/ca.pem")},
            "SSL files are set but the security protocol is PLAINTEXT",
        ),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_certfile": Path("/c.pem")},
            "needs both STREAMREC_KAFKA_SSL_CERTFILE and STREAMREC_KAFKA_SSL_KEYFILE",
        ),
        ({"kafka_bootstrap": "broker-without-port"}, "must be host:port"),
        ({"kafka_bootstrap": " , "}, "STREAMREC_KAFKA_BOOTSTRAP is empty"),
    ],
)
def test_inconsistent_settings_are_rejected(overrides: dict[str, object], message: str) -> None:
    settings = load_settings(**overrides)
    with pytest.raises(KafkaConfigError, match=message):
        confluent_config(settings)
    with pytest.raises(KafkaConfigError, match=message):
        faust_broker_kwargs(settings)


def test_unreadable_tls_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.pem"
    settings = load_settings(kafka_security_protocol="SSL", kafka_ssl_cafile=missing)
    with pytest.raises(KafkaConfigError, match=r"could not load the TLS files.*missing-ca\.pem"):
        ssl_context(settings)


def test_bootstrap_servers_tolerates_spaces() -> None:
    settings = load_settings(kafka_bootstrap=" a:1 ,b:2,")
    assert bootstrap_servers(settings) == ["a:1", "b:2"]


# --- topic layout ---------------------------------------------------------------------------
def test_design_topics_layout() -> None:
    settings = load_settings(app_id="recs", topic_partitions=6)
    specs = {s.name: s for s in design_topics(settings)}
    assert set(specs) == {
        "streamrec.events",
        "streamrec.items",
        "streamrec.recommendations",
        "streamrec.events.dlq",
        "streamrec.control",
        "recs-sessions-changelog",
        "recs-__assignor-__leader",
    }
    assert specs["streamrec.events"].config == {
        "cleanup.policy": "delete",
        "retention.ms": str(7 * 24 * 3600 * 1000),
    }
    assert specs["streamrec.events.dlq"].config["retention.ms"] == str(30 * 24 * 3600 * 1000)
    compacted = {n for n, s in specs.items() if s.config.get("cleanup.policy") == "compact"}
    assert compacted == {
        "streamrec.items",
        "streamrec.control",
        "recs-sessions-changelog",
    }
    single = {n for n, s in specs.items() if s.partitions == 1}
    assert single == {"streamrec.control", "recs-__assignor-__leader"}
    # Changelogs co-partition with the streams that feed their tables.
    assert {s.partitions for n, s in specs.items() if n not in single} == {6}
    assert {s.replication for s in specs.values()} == {1}


def test_design_topics_partitions_override() -> None:
    specs = design_topics(load_settings(), partitions=3)
    assert {s.name: s.partitions for s in specs}["streamrec-sessions-changelog"] == 3
    with pytest.raises(ValueError, match="partitions must be >= 1, got 0"):
        design_topics(load_settings(), partitions=0)


def test_no_broker_is_one_clear_error() -> None:
    settings = load_settings(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    with pytest.raises(TopicError, match=r"nothing accepts connections at 127\.0\.0\.1"):
        ensure_topics(settings, [TopicSpec("t", 1, 1)])


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts TCP connections and never answers: a port that is not Kafka."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_listing_a_non_kafka_port_times_out_clearly(silent_server: int) -> None:
    settings = load_settings(kafka_bootstrap=f"127.0.0.1:{silent_server}")
    with pytest.raises(TopicError, match=r"could not list topics on .* within 1 s"):
        list_topics(settings, timeout_s=1.0)
