"""tests.kafka_broker.PrivateBroker for the fault scenarios: the same broker, plus pause/resume
(SIGSTOP/SIGCONT: a broker that accepts connections but answers nothing), and a start() that closes
its copy of the log file (PrivateBroker.start leaves it open, which the suite's warnings-as-errors
turns into a failure as soon as the file object is collected)."""

import contextlib
import os
import signal
import subprocess

from tests.kafka_broker import PrivateBroker


class FaultBroker(PrivateBroker):
    def start(self, timeout: float = 90) -> "FaultBroker":
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
        with open(self.dir / "kafka.out", "ab") as log:
            self.process = subprocess.Popen(
                self._java("kafka.Kafka", str(config)), stdout=log, stderr=log, start_new_session=True
            )
        self.wait_ready(timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, "the broker was never started"
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the broker's sockets stay open, nothing is answered."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)

    def log_text(self) -> str:
        parts = []
        for name in ("kafka.out", "server.log"):
            with contextlib.suppress(OSError):
                parts.append((self.dir / name).read_text(errors="replace"))
        return "\n".join(parts)
