"""`make demo`: the writer, cdc-source and cdc-sink running as separate processes on the local stack,
with a live view of rows on both sides, events per second, lag and end-to-end latency.

Ctrl-C (or SIGTERM) stops everything in order (the writer, then the connectors once the target caught
up) and runs cdc-verify; a second Ctrl-C kills every program at once. A program that exits by itself
stops the others at once and the demo with one line naming it, its last error and its log. No program
outlives the demo: SIGHUP (the terminal closed) and a closed output (`| tee` that exited) stop them
too, and the kernel sends each SIGTERM when the demo dies, even when it is killed with SIGKILL."""

import contextlib
import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO

import click
import orjson
from prometheus_client.parser import text_string_to_metric_families
from psycopg2 import sql
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pg_kafka_cdc.common.pg import connect
from pg_kafka_cdc.common.settings import DEFAULT_SOURCE_DSN, DEFAULT_TARGET_DSN

TABLES = ("person", "orders")
BIN = Path(sys.executable).parent
GRACE = 5.0  # seconds from SIGTERM to SIGKILL when everything stops at once
STOP_TIMEOUT = 30.0  # seconds a program may take to stop in the orderly stop
CATCH_UP_TIMEOUT = 60.0
LOG_TAIL = 256 * 1024  # bytes of a log read for its last error
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
LIBC = ctypes.CDLL(None, use_errno=True)


class Stop(BaseException):
    """Stop every program at once (SIGTERM, SIGKILL `grace` seconds later), print `message` and exit
    with `code`. A BaseException, so that the `except Exception` of the view does not take it."""

    def __init__(self, code: int, message: str, grace: float = GRACE) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.grace = grace


class Signals:
    """SIGINT or SIGTERM asks for the orderly stop; one during that stop, or SIGHUP, raises Stop
    wherever the demo is. Once the demo stops at once (`now`), signals change nothing."""

    def __init__(self) -> None:
        self.requested = False
        self.now = False
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.now:
            return
        if signum != signal.SIGHUP and not self.requested:
            self.requested = True
            return
        self.now = True
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            raise Stop(128 + signum, f"{name}: stopping every program")
        raise Stop(128 + signum, f"{name} during the stop: every program killed, no cdc-verify", grace=0)


class Output(Console):
    """The console. A pipe whose reader exited raises BrokenPipeError, as a closed terminal raises
    OSError (EIO), instead of exiting the demo on the spot."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "the output was closed")


def output_gone(exc: OSError) -> bool:
    return isinstance(exc, BrokenPipeError) or exc.errno == errno.EIO


def silence(console: Console) -> None:
    """Write nothing more: the terminal or pipe the output went to is gone."""
    console.quiet = True
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # what is still buffered for stdout goes nowhere at exit
    os.close(devnull)


def say(console: Console, message: str) -> None:
    """One line in red, never wrapped into several; nothing when the output is gone."""
    try:
        console.print(message, style="red", markup=False, highlight=False, soft_wrap=True)
    except OSError:
        silence(console)


def die_with(parent: int) -> Callable[[], None]:
    """Popen's preexec_fn: the child gets SIGTERM when `parent` exits, however it exits (Linux). A
    parent gone already, between the fork and this call, would never send it: the child exits."""

    def preexec() -> None:
        LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def spawn(args: list[str], output: IO[bytes] | None) -> subprocess.Popen[bytes]:
    """A program in a session of its own (Ctrl-C reaches the demo only) that dies with the demo;
    `output` takes its stdout and stderr (None: the demo's)."""
    return subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        start_new_session=True,
        preexec_fn=die_with(os.getpid()) if sys.platform == "linux" else None,  # noqa: PLW1509 - one thread
    )


def exit_status(code: int) -> str:
    if code >= 0:
        return f"exited with {code}"
    try:
        return f"was killed by {signal.Signals(-code).name} (exit {code})"
    except ValueError:
        return f"was killed by signal {-code} (exit {code})"


def log_line(line: str) -> tuple[str, str]:
    """(message, level) of a JSON log line; (the line, "") for any other."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line, ""
    if not isinstance(doc, dict):
        return line, ""
    return " ".join(str(doc.get("msg", line)).split()), str(doc.get("level", ""))


def last_error(path: Path, start: int) -> str:
    """The last error logged in `path` after byte `start`, else its last line ("" when empty)."""
    try:
        with path.open("rb") as log:
            begin = max(start, log.seek(0, os.SEEK_END) - LOG_TAIL)
            log.seek(begin)
            lines = log.read().decode(errors="replace").splitlines()[1 if begin > start else 0 :]
    except OSError:
        return ""
    parsed = [log_line(line.strip()) for line in lines if line.strip()]
    errors = [message for message, level in parsed if level in ("error", "critical")]
    if errors:
        return f"last error: {errors[-1]}"
    return f"last log line: {parsed[-1][0]}" if parsed else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Metric samples by name from a connector's /metrics (empty while it is starting)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return {}
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(v for _, v in samples.get(name, []))


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """A quantile (upper bound of its bucket) from cumulative histogram buckets."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    wanted = q * buckets[-1][1]
    for bound, count in buckets:
        if count >= wanted:
            return bound
    return None


def latency_buckets(samples: dict[str, list[tuple[dict[str, str], float]]]) -> list[tuple[float, float]]:
    rows = samples.get("cdc_sink_end_to_end_latency_seconds_bucket", [])
    return sorted((float(labels["le"]), v) for labels, v in rows)


class Demo:
    def __init__(self, rate: float, logs: Path) -> None:
        self.rate = rate
        self.logs = logs
        self.source_dsn = os.environ.get("SOURCE_DSN", DEFAULT_SOURCE_DSN)
        self.target_dsn = os.environ.get("TARGET_DSN", DEFAULT_TARGET_DSN)
        self.source_port = free_port()
        self.sink_port = free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.log_start: dict[str, int] = {}  # where this run's lines begin in each log
        self.stopping: set[str] = set()  # asked to stop: their exit is expected
        self.last: tuple[float, float, float] | None = None
        self.window: list[tuple[float, list[tuple[float, float]]]] = []

    def start(self, name: str, *args: str) -> None:
        """Start console script `name` with its output in the log of the same name."""
        path = self.logs / f"{name}.log"
        try:
            with path.open("ab") as log:  # the program keeps a descriptor of its own
                self.log_start[name] = log.tell()
                self.processes[name] = spawn([str(BIN / name), *args, "--log-format", "json"], log)
        except OSError as exc:
            raise Stop(1, f"cannot start {name}: {exc}") from None

    def check(self) -> None:
        """Stop raised for the first program that exited without being asked to."""
        for name, process in self.processes.items():
            if name not in self.stopping and process.poll() is not None:
                path = self.logs / f"{name}.log"
                found = last_error(path, self.log_start.get(name, 0))
                parts = [f"{name} {exit_status(process.returncode)}", found, f"see {path}"]
                raise Stop(1, "; ".join(part for part in parts if part))

    def counts(self, dsn: str) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        try:
            conn = connect(dsn, role="demo", setting="", application_name="cdc-demo")
        except Exception:
            return {t: None for t in TABLES}
        with conn, conn.cursor() as cur:
            for table in TABLES:
                try:
                    cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("public", table)))
                    out[table] = int(cur.fetchone()[0])
                except Exception:
                    out[table] = None
        conn.close()
        return out

    def view(self) -> Table:
        now = time.monotonic()
        source_rows, target_rows = self.counts(self.source_dsn), self.counts(self.target_dsn)
        src, snk = scrape(self.source_port), scrape(self.sink_port)
        published = total(src, "cdc_source_events_total")
        applied = total(snk, "cdc_sink_changes_applied_total")
        lag = total(snk, "cdc_sink_consumer_lag_messages")
        rate_pub = rate_app = 0.0
        if self.last is not None and now > self.last[0]:
            rate_pub = (published - self.last[1]) / (now - self.last[0])
            rate_app = (applied - self.last[2]) / (now - self.last[0])
        self.last = (now, published, applied)
        buckets = latency_buckets(snk)
        self.window = [(t, b) for t, b in self.window if now - t <= 10] + [(now, buckets)]
        recent = buckets
        if len(self.window) > 1 and self.window[0][1]:
            old = dict(self.window[0][1])
            recent = [(le, v - old.get(le, 0.0)) for le, v in buckets]
        p50, p99 = quantile(recent, 0.5), quantile(recent, 0.99)
        table = Table(title="pg-kafka-cdc demo — Ctrl-C stops everything cleanly", title_justify="left")
        for column in ("table", "source rows", "target rows", "difference"):
            table.add_column(column, justify="right" if column != "table" else "left")
        for name in TABLES:
            s, t = source_rows[name], target_rows[name]
            diff = "-" if s is None or t is None else str(s - t)
            table.add_row(name, "-" if s is None else str(s), "-" if t is None else str(t), diff)
        table.caption = (
            f"events published {published:.0f} ({rate_pub:.0f}/s) · applied {applied:.0f} ({rate_app:.0f}/s) · "
            f"lag {lag:.0f} messages · latency (last 10 s) p50 ≤ {fmt(p50)}, p99 ≤ {fmt(p99)} · "
            f"logs in {self.logs}"
        )
        return table

    def stop(self, name: str, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM to one program; SIGKILL if it still runs `timeout` seconds later."""
        self.stopping.add(name)
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop_all(self, grace: float) -> None:
        """SIGTERM to every program still running, SIGKILL to those still running `grace` s later."""
        running = [p for p in self.processes.values() if p.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + grace
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def wait_caught_up(self, timeout: float = CATCH_UP_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            if self.counts(self.source_dsn) == self.counts(self.target_dsn) and not total(
                scrape(self.sink_port), "cdc_sink_consumer_lag_messages"
            ):
                return True
            time.sleep(0.5)
        return False

    def verify(self) -> int:
        """cdc-verify on the demo's output; its exit code."""
        self.stopping.add("cdc-verify")
        self.processes["cdc-verify"] = spawn(
            [str(BIN / "cdc-verify"), "--tables", "public.person,public.orders"], None
        )
        return self.processes["cdc-verify"].wait()


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return "∞" if seconds == float("inf") else f"{seconds * 1000:.0f} ms"


def run(demo: Demo, console: Console, signals: Signals, seconds: float | None) -> int:
    """Start the programs, show them until a stop is asked for, stop them in order and verify."""
    demo.start("cdc-writer", "--rate", str(demo.rate))
    time.sleep(1.0)  # the writer creates its tables
    demo.check()
    demo.start("cdc-source", "--metrics-port", str(demo.source_port))
    demo.start("cdc-sink", "--metrics-port", str(demo.sink_port))
    started = time.monotonic()
    with Live(demo.view(), console=console, auto_refresh=False) as live:
        while not signals.requested and (seconds is None or time.monotonic() - started < seconds):
            time.sleep(0.5)
            demo.check()
            live.update(demo.view(), refresh=True)
        signals.requested = True  # from here on a signal hurries the stop
        console.print("stopping: the writer first, then the connectors once the target caught up")
        demo.stop("cdc-writer")
        caught_up = demo.wait_caught_up()
        live.update(demo.view(), refresh=True)
    if not caught_up:
        say(console, f"the target did not catch up within {CATCH_UP_TIMEOUT:g} s")
    demo.stop("cdc-source")
    demo.stop("cdc-sink")
    return demo.verify()


@click.command()
@click.option(
    "--rate", type=float, default=float(os.environ.get("WRITER_RATE", "20")), help="Writer operations/s."
)
@click.option("--seconds", type=float, default=None, help="Stop by itself after this long (default: Ctrl-C).")
def main(rate: float, seconds: float | None) -> None:
    """Run writer, source and sink and show them replicating."""
    logs = Path(os.environ.get("STACK_DIR", ".stack")) / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    demo, console, signals = Demo(rate, logs), Output(), Signals()
    try:
        code = run(demo, console, signals, seconds)
    except Stop as stop:
        signals.now = True
        say(console, stop.message)
        demo.stop_all(stop.grace)
        code = stop.code
    except OSError as exc:
        if not output_gone(exc):
            raise
        signals.now = True
        silence(console)
        code = 1
    finally:  # whatever happened, no program outlives the demo
        signals.now = True
        demo.stop_all(GRACE)
    sys.exit(code)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before the demo's own handler is set
        main()
