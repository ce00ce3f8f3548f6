"""Progress of long copies: a bar with rows and rows/s on a terminal, a log line every 10 s otherwise."""

import logging
import sys
import time
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger("progress")


class _RateColumn(TextColumn):
    def __init__(self) -> None:
        super().__init__("")

    def render(self, task: Any) -> Any:
        speed = task.finished_speed or task.speed
        return f"{speed:,.0f} rows/s" if speed else "-- rows/s"


class RowProgress:
    """`with RowProgress("snapshot") as p: t = p.start("public.person", total); p.advance(t, n)`."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.terminal = sys.stderr.isatty()
        self.bar: Progress | None = None
        self.counts: dict[int, tuple[str, int, float, float]] = {}

    def __enter__(self) -> "RowProgress":
        if self.terminal:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rows"),
                _RateColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self.bar.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.stop()

    def start(self, name: str, total: int | None) -> int:
        if self.bar is not None:
            return int(self.bar.add_task(f"{self.what} {name}", total=total or None))
        task = len(self.counts)
        now = time.monotonic()
        self.counts[task] = (name, 0, now, now)
        return task

    def advance(self, task: int, rows: int) -> None:
        if self.bar is not None:
            self.bar.advance(TaskID(task), rows)
            return
        name, done, started, last = self.counts[task]
        done += rows
        now = time.monotonic()
        if now - last >= 10:
            log.info("%s %s: %d rows, %.0f rows/s", self.what, name, done, done / max(now - started, 1e-9))
            last = now
        self.counts[task] = (name, done, started, last)

    def finish(self, task: int, rows: int) -> None:
        if self.bar is not None:
            self.bar.update(TaskID(task), completed=rows, total=rows)
