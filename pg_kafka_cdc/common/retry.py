"""Jittered exponential backoff with a give-up deadline (pure; the caller sleeps)."""

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays of base * 2**n, capped, with full jitter in [delay/2, delay]; `deadline` in seconds
    after the first failure (None: retry forever)."""

    base: float = 0.5
    cap: float = 15.0
    deadline: float | None = None
    attempts: int = 0
    first_failure: float | None = None
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self, now: float) -> float | None:
        """The delay before the next attempt, or None when the deadline has passed."""
        if self.first_failure is None:
            self.first_failure = now
        if self.deadline is not None and now - self.first_failure >= self.deadline:
            return None
        delay = min(self.cap, self.base * (2 ** min(self.attempts, 30)))
        self.attempts += 1
        delay = self.rng.uniform(delay / 2, delay)
        if self.deadline is not None:
            delay = min(delay, max(0.0, self.first_failure + self.deadline - now))
        return delay

    def reset(self) -> None:
        """Forget past failures after a success."""
        self.attempts = 0
        self.first_failure = None
