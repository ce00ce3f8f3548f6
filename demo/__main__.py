"""`make demo`: the writer, cdc-source and cdc-sink running as separate processes on the local stack,
with a live view of rows on both sides, events per second, lag and end-to-end latency.

Ctrl-C (or SIGTERM) stops everything in order (the writer, then the connectors once the target caught
up) and runs cdc-verify; a second Ctrl-C kills every program at once. A program that exits by itself
stops the others at once and the demo with one line naming it, its last error and its log. No program
outlives the demo: SIGHUP (the terminal closed) and a closed output (`| tee` that exited) stop them
too, and the kernel sends each SIGTERM when the demo dies, even when it is killed with SIGKILL."""

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import click
from psycopg2 import sql
from rich.console import Console
from rich.live import Live
from rich.table import Table

from demo.processes import GRACE, Output, Signals, Stop, exit_status, last_error, output_gone, say, silence, spawn
from demo.view import fmt, free_port, latency_buckets, quantile, scrape, total
from pg_kafka_cdc.common.pg import connect
from pg_kafka_cdc.common.settings import DEFAULT_SOURCE_DSN, DEFAULT_TARGET_DSN

TABLES = ("person", "orders")
BIN = Path(sys.executable).parent
STOP_TIMEOUT = 30.0  # seconds a program may take to stop in the orderly stop
CATCH_UP_TIMEOUT = 60.0


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
