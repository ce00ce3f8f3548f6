"""`make demo`: the writer, cdc-source and cdc-sink running as separate processes on the local stack,
with a live view of rows on both sides, events per second, lag and end-to-end latency. Ctrl-C stops
everything in order (writer, then the connectors once the target caught up) and runs cdc-verify."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import click
from prometheus_client.parser import text_string_to_metric_families
from psycopg2 import sql
from rich.console import Console
from rich.live import Live
from rich.table import Table

from cdc_common.pg import connect
from cdc_common.settings import DEFAULT_SOURCE_DSN, DEFAULT_TARGET_DSN

TABLES = ("person", "orders")
BIN = Path(sys.executable).parent


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
        self.last: tuple[float, float, float] | None = None
        self.window: list[tuple[float, list[tuple[float, float]]]] = []

    def start(self, name: str, *args: str) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.processes[name] = subprocess.Popen(
            [str(BIN / args[0]), *args[1:], "--log-format", "json"],
            stdout=log,
            stderr=log,
            start_new_session=True,  # Ctrl-C reaches the demo only
        )

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

    def stop(self, name: str, timeout: float = 60) -> None:
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()

    def wait_caught_up(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.counts(self.source_dsn) == self.counts(self.target_dsn) and not total(
                scrape(self.sink_port), "cdc_sink_consumer_lag_messages"
            ):
                return
            time.sleep(0.5)


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return "∞" if seconds == float("inf") else f"{seconds * 1000:.0f} ms"


@click.command()
@click.option(
    "--rate", type=float, default=float(os.environ.get("WRITER_RATE", "20")), help="Writer operations/s."
)
@click.option("--seconds", type=float, default=None, help="Stop by itself after this long (default: Ctrl-C).")
def main(rate: float, seconds: float | None) -> None:
    """Run writer, source and sink and show them replicating."""
    logs = Path(os.environ.get("STACK_DIR", ".stack")) / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    demo = Demo(rate, logs)
    console = Console()
    stopping = {"flag": False}

    def on_signal(signum: int, frame: Any) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    demo.start("cdc-writer", "cdc-writer", "--rate", str(rate))
    time.sleep(1.0)  # the writer creates its tables
    demo.start("cdc-source", "cdc-source", "--metrics-port", str(demo.source_port))
    demo.start("cdc-sink", "cdc-sink", "--metrics-port", str(demo.sink_port))
    started = time.monotonic()
    with Live(demo.view(), console=console, refresh_per_second=4) as live:
        while not stopping["flag"] and (seconds is None or time.monotonic() - started < seconds):
            time.sleep(0.5)
            live.update(demo.view())
            for name, process in demo.processes.items():
                if process.poll() is not None:
                    console.print(f"[red]{name} exited with {process.returncode}; see {logs / (name + '.log')}[/]")
                    stopping["flag"] = True
        console.print("stopping: the writer first, then the connectors once the target caught up")
        demo.stop("cdc-writer")
        demo.wait_caught_up()
        live.update(demo.view())
    demo.stop("cdc-source")
    demo.stop("cdc-sink")
    verify = subprocess.run([str(BIN / "cdc-verify"), "--tables", "public.person,public.orders"], check=False)
    sys.exit(verify.returncode)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
