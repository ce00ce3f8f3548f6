"""Where the benchmark finds the stack and its tools, what each mode runs, and the targets."""

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from psycopg2.extensions import make_dsn, parse_dsn

from pg_kafka_cdc.common.settings import DEFAULT_BOOTSTRAP, DEFAULT_SOURCE_DSN, DEFAULT_TARGET_DSN

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
VENV_BIN = REPO / ".venv" / "bin"
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


@dataclass(frozen=True)
class Endpoints:
    """The two servers and the broker; databases are chosen per scenario."""

    source_dsn: str
    target_dsn: str
    bootstrap: str

    def source(self, database: str) -> str:
        return make_dsn(self.source_dsn, dbname=database)

    def target(self, database: str) -> str:
        return make_dsn(self.target_dsn, dbname=database)

    def source_params(self) -> dict[str, str]:
        """host, port, user, password of the source (for a subscription's CONNECTION string)."""
        return parse_dsn(self.source_dsn)

    @classmethod
    def from_environment(cls) -> "Endpoints":
        return cls(
            os.environ.get("BENCH_SOURCE_DSN", DEFAULT_SOURCE_DSN),
            os.environ.get("BENCH_TARGET_DSN", DEFAULT_TARGET_DSN),
            os.environ.get("KAFKA_BOOTSTRAP_SERVERS", DEFAULT_BOOTSTRAP),
        )


@dataclass(frozen=True)
class Workload:
    """N row changes: 70% inserts, 20% updates, 10% deletes, `tx_size` changes per transaction,
    on a person-like table whose rows carry `pad_bytes` of extra text."""

    changes: int
    tx_size: int = 100
    pad_bytes: int = 0
    mix: tuple[int, int, int] = (70, 20, 10)

    @property
    def transactions(self) -> int:
        return -(-self.changes // self.tx_size)


TPCB_CHANGES_PER_TRANSACTION = 4  # an account, a teller and a branch updated, a history row inserted


@dataclass(frozen=True)
class TpcbWorkload:
    """`transactions` of pgbench's TPC-B-like kind (bench/tpcb.py: 4 row changes each, on 4 tables)
    on pgbench's tables at `scale`, their topics made with `partitions` partitions."""

    transactions: int
    scale: int = 1
    partitions: int = 1

    @property
    def changes(self) -> int:
        return self.transactions * TPCB_CHANGES_PER_TRANSACTION

    @classmethod
    def of_changes(cls, changes: int, scale: int = 1, partitions: int = 1) -> "TpcbWorkload":
        """About `changes` row changes: a whole number of transactions, at least one."""
        return cls(max(1, -(-changes // TPCB_CHANGES_PER_TRANSACTION)), scale, partitions)


@dataclass(frozen=True)
class GrowthCell:
    tx_size: int
    row_label: str  # "~100 B" / "~4 KB"
    pad_bytes: int
    changes: int


@dataclass(frozen=True)
class Plan:
    """What one run does."""

    mode: str  # quick | full
    changes: Workload
    snapshot_rows: int
    latency_seconds: float
    writer_rate: float = 1000.0
    probe_interval: float = 0.050
    poll_interval: float = 0.005
    growth: tuple[GrowthCell, ...] = ()
    tpcb: TpcbWorkload = TpcbWorkload(250_000)  # 1,000,000 changes
    scenarios: frozenset[str] = field(
        default_factory=lambda: frozenset({"changes", "snapshot", "latency", "growth"})
    )


# Row sizes of the growth grid: the plain person-like row is about 110 B of data (136 B as
# pg_column_size counts it, with the tuple header); 3,900 B of extra text
# (stored PLAIN: neither compressed nor moved out of line) makes it about 4 KB.
SMALL_PAD = 0
LARGE_PAD = 3_900


def growth_grid(scale: float = 1.0) -> tuple[GrowthCell, ...]:
    """Transactions of 1, 100 and 10,000 rows times rows of ~100 B and ~4 KB, with N per cell kept
    small enough for the whole grid to stay under half an hour."""
    cells = []
    sizes = ((1, 100_000, 25_000), (100, 500_000, 100_000), (10_000, 500_000, 100_000))
    for tx_size, small_n, large_n in sizes:
        cells.append(GrowthCell(tx_size, "~100 B", SMALL_PAD, round_to(int(small_n * scale), tx_size)))
        cells.append(GrowthCell(tx_size, "~4 KB", LARGE_PAD, round_to(int(large_n * scale), tx_size)))
    return tuple(cells)


def round_to(n: int, multiple: int) -> int:
    return max(multiple, n // multiple * multiple)


def quick_plan() -> Plan:
    return Plan(
        mode="quick",
        changes=Workload(1_000_000),
        snapshot_rows=1_000_000,
        latency_seconds=60.0,
        scenarios=frozenset({"changes", "snapshot", "latency"}),
    )


def full_plan() -> Plan:
    return Plan(
        mode="full",
        changes=Workload(1_000_000),
        snapshot_rows=1_000_000,
        latency_seconds=60.0,
        growth=growth_grid(),
        scenarios=frozenset({"changes", "snapshot", "latency", "growth", "transactions"}),
    )


@dataclass(frozen=True)
class Target:
    key: str  # the figure in the results JSON
    label: str
    must: float
    aim: float
    higher_is_better: bool
    unit: str


TARGETS = (  # must reach: what the project promises (issue-level bars); aim: beyond it
    Target("ratios.source_vs_recvlogical", "source / pg_recvlogical", 0.80, 1.00, True, "x"),
    Target("ratios.sink_vs_native_lr", "sink / native logical replication", 0.50, 0.75, True, "x"),
    Target("ratios.snapshot_vs_copy_pipe", "snapshot / COPY pipe", 0.60, 0.90, True, "x"),
    Target("e2e_latency_ms.p99", "end-to-end latency p99", 50.0, 25.0, False, "ms"),
    Target("source_peak_rss_mb", "cdc-source peak RSS", 80.0, 60.0, False, "MB"),
    Target("sink_peak_rss_mb", "cdc-sink peak RSS", 150.0, 100.0, False, "MB"),
)


def scenario_tag(scenario: str) -> str:
    """bench_<scenario>_<random>: the name of the scenario's databases, slots, topic prefix, group."""
    return f"bench_{scenario}_{secrets.token_hex(4)}"
