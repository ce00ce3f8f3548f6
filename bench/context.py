"""What every scenario gets: where the stack is, where to put logs, what the run measures."""

import logging
from dataclasses import dataclass
from pathlib import Path

from bench.config import Endpoints, Plan

log = logging.getLogger("bench")


@dataclass(frozen=True)
class Context:
    endpoints: Endpoints
    plan: Plan
    log_dir: Path  # the child processes' output, kept for inspection

    @property
    def bootstrap(self) -> str:
        return self.endpoints.bootstrap
