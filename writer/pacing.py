"""Operation mix and pacing, pure: no clock, no database."""

from dataclasses import dataclass, field

from pg_kafka_cdc.common.errors import ConfigError

KINDS = ("insert", "update", "delete")


def parse_mix(text: str) -> tuple[int, int, int]:
    """`70,20,10` -> weights of insert, update and delete."""
    try:
        weights = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(
            f"--mix takes three whole numbers insert,update,delete (e.g. 70,20,10); got {text!r}"
        ) from None
    if len(weights) != 3 or any(w < 0 for w in weights) or sum(weights) == 0:
        raise ConfigError(f"--mix takes three non-negative numbers insert,update,delete, not all 0; got {text!r}")
    return weights[0], weights[1], weights[2]


@dataclass
class MixSchedule:
    """Smooth weighted round robin: over any window of sum(weights) operations each kind appears
    exactly in proportion to its weight, so --count 1000 --mix 70,20,10 is exactly 700/200/100."""

    weights: tuple[int, int, int]
    current: list[int] = field(default_factory=lambda: [0, 0, 0])

    def next(self) -> str:
        total = sum(self.weights)
        for i, w in enumerate(self.weights):
            self.current[i] += w
        best = max(range(3), key=lambda i: self.current[i])
        self.current[best] -= total
        return KINDS[best]


@dataclass
class Pacer:
    """When the next transaction of `batch` operations may start for `rate` operations per second.
    A stall is not made up for by more than `max_burst` seconds of catch-up."""

    rate: float
    batch: int
    max_burst: float = 1.0
    next_at: float | None = None

    def delay(self, now: float) -> float:
        """Seconds to wait before the next transaction (0 when unlimited or late)."""
        if self.rate <= 0:
            return 0.0
        if self.next_at is None or now - self.next_at > self.max_burst:
            self.next_at = now
        wait = max(0.0, self.next_at - now)
        self.next_at += self.batch / self.rate
        return wait
