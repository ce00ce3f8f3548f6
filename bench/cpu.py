"""Where the machine's CPU went while one program consumed a slot: the walsender decoding for it
(the slot's active_pid), the Kafka broker, and the machine as a whole (busy cores), sampled every
0.2 s by a thread. With both servers, the broker and the program on the same cores, a program can
only be as fast as the CPU the others leave it: these figures say how much that was."""

import contextlib
import threading
import time
from typing import Any

import psutil

from bench.pg import connect, scalar

INTERVAL = 0.2


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def broker_processes() -> list[psutil.Process]:
    """The Kafka broker(s) running on this machine (a JVM running kafka.Kafka)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if "kafka.Kafka" in (proc.info["cmdline"] or []):
                found.append(proc)
    return found


class CpuShare:
    """Started before the program, stopped once it is done: `figures(events)`."""

    def __init__(self, dsn: str, slot: str) -> None:
        self.dsn = dsn
        self.slot = slot
        self.walsenders: dict[int, float] = {}  # pid -> its CPU seconds when last seen
        self.brokers = broker_processes()
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "CpuShare":
        self.started = time.monotonic()
        self.machine_start = psutil.cpu_times()
        self.broker_start = self._broker_cpu()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        self.thread.join()
        self.seconds = time.monotonic() - self.started
        machine = psutil.cpu_times()
        busy = (sum(machine) - machine.idle - machine.iowait) - (
            sum(self.machine_start) - self.machine_start.idle - self.machine_start.iowait
        )
        self.machine_busy = busy
        self.broker_cpu = self._broker_cpu() - self.broker_start

    def _broker_cpu(self) -> float:
        total = 0.0
        for proc in self.brokers:
            with contextlib.suppress(psutil.Error):
                total += _cpu(proc)
        return total

    def _sample(self) -> None:
        with contextlib.closing(connect(self.dsn, application_name="cdc-bench cpu")) as conn:
            while not self.stop_flag.wait(INTERVAL):
                pid = scalar(
                    conn, "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)
                )
                if pid:
                    with contextlib.suppress(psutil.Error):
                        self.walsenders[int(pid)] = _cpu(psutil.Process(int(pid)))

    def figures(self, events: int, program_cpu: float | None = None) -> dict[str, Any]:
        """CPU seconds of each part over the window, and microseconds of CPU per event."""
        walsender = sum(self.walsenders.values())
        parts = {"walsender": walsender, "broker": self.broker_cpu}
        if program_cpu is not None:
            parts["program"] = program_cpu
        return {
            "window_s": round(self.seconds, 2),
            "machine_busy_cores": round(self.machine_busy / self.seconds, 2),
            "cpu_s": {name: round(value, 2) for name, value in parts.items()},
            "cpu_us_per_event": {name: round(value / events * 1e6, 2) for name, value in parts.items()},
            "machine_cpu_us_per_event": round(self.machine_busy / events * 1e6, 2),
        }
