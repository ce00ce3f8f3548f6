"""Child processes of the benchmark: started with their output in files, their memory sampled,
stopped by pid (SIGTERM, then SIGKILL after a grace period)."""

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import psutil

from bench.config import REPO, VENV_BIN

log = logging.getLogger("bench.procs")

# Pipeline settings a developer may have exported: the programs must see only what the bench passes.
_PRIVATE_ENV_PREFIXES = ("SOURCE_", "TARGET_", "TOPIC_", "TABLES", "WRITER_", "LOG_", "SINK_", "METRICS_")


def script(name: str) -> str:
    """A console script of the project (cdc-source, cdc-sink, cdc-writer)."""
    path = VENV_BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make venv`")
    return str(path)


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE_ENV_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class RssSampler:
    """Peak resident memory of a process and its children, sampled every `interval` seconds, with
    their CPU time and a coarse timeline (one point a second) for reading the profile afterwards."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self.cpu_seconds = 0.0
        self.samples = 0
        self.timeline: list[list[float]] = []  # [seconds since start, RSS MB, CPU seconds]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss {pid}", daemon=True)

    def start(self) -> "RssSampler":
        self._thread.start()
        return self

    @staticmethod
    def _sample(proc: psutil.Process) -> tuple[int, float]:
        info = proc.as_dict(["memory_info", "cpu_times"])
        rss = info["memory_info"].rss
        cpu = info["cpu_times"].user + info["cpu_times"].system
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                rss += child.memory_info().rss
                times = child.cpu_times()
                cpu += times.user + times.system
        return rss, cpu

    def _run(self) -> None:
        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
        started = time.monotonic()
        next_point = started
        while not self._stop.is_set():
            try:
                rss, cpu = self._sample(proc)
            except (psutil.Error, AttributeError):  # gone (as_dict leaves None for a vanished process)
                return
            self.peak_bytes = max(self.peak_bytes, rss)
            self.cpu_seconds = max(self.cpu_seconds, cpu)
            self.samples += 1
            now = time.monotonic()
            if now >= next_point:
                self.timeline.append([round(now - started, 1), round(rss / 1048576, 1), round(cpu, 2)])
                next_point = now + 1.0
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / (1024 * 1024)


class Proc:
    """A started program: its stdout and stderr go to files in `log_dir`; memory sampled if asked."""

    def __init__(
        self,
        name: str,
        args: list[str],
        log_dir: Path,
        sample_rss: bool = False,
        stdin: IO[bytes] | None = None,
        stdout: int | IO[bytes] | None = None,
    ) -> None:
        self.name = name
        self.args = args
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self._out = open(self.stdout_path, "wb") if stdout is None else None  # noqa: SIM115
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            args,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=self._out if stdout is None else stdout,
            stderr=self._err,
            env=environment(),
            cwd=REPO,
        )
        self.finished: float | None = None
        self.sampler = RssSampler(self.popen.pid).start() if sample_rss else None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        if self.popen.poll() is None:
            return True
        if self.finished is None:
            self.finished = time.monotonic()
        return False

    def wait(self, timeout: float) -> int:
        """Wait for the exit; a TimeoutError (after stopping it) if it takes longer than `timeout`."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise TimeoutError(f"{self.name} did not finish within {timeout:.0f} s; {self.tail()}") from None
        if self.finished is None:
            self.finished = time.monotonic()
        return code

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.0f s: killing it", self.name, self.pid, grace)
                self.popen.kill()
                self.popen.wait(timeout=10)
        if self.finished is None:
            self.finished = time.monotonic()
        self.close()
        return self.popen.returncode

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        for fh in (self._err, self._out):
            if fh is not None and not fh.closed:
                fh.close()

    @property
    def peak_rss_mb(self) -> float | None:
        return None if self.sampler is None else self.sampler.peak_mb

    def resources(self) -> dict[str, Any]:
        """Peak RSS, CPU seconds and the per-second timeline, when sampled."""
        if self.sampler is None:
            return {}
        return {
            "peak_rss_mb": round(self.sampler.peak_mb, 1),
            "cpu_seconds": round(self.sampler.cpu_seconds, 2),
            "rss_samples": self.sampler.samples,
            "timeline_s_rssmb_cpus": self.sampler.timeline,
        }

    def stderr_text(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.stderr_path.read_text(errors="replace")

    def stdout_text(self) -> str:
        if self._out is not None and not self._out.closed:
            self._out.flush()
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def tail(self, lines: int = 15) -> str:
        text = self.stderr_text().strip().splitlines()[-lines:]
        return f"last lines of {self.stderr_path}:\n" + "\n".join(text) if text else f"{self.stderr_path} is empty"

    def __enter__(self) -> "Proc":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def sink_args(
    bootstrap: str,
    source_dsn: str,
    target_dsn: str,
    prefix: str,
    tables: str,
    group: str,
    slot: str,
    snapshot: str,
) -> list[str]:
    """`cdc-sink run ... --once` for one benchmark scenario."""
    return [
        script("cdc-sink"),
        "run",
        "--source-dsn",
        source_dsn,
        "--target-dsn",
        target_dsn,
        "--bootstrap-servers",
        bootstrap,
        "--topic-prefix",
        prefix,
        "--tables",
        tables,
        "--group",
        group,
        "--slot",
        slot,
        "--snapshot",
        snapshot,
        "--once",
        "--log-format",
        "text",
    ]
