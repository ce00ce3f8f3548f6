"""Scenario 5: a sink is frozen (SIGSTOP) long enough for the consumer group to give its partitions
to a second sink (session.timeout.ms is 10 s), then resumed (SIGCONT). It must not write behind its
successor's back (the fencing on cdc_sink.offsets): the target ends identical, nothing doubled.
Frozen inside a batch transaction, it holds offsets rows the successor needs until the target ends
that transaction (idle_in_transaction_session_timeout); the successor must still take over."""

import random
import signal
import time

from psycopg2.extensions import make_dsn

from tests.conftest import Databases, Stack
from tests.faults.harness import Pipeline, ScenarioReport, Writer, final_check, logs, prepare_tables, settle
from tests.helpers import CliProcess, psql_rows, wait_until
from tests.pipeline import stop_cleanly, wait_for_output, while_running

FENCED = "another sink moved the offsets"


def in_batch(target_dsn: str, application: str) -> bool:
    """The session of `application` is inside a batch transaction that has written already."""
    rows = psql_rows(
        target_dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s "
        "AND backend_xid IS NOT NULL AND state IN ('active', 'idle in transaction')",
        (application,),
    )
    return int(rows[0][0]) > 0


def assignments(process: CliProcess) -> int:
    return sum(" assigned " in line for line in process.stderr_text().splitlines())


def test_frozen_sink_loses_its_partitions_and_writes_nothing_after(
    dbs: Databases, stack: Stack, topic_prefix: str, long_run: bool, report: ScenarioReport
) -> None:
    rng = random.Random()
    pipeline = Pipeline(dbs, stack.bootstrap_servers, topic_prefix)
    prepare_tables(dbs.source_dsn, dbs.target_dsn)
    writer = Writer(dbs.source_dsn, rate=400)
    source = pipeline.start_source("--partitions", "3")
    wait_for_output(source, "streaming from slot")
    names = {"a": "cdc-sink-a", "b": "cdc-sink-b"}
    sinks = {
        member: pipeline.start_sink(
            "--batch-size", "500", target_dsn=make_dsn(dbs.target_dsn, application_name=app)
        )
        for member, app in names.items()
    }
    processes = [source, writer.process, *sinks.values()]
    for sink in sinks.values():
        wait_for_output(sink, "assigned", timeout=60)
    pipeline.wait_applying(processes, minimum=500)

    for n in range(3 if long_run else 1):
        frozen, other = ("a", "b") if n % 2 == 0 else ("b", "a")
        victim, survivor = sinks[frozen], sinks[other]
        mid_batch = n != 1  # the second freeze of the long run hits whatever the sink was doing
        if mid_batch:
            wait_until(
                while_running(processes, lambda: in_batch(dbs.target_dsn, names[frozen])),  # noqa: B023
                timeout=60,
                interval=0.005,
                message="the sink never wrote a batch",
            )
        else:
            settle(rng.uniform(0.0, 2.0), processes)
        seen = assignments(survivor)
        victim.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        inside = in_batch(dbs.target_dsn, names[frozen])
        try:
            # the group expels the silent member and gives its partitions to the other one
            wait_until(
                while_running([source, writer.process, survivor], lambda: assignments(survivor) > seen),  # noqa: B023
                timeout=60,
                message=f"the other sink never took over the frozen one's partitions\n{logs([survivor])}",
            )
            settle(rng.uniform(1.0, 8.0) if long_run else 2.0, [source, writer.process, survivor])
        finally:
            victim.send_signal(signal.SIGCONT)
        down = time.monotonic() - frozen_at
        resumed = time.time()
        recovery = pipeline.wait_recovered(resumed, processes)
        # the resumed sink finds its way back into the group
        wait_until(
            while_running(processes, lambda: assignments(victim) > 1 or FENCED in victim.stderr_text()),  # noqa: B023
            timeout=60,
            message=f"the resumed sink never rejoined\n{logs([victim])}",
        )
        report.add(
            "SIGSTOP cdc-sink until its partitions moved, SIGCONT",
            f"#{n + 1} sink {frozen} ({'inside a batch transaction' if inside else 'between batches'})",
            down,
            recovery,
        )

    settle(2.0, processes)
    report.operations = writer.stop()
    final_check(pipeline, report, [source, *sinks.values()])
    fenced = sum(p.stderr_text().count(FENCED) for p in sinks.values())
    report.notes.append(f"{fenced} batches fenced off")
    stop_cleanly(*sinks.values(), source)
