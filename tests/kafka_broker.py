"""A private Kafka broker for tests that break, secure or restart Kafka without touching the shared
stack's broker: same jars (the stack's `libs-<version>` folder), own ports, own data folder.

    broker = PrivateBroker(tmp_path, listeners={"PLAINTEXT": free_port()})
    broker.start()            # returns once it answers
    broker.kill()             # SIGKILL (a crash); broker.start() again recovers its data
    broker.stop()             # SIGTERM, clean

`listeners` maps a listener name to its port; `advertised` may map a name to another port (a TCP
proxy in front of it); `protocols` maps names to security protocols (default PLAINTEXT); `extra` adds
server.properties lines (TLS keystores, SASL settings...). The controller gets its own port.
"""

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import IO, Self

from confluent_kafka.admin import AdminClient

ROOT = Path(__file__).resolve().parent.parent
STACK_DIR = Path(os.environ.get("STACK_DIR", ROOT / ".stack"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kafka_libs() -> Path:
    found = sorted((STACK_DIR / "kafka").glob("libs-*/.complete"))
    if not found:
        raise AssertionError(f"no Kafka jars under {STACK_DIR / 'kafka'}: run `make up` first")
    return found[-1].parent


class PrivateBroker:
    def __init__(
        self,
        workdir: Path,
        listeners: dict[str, int],
        advertised: dict[str, int] | None = None,
        protocols: dict[str, str] | None = None,
        extra: dict[str, str] | None = None,
        client_listener: str | None = None,
        client_config: dict[str, str] | None = None,
    ) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.listeners = listeners
        self.advertised = {**listeners, **(advertised or {})}
        self.protocols = {name: "PLAINTEXT" for name in listeners} | (protocols or {})
        self.extra = extra or {}
        self.controller_port = free_port()
        self.client_listener = client_listener or next(iter(listeners))
        self.client_config = client_config or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.cluster_id = str(uuid.uuid4())
        self.log: IO[bytes] | None = None
        self._formatted = False

    @property
    def bootstrap(self) -> str:
        """The address clients of `client_listener` connect to (the advertised one)."""
        return f"127.0.0.1:{self.advertised[self.client_listener]}"

    def _properties(self) -> str:
        names = list(self.listeners)
        inter = next((n for n in names if self.protocols[n] == "PLAINTEXT"), names[0])
        lines = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": ",".join(
                [f"{n}://127.0.0.1:{p}" for n, p in self.listeners.items()]
                + [f"CONTROLLER://127.0.0.1:{self.controller_port}"]
            ),
            "advertised.listeners": ",".join(f"{n}://127.0.0.1:{self.advertised[n]}" for n in names),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": inter,
            "listener.security.protocol.map": ",".join(
                [f"{n}:{self.protocols[n]}" for n in names] + ["CONTROLLER:PLAINTEXT"]
            ),
            "log.dirs": str(self.dir / "data"),
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "2",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "message.max.bytes": "67108864",
            **self.extra,
        }
        return "".join(f"{k}={v}\n" for k, v in lines.items())

    def _java(self, *args: str) -> list[str]:
        return [
            "java",
            "-Xms128m",
            "-Xmx512m",
            f"-Dkafka.logs.dir={self.dir}",
            f"-Dlog4j2.configurationFile={ROOT / 'stack' / 'kafka' / 'log4j2.properties'}",
            "-cp",
            f"{kafka_libs()}/*",
            *args,
        ]

    def start(self, timeout: float = 90) -> Self:
        config = self.dir / "server.properties"
        config.write_text(self._properties())
        if not self._formatted:
            subprocess.run(
                self._java(
                    "kafka.tools.StorageTool", "format", "--standalone", "-t", self.cluster_id, "-c", str(config)
                ),
                check=True,
                capture_output=True,
            )
            self._formatted = True
        self._close_log()
        self.log = open(self.dir / "kafka.out", "ab")  # noqa: SIM115 - closed by kill() and stop()
        self.process = subprocess.Popen(
            self._java("kafka.Kafka", str(config)), stdout=self.log, stderr=self.log, start_new_session=True
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0, **self.client_config})
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"the private broker exited; see {self.dir / 'kafka.out'} and server.log")
            try:
                if admin.list_topics(timeout=2).brokers:
                    return
            except Exception:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the private broker did not answer within {timeout:g} s")

    def _close_log(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)
        self._close_log()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self._close_log()
