"""Kafka plumbing shared by the connectors: reachability with a deadline, topic creation, errors."""

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from pg_kafka_cdc.common.errors import ConnectError
from pg_kafka_cdc.common.retry import Backoff
from pg_kafka_cdc.common.settings import Settings

log = logging.getLogger("kafka")

# Topics that keep a table's whole history: nothing is deleted by age or size.
HISTORY_TOPIC_CONFIG = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}


def kafka_reason(exc: BaseException) -> str:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        err: KafkaError = exc.args[0]
        return f"{err.name()}: {err.str()}"
    return str(exc) or type(exc).__name__


def admin_client(settings: Settings) -> Any:
    return AdminClient(settings.kafka_config(**{"socket.timeout.ms": 10000}))


AUTH_ERRORS = {KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED}


def wait_for_kafka(settings: Settings, timeout: float, stop: Any = None) -> Any:
    """The cluster metadata, retrying with backoff until `timeout` seconds have passed. Refused
    credentials and TLS failures are named as such, not as an unreachable broker."""
    errors: list[KafkaError] = []
    probe = AdminClient(settings.kafka_config(**{"socket.timeout.ms": 10000, "error_cb": errors.append}))
    backoff = Backoff(base=0.5, cap=5.0, deadline=timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            metadata = probe.list_topics(timeout=max(0.5, min(5.0, deadline - time.monotonic())))
            if metadata.brokers:
                return metadata
            reason = "no broker in the metadata"
        except KafkaException as exc:
            reason = kafka_reason(exc)
        probe.poll(0)
        for err in errors:
            if err.code() in AUTH_ERRORS:
                raise ConnectError(
                    f"Kafka at {settings.bootstrap_servers} refused the credentials ({err.str()}); check "
                    "KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD (or --kafka-config)"
                )
            if err.code() == KafkaError._SSL:
                raise ConnectError(
                    f"TLS with Kafka at {settings.bootstrap_servers} failed ({err.str()}); check "
                    "KAFKA_SECURITY_PROTOCOL, KAFKA_SSL_CA_LOCATION and the broker's certificate"
                )
        errors.clear()
        delay = backoff.next_delay(time.monotonic())
        if delay is None or (stop is not None and stop):
            raise ConnectError(
                f"Kafka is unreachable at {settings.bootstrap_servers} (tried for {timeout:g} s: {reason}); "
                "check --bootstrap-servers / KAFKA_BOOTSTRAP_SERVERS, the security settings, and that the broker runs"
            )
        log.warning(
            "Kafka not reachable yet at %s (%s); retrying in %.1f s",
            settings.bootstrap_servers,
            reason,
            delay,
        )
        time.sleep(delay)


def ensure_topics(
    admin: Any,
    topics: Iterable[str],
    partitions: int,
    replication_factor: int,
    config: Mapping[str, str],
    timeout: float = 30,
    quiet: bool = False,
) -> dict[str, int]:
    """Create the topics that do not exist; returns every topic's partition count."""
    wanted = list(dict.fromkeys(topics))
    existing = admin.list_topics(timeout=10).topics
    missing = [t for t in wanted if t not in existing]
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(t, num_partitions=partitions, replication_factor=replication_factor, config=dict(config))
                for t in missing
            ],
            operation_timeout=timeout,
            request_timeout=timeout,
        )
        for topic, future in futures.items():
            try:
                future.result()
                log.log(
                    logging.DEBUG if quiet else logging.INFO,
                    "created topic %s (%d partitions)",
                    topic,
                    partitions,
                    extra={"topic": topic},
                )
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise ConnectError(f"cannot create Kafka topic {topic}: {kafka_reason(exc)}") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            existing = admin.list_topics(timeout=10).topics
            if all(t in existing and existing[t].partitions for t in wanted):
                break
            time.sleep(0.1)
    return {t: len(existing[t].partitions) for t in wanted if t in existing}
