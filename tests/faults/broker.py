"""tests.kafka_broker.PrivateBroker for the fault scenarios: the same broker, plus pause/resume
(SIGSTOP/SIGCONT: a broker that accepts connections but answers nothing) and its logs."""

import contextlib
import os
import signal

from tests.kafka_broker import PrivateBroker


class FaultBroker(PrivateBroker):
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
