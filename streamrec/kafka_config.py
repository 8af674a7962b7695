"""Kafka client configuration built from ``Settings``: one source for every client we create.

``confluent_config`` feeds confluent-kafka (admin, tools, tests); ``faust_broker_kwargs`` feeds
``faust.App``. Both speak PLAINTEXT, SSL, SASL_PLAINTEXT and SASL_SSL, and neither lets the SASL
password reach a log line or a repr.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamrec.settings import Settings

if TYPE_CHECKING:
    import faust

# The value type confluent-kafka's constructors are typed with (dicts are invariant in mypy).
ConfigValue = str | int | float | bool
_SECRET_KEYS = frozenset({"sasl.password", "ssl.key.password"})


class KafkaConfigError(ValueError):
    """The Kafka connection settings are inconsistent (checked before any client is built)."""


class ClientConfig(dict[str, ConfigValue]):
    """A librdkafka config dict whose repr/str hide secrets (it is still a plain ``dict``)."""

    def __repr__(self) -> str:
        shown = {k: ("**********" if k in _SECRET_KEYS else v) for k, v in self.items()}
        return repr(shown)

    __str__ = __repr__


def bootstrap_servers(settings: Settings) -> list[str]:
    """``host:port`` entries of ``kafka_bootstrap`` (comma separated, spaces tolerated)."""
    servers = [s.strip() for s in settings.kafka_bootstrap.split(",") if s.strip()]
    for server in servers:
        host, sep, port = server.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise KafkaConfigError(
                "kafka config: STREAMREC_KAFKA_BOOTSTRAP entries must be host:port, "
                f"got {server!r} in {settings.kafka_bootstrap!r}"
            )
    if not servers:
        raise KafkaConfigError(
            "kafka config: STREAMREC_KAFKA_BOOTSTRAP is empty; expected host:port[,host:port...]"
        )
    return servers


def _uses_sasl(settings: Settings) -> bool:
    return settings.kafka_security_protocol.startswith("SASL_")


def _uses_ssl(settings: Settings) -> bool:
    return settings.kafka_security_protocol.endswith("SSL")


def _check(settings: Settings) -> None:
    protocol = settings.kafka_security_protocol
    if _uses_sasl(settings):
        missing = [
            f"STREAMREC_KAFKA_SASL_{name.upper()}"
            for name, value in (
                ("mechanism", settings.kafka_sasl_mechanism),
                ("username", settings.kafka_sasl_username),
                ("password", settings.kafka_sasl_password),
            )
            if value is None
        ]
        if missing:
            raise KafkaConfigError(
                f"kafka config: security protocol {protocol} needs {', '.join(missing)}; "
                "set them, or use PLAINTEXT/SSL if the cluster has no SASL"
            )
    elif settings.kafka_sasl_username is not None or settings.kafka_sasl_password is not None:
        raise KafkaConfigError(
            f"kafka config: SASL credentials are set but the security protocol is {protocol}; "
            "expected SASL_PLAINTEXT or SASL_SSL (STREAMREC_KAFKA_SECURITY_PROTOCOL), "
            "or unset the credentials"
        )
    ssl_files = (settings.kafka_ssl_cafile, settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile)
    if not _uses_ssl(settings) and any(f is not None for f in ssl_files):
        raise KafkaConfigError(
            f"kafka config: SSL files are set but the security protocol is {protocol}; "
            "expected SSL or SASL_SSL (STREAMREC_KAFKA_SECURITY_PROTOCOL), or unset the files"
        )
    if (settings.kafka_ssl_certfile is None) != (settings.kafka_ssl_keyfile is None):
        raise KafkaConfigError(
            "kafka config: a client certificate needs both STREAMREC_KAFKA_SSL_CERTFILE and "
            f"STREAMREC_KAFKA_SSL_KEYFILE; got certfile={settings.kafka_ssl_certfile}, "
            f"keyfile={settings.kafka_ssl_keyfile}"
        )


def confluent_config(settings: Settings) -> dict[str, ConfigValue]:
    """librdkafka properties for confluent-kafka producers, consumers and admin clients."""
    _check(settings)
    config = ClientConfig(
        {
            "bootstrap.servers": ",".join(bootstrap_servers(settings)),
            "security.protocol": settings.kafka_security_protocol,
        }
    )
    if _uses_sasl(settings):
        assert settings.kafka_sasl_mechanism is not None  # guaranteed by _check
        assert settings.kafka_sasl_username is not None
        assert settings.kafka_sasl_password is not None
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism
        config["sasl.username"] = settings.kafka_sasl_username
        config["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    for key, path in (
        ("ssl.ca.location", settings.kafka_ssl_cafile),
        ("ssl.certificate.location", settings.kafka_ssl_certfile),
        ("ssl.key.location", settings.kafka_ssl_keyfile),
    ):
        if path is not None:
            config[key] = str(path)
    return config


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """TLS context for Faust/aiokafka: system CAs unless a CA file is set, optional client cert."""
    _check(settings)
    cafile = settings.kafka_ssl_cafile
    try:
        context = ssl.create_default_context(
            purpose=ssl.Purpose.SERVER_AUTH, cafile=str(cafile) if cafile else None
        )
        if settings.kafka_ssl_certfile is not None and settings.kafka_ssl_keyfile is not None:
            context.load_cert_chain(
                str(settings.kafka_ssl_certfile), str(settings.kafka_ssl_keyfile)
            )
    except (OSError, ssl.SSLError) as exc:
        raise KafkaConfigError(
            "kafka config: could not load the TLS files "
            f"(ca={cafile}, cert={settings.kafka_ssl_certfile}, "
            f"key={settings.kafka_ssl_keyfile}): {exc}; expected readable PEM files"
        ) from exc
    return context


def faust_broker_url(settings: Settings) -> str:
    """Faust's ``broker=`` value: ``kafka://h1:p1;kafka://h2:p2``."""
    return ";".join(f"kafka://{server}" for server in bootstrap_servers(settings))


def faust_credentials(settings: Settings) -> faust.SASLCredentials | faust.SSLCredentials | None:
    """Faust's ``broker_credentials=``: None for PLAINTEXT."""
    # Imported here so that admin tools using only confluent_config do not pay for Faust.
    import faust

    _check(settings)
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = ssl_context(settings) if _uses_ssl(settings) else None
    if protocol == "SSL":
        assert context is not None
        return faust.SSLCredentials(context)
    assert settings.kafka_sasl_password is not None  # guaranteed by _check
    # Faust turns SASL into SASL_SSL exactly when it is given an SSL context.
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_password.get_secret_value(),
        mechanism=settings.kafka_sasl_mechanism,
        ssl_context=context,
    )


def faust_broker_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``faust.App(...)``: ``broker`` and ``broker_credentials``."""
    return {
        "broker": faust_broker_url(settings),
        "broker_credentials": faust_credentials(settings),
    }


def describe(settings: Settings) -> str:
    """One line for startup logs: where we connect and how, without secrets."""
    parts = [settings.kafka_bootstrap, settings.kafka_security_protocol]
    if _uses_sasl(settings):
        parts.append(f"{settings.kafka_sasl_mechanism} as {settings.kafka_sasl_username}")
    if settings.kafka_ssl_cafile is not None:
        parts.append(f"ca={Path(settings.kafka_ssl_cafile)}")
    return " ".join(parts)


def consume_available(consumer: Any, max_messages: int, timeout_s: float) -> list[Any]:
    """The messages a confluent-kafka consumer has now, waiting up to ``timeout_s`` only for
    the first one.

    ``Consumer.consume(num_messages=n, timeout=t)`` returns early only when ``n`` messages
    are in: at a trickle it holds the first message for the whole ``t`` (measured: 1.0 s
    for every message at 3 per second). Anything that reacts to messages or times them
    (the catalog and control feeds, the benchmarks' output collector) waits for one message
    with ``poll``, then drains what is already fetched without waiting.
    """
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    if max_messages <= 1:
        return [first]
    return [first, *consumer.consume(num_messages=max_messages - 1, timeout=0)]
