"""Plain helpers for the tests: run the console scripts, wait for conditions, query PostgreSQL."""

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg2
from psycopg2 import sql

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")

# Pipeline settings a developer may have exported in their shell; the programs under test must only
# see what a test passes them (KAFKA_BOOTSTRAP_SERVERS is kept: it points the tests at the broker).
_PRIVATE_ENV_PREFIXES = ("SOURCE_", "TARGET_", "TOPIC_", "TABLES", "WRITER_", "LOG_", "SINK_", "METRICS_")


def scripts_dir() -> Path:
    """The virtualenv's bin folder, where `pip install -e .` put the console scripts."""
    venv_bin = REPO / ".venv" / "bin"
    return venv_bin if venv_bin.is_dir() else Path(sys.executable).parent


def _command(args: list[str]) -> list[str]:
    assert args, "a command line needs at least the program name"
    script = scripts_dir() / args[0]
    assert script.exists(), f"{script} does not exist: run `make venv` to install the console scripts"
    return [str(script), *args[1:]]


def _environment(env: dict[str, str] | None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE_ENV_PREFIXES)}
    base["PYTHONUNBUFFERED"] = "1"
    return {**base, **(env or {})}


def run_cli(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a console script (args[0], e.g. "cdc-writer") to the end; `env` is added to the
    environment. Output is captured as text."""
    return subprocess.run(
        _command(args),
        env=_environment(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )


_output_root: Path | None = None
_started: list["CliProcess"] = []


def _output_dir() -> Path:
    global _output_root  # noqa: PLW0603 - one folder per test session, removed at exit
    if _output_root is None:
        keep = os.environ.get("CDC_TESTS_KEEP_OUTPUT")  # a folder: the processes' logs stay there
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            _output_root = Path(tempfile.mkdtemp(prefix="cdc-tests-", dir=keep))
        else:
            _output_root = Path(tempfile.mkdtemp(prefix="cdc-tests-"))
            atexit.register(shutil.rmtree, _output_root, True)
    return Path(tempfile.mkdtemp(dir=_output_root))


class CliProcess(subprocess.Popen[str]):
    """A background console script whose stdout and stderr go to files, so a chatty process never
    blocks on a full pipe; read them at any time with stdout_text() and stderr_text()."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        folder = _output_dir()
        self.command = " ".join(args)
        self.stdout_path = folder / "stdout"
        self.stderr_path = folder / "stderr"
        (folder / "command").write_text(self.command + "\n")
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            super().__init__(_command(args), env=_environment(env), stdout=out, stderr=err, text=True, cwd=REPO)

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def start_cli(args: list[str], env: dict[str, str] | None = None) -> CliProcess:
    """Start a console script in the background (stop it with stop_process)."""
    process = CliProcess(args, env)
    _started.append(process)
    return process


def stop_process(p: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Send `sig` and wait for the exit code; a process still running after `timeout` seconds is
    killed and the test fails."""
    if p.poll() is None:
        p.send_signal(sig)
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise AssertionError(
            f"{p.args!r} did not exit within {timeout:g} s of {signal.Signals(sig).name}; killed"
        ) from None


def reap_started() -> list[str]:
    """Kill the background processes a test left running; returns their command lines."""
    leftovers = []
    while _started:
        process = _started.pop()
        if process.poll() is None:
            leftovers.append(process.command)
            process.kill()
        process.wait()
    return leftovers


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.2, message: str = "") -> T:
    """Call `predicate` until it returns something truthy (which is returned); AssertionError with
    `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s: {message or 'condition not met'}")
        time.sleep(interval)


def psql_rows(dsn: str, query: str | sql.Composable, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement in autocommit mode; its rows (empty when it returns none)."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(query, params)
            return list(cur.fetchall()) if cur.description is not None else []
    finally:
        conn.close()
