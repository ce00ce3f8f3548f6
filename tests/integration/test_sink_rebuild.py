"""`cdc-sink rebuild` is safe whatever else runs: refused with one line while the group's sink runs
(the writer writing meanwhile), complete once that sink is stopped, and never left incomplete by a
sink of the group started during the replay."""

import random
import time

from tests.conftest import Databases
from tests.helpers import CliProcess, stop_process, wait_until
from tests.pipeline import (
    WRITER_TABLES,
    assert_running,
    assert_same_rows,
    error_line,
    execute,
    run_sink,
    run_writer,
    start_sink,
    start_source,
    start_writer,
    stop_cleanly,
    tables_option,
    verify,
    wait_for_output,
    wait_identical,
)
from tests.sink_runs import names_of, target_count

TABLES = tables_option(WRITER_TABLES)
# 50 ms per statement applied to public.person on the target (ENABLE ALWAYS: the sink applies as a
# replica, where ordinary triggers do not fire).
SLOW_APPLY = (
    "CREATE FUNCTION public.slow_apply() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN PERFORM pg_sleep(0.05); RETURN NULL; END $$",
    "CREATE TRIGGER slow_apply AFTER INSERT OR UPDATE OR DELETE ON public.person "
    "FOR EACH STATEMENT EXECUTE FUNCTION public.slow_apply()",
    "ALTER TABLE public.person ENABLE ALWAYS TRIGGER slow_apply",
)


def assert_rebuilt(dbs: Databases, stderr: str) -> None:
    assert "rebuilt public.person, public.orders" in stderr, stderr[-3000:]
    result = verify(dbs, WRITER_TABLES)
    assert result.returncode == 0, f"not identical after the rebuild:\n{result.stdout}\n{stderr[-3000:]}"
    assert_same_rows(dbs, WRITER_TABLES)


def test_rebuild_is_refused_while_the_groups_sink_runs(dbs: Databases, topic_prefix: str) -> None:
    slot, group = names_of(dbs, topic_prefix)
    run_writer(dbs, "--count", "1500", "--rate", "0", "--batch", "10")  # the snapshot's `r` events
    source = start_source(dbs, topic_prefix, slot)
    # static membership: a stopped member stays in the group for the session timeout
    sink = start_sink(dbs, topic_prefix, slot, group, "--instance-id", f"{group}-1")
    wait_for_output(sink, "assigned", timeout=90)
    writer = start_writer(dbs, "--rate", "300", "--batch", "5")

    for _ in range(3):  # the failure this guards against was intermittent
        before = target_count(dbs, "public.person")
        refused = run_sink(dbs, topic_prefix, slot, group, "rebuild", "--tables", TABLES, "--once", timeout=90)
        line = error_line("cdc-sink", refused, alone=False)
        assert line.startswith(
            f"cannot rebuild public.person, public.orders while sinks apply them: group {group} has 1 live "
            f"member: cdc-sink on /127.0.0.1 (instance {group}-1) holding "
        ), line
        assert "stop them, then run the rebuild again" in line, line
        assert_running(source, sink, writer)
        assert target_count(dbs, "public.person") >= before, "the refused rebuild emptied the table"

    # a group of its own does not help while a sink of another group applies the tables here
    other = run_sink(dbs, topic_prefix, slot, f"{group}-b", "rebuild", "--tables", TABLES, "--once", timeout=90)
    line = error_line("cdc-sink", other, alone=False)
    assert f"group {group} has 1 live member: cdc-sink on /127.0.0.1 (instance {group}-1) holding " in line, line
    assert "--group" not in line, line
    assert_running(source, sink, writer)

    stop_cleanly(writer)
    wait_identical(dbs, WRITER_TABLES, processes=(source, sink))
    stop_cleanly(sink)  # a static member: still in the group for up to 10 s, which the rebuild waits out
    rebuilt = run_sink(dbs, topic_prefix, slot, group, "rebuild", "--tables", TABLES, "--once", timeout=180)
    assert rebuilt.returncode == 0, f"cdc-sink rebuild exit {rebuilt.returncode}:\n{rebuilt.stderr}"
    assert_rebuilt(dbs, rebuilt.stderr)
    stop_cleanly(source)


def late_sink_outcome(late: CliProcess) -> str:
    """'refused' (it stopped at its assignment during the replay) or 'ran' (it started after)."""
    wait_until(
        lambda: late.poll() is not None or "assigned" in late.stderr_text(),
        timeout=90,
        message="the late sink neither stopped nor got partitions",
    )
    if late.poll() is None:
        stop_cleanly(late)
        return "ran"
    stderr = late.stderr_text()
    assert late.returncode == 1, f"the late sink exited {late.returncode}:\n{stderr[-3000:]}"
    errors = [line for line in stderr.splitlines() if line.startswith("cdc-sink: error: ")]
    assert errors and "is being rebuilt by cdc-sink rebuild" in errors[-1], stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return "refused"


def replicated(dbs: Databases, prefix: str, slot: str, group: str) -> CliProcess:
    """The writer's tables copied, then changed through Kafka, with the sink stopped; returns the
    source, still running."""
    run_writer(dbs, "--count", "3000", "--rate", "0", "--batch", "50")
    source = start_source(dbs, prefix, slot)
    sink = start_sink(dbs, prefix, slot, group)
    wait_for_output(sink, "assigned", timeout=90)
    run_writer(dbs, "--count", "3000", "--rate", "0", "--batch", "50")
    wait_identical(dbs, WRITER_TABLES, processes=(source, sink))
    stop_cleanly(sink)
    return source


def test_a_sink_started_during_a_rebuild_leaves_no_table_incomplete(dbs: Databases, topic_prefix: str) -> None:
    slot, group = names_of(dbs, topic_prefix)
    source = replicated(dbs, topic_prefix, slot, group)

    execute(dbs.target_dsn, *SLOW_APPLY)  # a replay of several seconds: the late sink joins during it

    rng = random.Random()
    outcomes = []
    for _ in range(3):
        rebuild = start_sink(
            dbs, topic_prefix, slot, group, "rebuild", "--tables", TABLES, "--once", "--batch-size", "50"
        )
        wait_for_output(rebuild, "emptied", timeout=90)
        time.sleep(rng.uniform(0.0, 2.0))
        late = start_sink(dbs, topic_prefix, slot, group)
        code = rebuild.wait(timeout=300)
        assert code == 0, f"cdc-sink rebuild exit {code}:\n{rebuild.stderr_text()[-5000:]}"
        outcomes.append(late_sink_outcome(late))
        assert_rebuilt(dbs, rebuild.stderr_text())
    assert "refused" in outcomes, f"no late sink started during a replay: {outcomes}"
    stop_cleanly(source)


def test_a_rebuild_stopped_early_fails_and_one_without_once_goes_on_as_a_sink(
    dbs: Databases, topic_prefix: str
) -> None:
    slot, group = names_of(dbs, topic_prefix)
    source = replicated(dbs, topic_prefix, slot, group)

    stopped = start_sink(dbs, topic_prefix, slot, group, "rebuild", "--tables", TABLES, "--batch-size", "10")
    wait_for_output(stopped, "assigned", timeout=90)
    code = stop_process(stopped)
    stderr = stopped.stderr_text()
    if "rebuilt public.person" not in stderr:  # stopped during the replay, as intended
        assert code == 1, f"a rebuild stopped before the end exited {code}:\n{stderr[-3000:]}"
        assert "stopped before the end of their topics" in stderr.splitlines()[-1], stderr[-3000:]

    rebuild = start_sink(dbs, topic_prefix, slot, group, "rebuild", "--tables", TABLES)
    wait_for_output(rebuild, "rebuilt public.person, public.orders", timeout=120)
    run_writer(dbs, "--count", "500", "--rate", "0", "--batch", "10")  # applied by the rebuild, now a sink
    wait_identical(dbs, WRITER_TABLES, processes=(source, rebuild))
    assert_same_rows(dbs, WRITER_TABLES)
    stop_cleanly(rebuild, source)
