"""python -m bench.run --quick | --full: run the scenarios against in-run baselines, write
bench/results/latest.json, bench/results/<YYYYmmdd-HHMMSS>-<commit>.json and latest.md, print the table.

--quick: scenarios 1-5 (changes, snapshot, latency; memory is measured during 1 and 2), under
10 minutes on a 2-core machine. --full: the same plus the growth grid (scenario 6), the Debezium
baseline (scenario 7, bench/debezium.py; alone: --only debezium, or `make bench-debezium`) and
source transactions applied whole against row by row on pgbench's TPC-B-like transactions
(scenario 8, bench/scenarios/transactions.py; alone: --only transactions, or
`make bench-transactions`).
"""

import argparse
import dataclasses
import datetime as dt
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg2

from bench import debezium, report
from bench.config import (
    RESULTS_DIR,
    Endpoints,
    Plan,
    TpcbWorkload,
    Workload,
    full_plan,
    growth_grid,
    quick_plan,
)
from bench.context import Context
from bench.kafka import admin
from bench.machine import Steal, describe
from bench.pg import connect
from bench.plot import latency_png, throughput_of
from bench.scenarios import changes, growth, latency, snapshot, transactions

log = logging.getLogger("bench")

SCENARIOS = ("changes", "snapshot", "latency", "growth", "debezium", "transactions")
OPT_IN = frozenset({"debezium", "transactions"})  # not part of --quick; --only runs them too


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="scenarios 1-5 (the default)")
    mode.add_argument(
        "--full",
        action="store_true",
        help="scenarios 1-5, the growth grid, the Debezium baseline and transactions applied whole (8)",
    )
    parser.add_argument(
        "--changes", type=int, help="N of scenarios 1-2, 7 and 8 (default 1,000,000; 8 runs N/4 transactions)"
    )
    parser.add_argument("--snapshot-rows", type=int, help="rows of scenario 3 (default 1,000,000)")
    parser.add_argument("--latency-seconds", type=float, help="length of scenario 4 (default 60)")
    parser.add_argument("--growth-scale", type=float, default=1.0, help="multiply every growth cell's N")
    parser.add_argument("--tpcb-scale", type=int, default=1, help="pgbench scale of scenario 8 (default 1)")
    parser.add_argument(
        "--tpcb-partitions", type=int, default=1, help="partitions of scenario 8's topics (default 1)"
    )
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)} (for development)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def build_plan(args: argparse.Namespace) -> Plan:
    plan = full_plan() if args.full else quick_plan()
    if args.full:  # the Debezium baseline is part of --full (and of --only debezium), not of --quick
        plan = dataclasses.replace(plan, scenarios=plan.scenarios | {"debezium"})
    if args.full and args.growth_scale != 1.0:
        plan = dataclasses.replace(plan, growth=growth_grid(args.growth_scale))
    if args.changes:
        plan = dataclasses.replace(plan, changes=Workload(args.changes, plan.changes.tx_size))
    if args.tpcb_scale < 1 or args.tpcb_partitions < 1:
        raise SystemExit("--tpcb-scale and --tpcb-partitions take a whole number of at least 1")
    plan = dataclasses.replace(
        plan, tpcb=TpcbWorkload.of_changes(plan.changes.changes, args.tpcb_scale, args.tpcb_partitions)
    )
    if args.snapshot_rows:
        plan = dataclasses.replace(plan, snapshot_rows=args.snapshot_rows)
    if args.latency_seconds:
        plan = dataclasses.replace(plan, latency_seconds=args.latency_seconds)
    if args.only:
        wanted = frozenset(s.strip() for s in args.only.split(",") if s.strip())
        unknown = wanted - set(SCENARIOS)
        if unknown:
            raise SystemExit(f"--only: unknown scenarios {', '.join(sorted(unknown))} (choose from {SCENARIOS})")
        plan = dataclasses.replace(plan, scenarios=wanted & (plan.scenarios | OPT_IN))
    return plan


def preflight(endpoints: Endpoints) -> None:
    """The stack must be up: both servers and the broker answer."""
    for dsn in (endpoints.source("postgres"), endpoints.target("postgres")):
        try:
            connect(dsn).close()
        except psycopg2.OperationalError as exc:
            raise SystemExit(f"cannot reach PostgreSQL ({exc}); start the stack with `make up`") from None
    try:
        admin(endpoints.bootstrap).list_topics(timeout=10)
    except Exception as exc:
        raise SystemExit(
            f"cannot reach Kafka at {endpoints.bootstrap} ({exc}); start the stack with `make up`"
        ) from None


def _stop_on_sigterm() -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def execute(plan: Plan, endpoints: Endpoints) -> dict[str, Any]:
    """Run the plan's scenarios; every scenario's failure is recorded and the others still run."""
    started = time.monotonic()
    log_dir = Path(tempfile.mkdtemp(prefix="cdc-bench-"))
    machine = describe(endpoints)
    ctx = Context(endpoints, plan, log_dir)
    scenarios: dict[str, Any] = {}
    errors: dict[str, str] = {}
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("changes", lambda: changes.run(ctx, plan.changes)),
        ("snapshot", lambda: snapshot.run(ctx, plan.snapshot_rows)),
        ("latency", lambda: latency.run(ctx, plan.latency_seconds)),
        ("growth", lambda: growth.run(ctx, plan.growth)),
        ("transactions", lambda: transactions.run(ctx, plan.tpcb)),
        ("debezium", lambda: debezium.run(ctx, plan.changes)),
    ]
    whole, steal = Steal(), Steal()
    stolen: dict[str, float | None] = {}
    for name, step in steps:
        if name not in plan.scenarios:
            continue
        log.info("scenario %s: starting (%.0f s into the run)", name, time.monotonic() - started)
        step_started = time.monotonic()
        steal.start()
        try:
            scenarios[name] = step()
        except Exception as exc:
            log.error("scenario %s failed: %s", name, exc)
            log.debug("%s", traceback.format_exc())
            errors[name] = str(exc)
        stolen[name] = steal.share()
        log.info("scenario %s: %.0f s (CPU steal %s %%)", name, time.monotonic() - step_started, stolen[name])
    machine["cpu_steal_pct"] = {"run": whole.share(), **stolen}
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results = report.assemble(plan, machine, scenarios, errors, time.monotonic() - started, log_dir)
    lat = scenarios.get("latency")
    if lat and lat.get("samples"):
        path = latency_png(
            lat["samples"],
            lat["latency_ms"]["p50"],
            lat["latency_ms"]["p99"],
            f"end to end, cdc-writer {plan.writer_rate:g}/s, {plan.latency_seconds:g} s, commit {results['commit']}",
            RESULTS_DIR / "latency.png",
        )
        results["latency_plot"] = str(path.relative_to(RESULTS_DIR.parent.parent))
    drawn = throughput_of(results)
    if drawn:
        results["throughput_plot"] = str(drawn.relative_to(RESULTS_DIR.parent.parent))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s  %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    _stop_on_sigterm()
    plan = build_plan(args)
    endpoints = Endpoints.from_environment()
    preflight(endpoints)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    try:
        results = execute(plan, endpoints)
    except KeyboardInterrupt:
        print(
            "interrupted: scratch databases, slots and topics were cleaned up; no results written", file=sys.stderr
        )
        return 130
    paths = report.write(results, stamp)
    print(report.render(results))
    print("written: " + ", ".join(str(p.relative_to(RESULTS_DIR.parent.parent)) for p in paths))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
