"""The demo's programs: each in a session of its own that dies with the demo, the signals that stop
them, and the last error a program that exited logged."""

import ctypes
import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO

import orjson
from rich.console import Console

GRACE = 5.0  # seconds from SIGTERM to SIGKILL when everything stops at once
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
