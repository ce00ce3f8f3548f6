"""The demo (`make demo`, `python -m demo`) on the real stack: under a terminal stopped with Ctrl-C
(in order, then cdc-verify), and stopped at once, leaving no program running, when its source dies,
when it is killed with SIGKILL, when the pipe its output goes to closes and on SIGHUP.

Figures (end-to-end latency, how long the stops took) are printed: run with `-s`.
"""

import contextlib
import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import psutil
import psycopg2

from tests.conftest import Databases, Stack
from tests.helpers import REPO, psql_rows, wait_until
from tests.integration.test_operations import new_names
from tests.pipeline import execute

DEMO = [sys.executable, "-m", "demo", "--seconds", "300"]  # stopped by each test well before

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\r")
ROW = re.compile(r"│\s*(person|orders)\s*│\s*(\d+|-)\s*│\s*(\d+|-)\s*│")
# The caption wraps at the table's width: any whitespace between its words.
LATENCY = re.compile(r"latency\s+\(last\s+10\s+s\)\s+p50\s+≤\s+(\d+\s+ms|-),\s+p99\s+≤\s+(\d+\s+ms|-)")


class Terminal:
    """A program on a pseudo-terminal of 160x50; everything it prints is collected."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        self.process = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO, start_new_session=True
        )
        os.close(slave)
        self.master = master
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the program closed the terminal
                return
            if not data:
                return
            self.chunks.append(data)

    def text(self) -> str:
        return ANSI.sub("", b"".join(self.chunks).decode(errors="replace"))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.reader.join(10)
        os.close(self.master)


def table_rows(text: str) -> list[tuple[str, int | None, int | None]]:
    return [(name, None if s == "-" else int(s), None if t == "-" else int(t)) for name, s, t in ROW.findall(text)]


def pipeline_processes(slot: str) -> list[psutil.Process]:
    """The cdc-* processes started with SOURCE_SLOT=slot (the demo's children)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = process.info["cmdline"] or []
            ours = any(Path(part).name.startswith("cdc-") for part in cmdline[:2])
            if ours and process.environ().get("SOURCE_SLOT") == slot:
                found.append(process)
    return found


def demo_environment(
    stack: Stack, dbs: Databases, prefix: str, slot: str, group: str, logs: Path
) -> dict[str, str]:
    private = ("SOURCE_", "TARGET_", "TOPIC_", "TABLES", "WRITER_", "LOG_", "SINK_", "METRICS_", "KAFKA_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(private)}
    return env | {
        "SOURCE_DSN": dbs.source_dsn,
        "TARGET_DSN": dbs.target_dsn,
        "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers,
        "TOPIC_PREFIX": prefix,
        "SOURCE_SLOT": slot,
        "SINK_GROUP": group,
        "STACK_DIR": str(logs),  # the demo's logs go to $STACK_DIR/demo
        "PYTHONUNBUFFERED": "1",
        "TERM": "xterm-256color",
        "COLUMNS": "160",
        "LINES": "50",
    }


def probe_latency(dbs: Databases, key: int, timeout: float = 10) -> float:
    """Insert one probe row on the source; seconds until the target has it."""
    execute(dbs.source_dsn, "INSERT INTO probe VALUES (%s, clock_timestamp())", params=(key,))
    committed = time.monotonic()
    while time.monotonic() - committed < timeout:
        with contextlib.suppress(psycopg2.errors.UndefinedTable):  # until the sink created it
            if psql_rows(dbs.target_dsn, "SELECT 1 FROM probe WHERE id = %s", (key,)):
                return time.monotonic() - committed
        time.sleep(0.01)
    raise AssertionError(f"probe row {key} did not reach the target within {timeout:g} s")


def wait_shown(terminal: Terminal) -> None:
    """Until the live table shows rows of both tables on both sides."""

    def replicating() -> bool:
        rows = dict((name, (s, t)) for name, s, t in table_rows(terminal.text()))
        assert terminal.process.poll() is None, f"the demo exited early:\n{terminal.text()[-3000:]}"
        return all(
            (rows.get(n, (None, None))[0] or 0) > 0 and (rows.get(n, (None, None))[1] or 0) > 0
            for n in ("person", "orders")
        )

    wait_until(replicating, timeout=12, interval=0.2, message="the live table never showed rows on both sides")


def probe_latencies(dbs: Databases, started: float) -> list[float]:
    """Probe rows, one after the other, until 11 s after `started` (3 at least, 20 at most)."""
    # The first probe row makes the sink create (copy) the probe table: a warm-up, not timed.
    probe_latency(dbs, 0, timeout=8)
    latencies: list[float] = []
    key = 0
    while key < 20 and (key < 3 or time.monotonic() - started < 11):
        key += 1
        latencies.append(probe_latency(dbs, key, timeout=3))
        time.sleep(0.1)
    return latencies


def program(process: psutil.Process) -> str:
    """The cdc-* console script a process runs ("" when it is gone meanwhile)."""
    with contextlib.suppress(psutil.Error):
        for part in process.cmdline()[:2]:
            if Path(part).name.startswith("cdc-"):
                return Path(part).name
    return ""


# What each program logs once it runs: the writer writing, the source streaming, the sink consuming.
STARTED = {"cdc-writer": "writing to", "cdc-source": "streaming from slot", "cdc-sink": "consuming"}


def wait_started(demo: subprocess.Popen[bytes], logs: Path, timeout: float = 30) -> None:
    """Until the demo's three programs run (as their logs under `logs`/demo say)."""

    def log(name: str) -> str:
        path = logs / "demo" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def started() -> bool:
        if demo.poll() is not None:
            tails = "\n".join(f"{name}: {log(name)[-1000:]}" for name in STARTED)
            raise AssertionError(f"the demo exited early with {demo.returncode}; its logs:\n{tails}")
        return all(text in log(name) for name, text in STARTED.items())

    wait_until(started, timeout=timeout, interval=0.1, message="the demo's programs did not all start")


def exit_code(process: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the demo still ran {timeout:g} s later") from None


def wait_gone(slot: str, timeout: float) -> None:
    wait_until(
        lambda: not pipeline_processes(slot),
        timeout=timeout,
        interval=0.1,
        message=f"the demo's programs still ran: {[program(p) for p in pipeline_processes(slot)]}",
    )


def kill_leftovers(slot: str) -> list[str]:
    """Kill the demo's programs still running; their names."""
    leftovers = pipeline_processes(slot)
    names = [program(p) for p in leftovers]
    for process in leftovers:
        with contextlib.suppress(psutil.Error):
            process.kill()
    return names


def test_demo_under_a_terminal_stops_cleanly_on_ctrl_c(
    stack: Stack, dbs: Databases, topic_prefix: str, tmp_path: Path
) -> None:
    slot, group = new_names()
    # A table of the test's own, replicated along (the demo replicates every table of every schema), to
    # time single rows from source commit to target visibility.
    execute(dbs.source_dsn, "CREATE TABLE probe (id int PRIMARY KEY, written_at timestamptz NOT NULL)")
    env = demo_environment(stack, dbs, topic_prefix, slot, group, tmp_path)
    started = time.monotonic()
    terminal = Terminal([sys.executable, "-m", "demo", "--seconds", "300"], env)  # stopped by Ctrl-C
    try:
        wait_shown(terminal)
        latencies = probe_latencies(dbs, started)
        assert terminal.process.poll() is None, "the demo ended before Ctrl-C"
        before_stop = terminal.text()
        terminal.process.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground program
        stopped_at = time.monotonic()
        code = terminal.process.wait(120)
        stop_seconds = time.monotonic() - stopped_at
        terminal.reader.join(10)
        output = terminal.text()
    finally:
        terminal.close()
        leftovers = kill_leftovers(slot)
    assert not leftovers, f"the demo left running: {leftovers}"
    assert code == 0, f"the demo exited with {code}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-5000:]
    assert "stopping: the writer first, then the connectors once the target caught up" in output, output[-3000:]
    assert "identical: 2 of 2 tables match" in output, output[-3000:]
    assert "public.person: identical" in output and "public.orders: identical" in output, output[-3000:]
    final = table_rows(output)[-2:]
    assert {name for name, _, _ in final} == {"person", "orders"}, final
    assert all(s == t for _, s, t in final), f"the last live table still shows a difference: {final}"
    shown = LATENCY.findall(before_stop)
    assert shown, f"the demo never showed its latency line:\n{before_stop[-2000:]}"
    p50, p99 = shown[-1]
    assert p50 != "-" and p99 != "-", f"the demo showed no latency figures: {shown}"
    latencies.sort()
    print(
        f"\n[demo] stopped {stop_seconds:.1f} s after Ctrl-C; the demo showed latency p50 ≤ {p50}, p99 ≤ {p99}; "
        f"{len(latencies)} probe rows, commit to visible in the target: min {latencies[0] * 1000:.0f} ms, "
        f"median {latencies[len(latencies) // 2] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
    )
    assert latencies and latencies[len(latencies) // 2] < 2.0, latencies
    assert (tmp_path / "demo" / "cdc-source.log").exists(), "the demo's logs are not under $STACK_DIR/demo"


# --- stopped at once: no program outlives the demo ---------------------------------------------


def test_demo_stops_at_once_when_its_source_dies(
    stack: Stack, dbs: Databases, topic_prefix: str, tmp_path: Path
) -> None:
    slot, group = new_names()
    terminal = Terminal(DEMO, demo_environment(stack, dbs, topic_prefix, slot, group, tmp_path))
    try:
        wait_started(terminal.process, tmp_path)
        [source] = [p for p in pipeline_processes(slot) if program(p) == "cdc-source"]
        source.kill()
        killed_at = time.monotonic()
        code = exit_code(terminal.process, 10)
        seconds = time.monotonic() - killed_at
        wait_gone(slot, 5)
        terminal.reader.join(10)
        output = terminal.text()
    finally:
        terminal.close()
        leftovers = kill_leftovers(slot)
    assert not leftovers, f"the demo left running: {leftovers}"
    assert code != 0, f"the demo exited with {code}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-5000:]
    log = tmp_path / "demo" / "cdc-source.log"
    lines = [line for line in output.splitlines() if "cdc-source" in line and str(log) in line]
    assert len(lines) == 1, f"no single line names cdc-source and {log}:\n{output[-3000:]}"
    assert "was killed by SIGKILL" in lines[0], lines[0]
    assert "stopping:" not in output and "identical" not in output, output[-3000:]  # no catch-up, no verify
    print(f"\n[demo] exited with {code} {seconds:.1f} s after its source was killed: {lines[0].strip()}")


def test_demo_killed_leaves_no_program_running(
    stack: Stack, dbs: Databases, topic_prefix: str, tmp_path: Path
) -> None:
    slot, group = new_names()
    terminal = Terminal(DEMO, demo_environment(stack, dbs, topic_prefix, slot, group, tmp_path))
    try:
        wait_started(terminal.process, tmp_path)
        running = sorted(program(p) for p in pipeline_processes(slot))
        assert running == ["cdc-sink", "cdc-source", "cdc-writer"], running
        terminal.process.kill()
        terminal.process.wait()
        killed_at = time.monotonic()
        wait_gone(slot, 10)
        print(f"\n[demo] its programs stopped {time.monotonic() - killed_at:.1f} s after it was killed")
    finally:
        terminal.close()
        leftovers = kill_leftovers(slot)
    assert not leftovers, f"the demo left running: {leftovers}"


def test_demo_on_sighup_leaves_no_program_running(
    stack: Stack, dbs: Databases, topic_prefix: str, tmp_path: Path
) -> None:
    slot, group = new_names()
    terminal = Terminal(DEMO, demo_environment(stack, dbs, topic_prefix, slot, group, tmp_path))
    try:
        wait_started(terminal.process, tmp_path)
        terminal.process.send_signal(signal.SIGHUP)  # what the terminal closing sends
        sent_at = time.monotonic()
        code = exit_code(terminal.process, 10)
        wait_gone(slot, 10 - (time.monotonic() - sent_at))
        seconds = time.monotonic() - sent_at
        terminal.reader.join(10)
        output = terminal.text()
    finally:
        terminal.close()
        leftovers = kill_leftovers(slot)
    assert not leftovers, f"the demo left running: {leftovers}"
    assert code == 128 + signal.SIGHUP, f"the demo exited with {code}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-5000:]
    print(f"\n[demo] stopped with its programs {seconds:.1f} s after SIGHUP")


def test_demo_with_its_output_closed_leaves_no_program_running(
    stack: Stack, dbs: Databases, topic_prefix: str, tmp_path: Path
) -> None:
    """`python -m demo | tee` where tee exited (Ctrl-C reaches both): the demo's writes fail."""
    slot, group = new_names()
    env = demo_environment(stack, dbs, topic_prefix, slot, group, tmp_path)
    reader, writer = os.pipe()
    with (tmp_path / "stderr").open("wb") as stderr:
        demo = subprocess.Popen(
            DEMO, stdin=subprocess.DEVNULL, stdout=writer, stderr=stderr, env=env, cwd=REPO, start_new_session=True
        )
    os.close(writer)
    try:
        wait_started(demo, tmp_path)
        os.close(reader)  # tee exited: nothing reads the demo's output any more
        reader = -1
        demo.send_signal(signal.SIGINT)
        sent_at = time.monotonic()
        code = exit_code(demo, 10)
        wait_gone(slot, 10 - (time.monotonic() - sent_at))
        seconds = time.monotonic() - sent_at
    finally:
        if reader >= 0:
            os.close(reader)
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        leftovers = kill_leftovers(slot)
    assert not leftovers, f"the demo left running: {leftovers}"
    errors = (tmp_path / "stderr").read_text()
    assert "Traceback" not in errors and "Exception ignored" not in errors, errors[-5000:]
    assert code != 0, f"the demo exited with {code}:\n{errors[-3000:]}"
    print(f"\n[demo] stopped with its programs {seconds:.1f} s after Ctrl-C with its output closed")
