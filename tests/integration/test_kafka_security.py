"""The pipeline against a secured Kafka: TLS, SASL/SCRAM-SHA-512 over TLS and over plain TCP, on a
private broker (the shared one stays PLAINTEXT). cdc-source and cdc-sink get the security settings
only from the documented environment variables (KAFKA_SECURITY_PROTOCOL, KAFKA_SSL_*, KAFKA_SASL_*),
or once from a --kafka-config properties file; rows must arrive and cdc-verify must find the target
identical, and the SASL password must never appear in what the programs print.

The test makes its own certificate authority and broker certificate with the `openssl` command, and
gives the broker its SCRAM user when the storage is formatted (`StorageTool format --add-scram`).
"""

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from tests.conftest import Databases
from tests.helpers import CliProcess, run_cli, start_cli, wait_until
from tests.kafka_broker import PrivateBroker, free_port
from tests.pipeline import (
    assert_running,
    partition_ends,
    run_writer,
    sink_args,
    source_args,
    stop_cleanly,
    wait_applied,
    wait_for_output,
    wait_identical,
)

SASL_USER = "cdc"
SASL_PASSWORD = f"K4fka-S3cr3t-{uuid.uuid4().hex[:8]}"
TABLES = ("public.person", "public.orders")


# --- certificates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA certificate (PEM): what clients trust
    keystore: Path  # the broker's PKCS#8 key followed by its certificate chain (PEM)


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"openssl {' '.join(args)} failed:\n{result.stderr}"


def make_certificates(folder: Path) -> Certificates:
    """A self-signed CA, and a broker certificate it signed for 127.0.0.1 and localhost."""
    folder.mkdir(parents=True, exist_ok=True)
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=cdc test CA",
        cwd=folder,
    )  # fmt: skip
    (folder / "broker.ext").write_text(
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
        "basicConstraints = CA:FALSE\n"
        "keyUsage = digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
    )
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
        "-subj", "/CN=localhost",
        cwd=folder,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "broker.pem", "-days", "2", "-extfile", "broker.ext",
        cwd=folder,
    )  # fmt: skip
    key = (folder / "broker.key").read_text()
    assert "BEGIN PRIVATE KEY" in key, "Kafka's PEM keystore wants an unencrypted PKCS#8 key"
    keystore = folder / "broker-keystore.pem"
    keystore.write_text(key + (folder / "broker.pem").read_text() + (folder / "ca.pem").read_text())
    return Certificates(ca=folder / "ca.pem", keystore=keystore)


# --- the broker --------------------------------------------------------------------------------


class ScramBroker(PrivateBroker):
    """A PrivateBroker whose storage is formatted with SCRAM-SHA-512 users. start() is its own: it
    formats with --add-scram, and keeps kafka.out open until stop() (PrivateBroker.start leaves the
    file to the garbage collector, a ResourceWarning that this suite turns into an error)."""

    def __init__(self, *args: object, scram_users: dict[str, str], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.scram_users = scram_users
        self.log: BinaryIO | None = None

    def start(self, timeout: float = 90) -> "ScramBroker":
        config = self.dir / "server.properties"
        config.write_text(self._properties())
        if not self._formatted:
            users = [
                arg
                for name, password in self.scram_users.items()
                for arg in ("--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]")
            ]
            result = subprocess.run(
                self._java(
                    "kafka.tools.StorageTool",
                    "format",
                    "--standalone",
                    "-t",
                    self.cluster_id,
                    "-c",
                    str(config),
                    *users,
                ),
                capture_output=True,
                text=True,
                check=False,
            )
            assert result.returncode == 0, (
                f"formatting the broker's storage failed:\n{result.stdout}{result.stderr}"
            )
            self._formatted = True
        self.log = (self.dir / "kafka.out").open("ab")
        self.process = subprocess.Popen(
            self._java("kafka.Kafka", str(config)), stdout=self.log, stderr=self.log, start_new_session=True
        )
        self.wait_ready(timeout)
        return self

    def stop(self) -> None:
        super().stop()
        if self.log is not None:
            self.log.close()
            self.log = None


JAAS = "org.apache.kafka.common.security.scram.ScramLoginModule required;"


def broker_settings(certs: Certificates) -> dict[str, str]:
    """The server.properties lines that secure the SSL, SASL_SSL and SASL_PLAINTEXT listeners."""
    return {
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(certs.keystore),
        "sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": JAAS,
        "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config": JAAS,
    }


@dataclass(frozen=True)
class SecureKafka:
    broker: ScramBroker
    certs: Certificates

    def address(self, listener: str) -> str:
        return f"127.0.0.1:{self.broker.listeners[listener]}"

    @property
    def plaintext(self) -> str:
        """The broker's PLAINTEXT listener: for the test's own checks only (and inter-broker)."""
        return self.address("PLAINTEXT")


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    folder = tmp_path_factory.mktemp("secure-kafka")
    certs = make_certificates(folder / "certs")
    listeners = {name: free_port() for name in ("PLAINTEXT", "SSL", "SASL_SSL", "SASL_PLAINTEXT")}
    broker = ScramBroker(
        folder / "broker",
        listeners=listeners,
        protocols={"SSL": "SSL", "SASL_SSL": "SASL_SSL", "SASL_PLAINTEXT": "SASL_PLAINTEXT"},
        extra=broker_settings(certs),
        client_listener="PLAINTEXT",
        scram_users={SASL_USER: SASL_PASSWORD},
    )
    try:
        broker.start()
        yield SecureKafka(broker, certs)
    finally:
        broker.stop()


# --- the client settings, as an operator gives them ---------------------------------------------


def env_settings(kafka: SecureKafka, protocol: str) -> dict[str, str]:
    """Everything about Kafka through environment variables, the way the README documents it."""
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka.address(protocol), "KAFKA_SECURITY_PROTOCOL": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        env["KAFKA_SSL_CA_LOCATION"] = str(kafka.certs.ca)
    if protocol.startswith("SASL_"):
        env |= {
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": SASL_USER,
            "KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        }
    return env


@dataclass
class Pipeline:
    source: CliProcess
    sink: CliProcess
    prefix: str
    slot: str
    group: str

    def output(self) -> str:
        return "".join(p.stdout_text() + p.stderr_text() for p in (self.source, self.sink))


def run_pipeline(dbs: Databases, kafka: SecureKafka, env: dict[str, str], *extra: str) -> Pipeline:
    """Writer rows before and while source and sink run with `env` and `extra` arguments; returns
    once cdc-verify finds the target identical and both connectors stopped cleanly."""
    prefix, slot, group = f"t{uuid.uuid4().hex[:8]}", f"t_sec_{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    tables = ("--tables", ",".join(TABLES))
    run_writer(dbs, "--count", "100", "--rate", "0", "--seed", "7")  # rows for the initial snapshot
    source = start_cli(source_args(dbs, prefix, slot, *tables, "--kafka-timeout", "30", *extra), env=env)
    wait_for_output(source, "streaming from slot", timeout=90)
    sink = start_cli(sink_args(dbs, prefix, slot, group, *tables, "--kafka-timeout", "30", *extra), env=env)
    run_writer(dbs, "--count", "300", "--rate", "0", "--seed", "8")  # changes through Kafka
    pipeline = Pipeline(source, sink, prefix, slot, group)
    topics = [f"{prefix}.public.person", f"{prefix}.public.orders"]
    wait_until(
        lambda: sum(partition_ends(kafka.plaintext, topics).values()) >= 300,
        timeout=90,
        message="the changes did not reach the secured broker",
    )
    wait_applied(dbs, kafka.plaintext, group, topics, processes=[source, sink])
    wait_identical(dbs, TABLES, processes=[source, sink])
    assert_running(source, sink)
    stop_cleanly(source, sink)
    return pipeline


def assert_secret_kept(text: str) -> None:
    assert SASL_PASSWORD not in text, "the SASL password appears in the programs' output"
    assert "Traceback" not in text, text


@pytest.mark.parametrize("protocol", ["SSL", "SASL_SSL", "SASL_PLAINTEXT"])
def test_pipeline_through_environment_variables(
    dbs: Databases, secure_kafka: SecureKafka, protocol: str, tmp_path: Path
) -> None:
    env = env_settings(secure_kafka, protocol)
    pipeline = run_pipeline(dbs, secure_kafka, env)
    logs = pipeline.output()
    assert_secret_kept(logs)
    # cdc-status reads the topics with the same settings, and sees everything applied.
    status = run_cli(
        [
            "cdc-status",
            "--source-dsn",
            dbs.source_dsn,
            "--target-dsn",
            dbs.target_dsn,
            "--topic-prefix",
            pipeline.prefix,
            "--slot",
            pipeline.slot,
            "--group",
            pipeline.group,
            "--tables",
            ",".join(TABLES),
            "--json",
            "--log-format",
            "text",
        ],
        env=env,
    )
    assert status.returncode == 0, status
    assert_secret_kept(status.stdout + status.stderr)
    assert '"lag_messages":0' in status.stdout, status.stdout


def test_pipeline_through_a_kafka_config_file(dbs: Databases, secure_kafka: SecureKafka, tmp_path: Path) -> None:
    properties = tmp_path / "kafka-client.properties"
    properties.write_text(
        "# librdkafka settings for cdc-source and cdc-sink\n"
        "security.protocol=SASL_SSL\n"
        f"ssl.ca.location={secure_kafka.certs.ca}\n"
        "sasl.mechanism=SCRAM-SHA-512\n"
        f"sasl.username={SASL_USER}\n"
        f"sasl.password={SASL_PASSWORD}\n"
    )
    env = {"KAFKA_BOOTSTRAP_SERVERS": secure_kafka.address("SASL_SSL")}
    pipeline = run_pipeline(dbs, secure_kafka, env, "--kafka-config", str(properties))
    assert_secret_kept(pipeline.output())


# --- the settings are really needed -----------------------------------------------------------


def fails_fast(program: str, dbs: Databases, env: dict[str, str]) -> str:
    """cdc-source's or cdc-sink's output when it gives up on Kafka (--kafka-timeout 3)."""
    prefix, slot = f"t{uuid.uuid4().hex[:8]}", f"t_sec_{uuid.uuid4().hex[:8]}"
    args = (
        source_args(dbs, prefix, slot, "--kafka-timeout", "3")
        if program == "cdc-source"
        else sink_args(dbs, prefix, slot, f"g-{uuid.uuid4().hex[:8]}", "--kafka-timeout", "3")
    )
    result = run_cli(args, env=env, timeout=120)
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith(f"{program}: error: Kafka"), result.stderr
    output = result.stdout + result.stderr
    assert_secret_kept(output)
    return output


@pytest.mark.parametrize("program", ["cdc-source", "cdc-sink"])
def test_plain_client_is_refused_by_the_tls_listener(
    dbs: Databases, secure_kafka: SecureKafka, program: str
) -> None:
    run_writer(dbs, "--count", "1")
    fails_fast(program, dbs, {"KAFKA_BOOTSTRAP_SERVERS": secure_kafka.address("SSL")})


def wrong_password(kafka: SecureKafka) -> dict[str, str]:
    return env_settings(kafka, "SASL_SSL") | {"KAFKA_SASL_PASSWORD": SASL_PASSWORD + "-wrong"}


@pytest.mark.parametrize("program", ["cdc-source", "cdc-sink"])
def test_wrong_sasl_password_is_refused_and_not_printed(
    dbs: Databases, secure_kafka: SecureKafka, program: str
) -> None:
    run_writer(dbs, "--count", "1")
    output = fails_fast(program, dbs, wrong_password(secure_kafka))
    assert "refused the credentials" in output.splitlines()[-1], output


def test_wrong_sasl_password_is_named_as_an_authentication_failure(
    dbs: Databases, secure_kafka: SecureKafka
) -> None:
    run_writer(dbs, "--count", "1")
    last = fails_fast("cdc-source", dbs, wrong_password(secure_kafka)).splitlines()[-1]
    assert "authentication" in last.lower(), last
