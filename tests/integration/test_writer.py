"""cdc-writer against a real source database: counts, pacing, and one-line errors."""

import contextlib
import re
import time
from dataclasses import dataclass

import psycopg2.errors

from tests.conftest import Databases
from tests.helpers import psql_rows, run_cli, start_cli, stop_process, wait_until

SUMMARY = re.compile(
    r"^wrote (?P<done>\d+) operations in (?P<seconds>[\d.]+) s \([\d.]+/s\): "
    r"(?P<inserts>\d+) inserts, (?P<updates>\d+) updates, (?P<deletes>\d+) deletes"
    r"(?: \(stopped by (?P<signal>\w+)\))?$",
    re.MULTILINE,
)


@dataclass(frozen=True)
class Summary:
    done: int
    seconds: float
    inserts: int
    updates: int
    deletes: int
    signal: str | None


def summary(stdout: str) -> Summary:
    match = SUMMARY.search(stdout)
    assert match, f"no summary line in the writer's output:\n{stdout}"
    return Summary(
        done=int(match["done"]),
        seconds=float(match["seconds"]),
        inserts=int(match["inserts"]),
        updates=int(match["updates"]),
        deletes=int(match["deletes"]),
        signal=match["signal"],
    )


def writer(dbs: Databases, *args: str) -> list[str]:
    return ["cdc-writer", "--source-dsn", dbs.source_dsn, *args]


def row_count(dsn: str, table: str) -> int:
    [(n,)] = psql_rows(dsn, f"SELECT count(*) FROM public.{table}")
    return int(n)


def test_count_run_writes_and_summarizes(dbs: Databases) -> None:
    result = run_cli(writer(dbs, "--count", "1000", "--rate", "0", "--mix", "70,20,10"))
    assert result.returncode == 0, f"cdc-writer failed:\n{result.stderr}"
    got = summary(result.stdout)
    assert got.done == 1000
    assert (got.inserts, got.updates, got.deletes) == (700, 200, 100), f"not the 70/20/10 mix: {got}"
    assert row_count(dbs.source_dsn, "person") > 0, "person is empty after 1000 operations"
    assert row_count(dbs.source_dsn, "orders") > 0, "orders is empty after 1000 operations"


def test_count_run_follows_the_mix_exactly(dbs: Databases) -> None:
    warm_up = run_cli(writer(dbs, "--count", "100", "--rate", "0"))
    assert warm_up.returncode == 0, f"cdc-writer failed:\n{warm_up.stderr}"

    result = run_cli(writer(dbs, "--count", "1000", "--rate", "0", "--mix", "70,20,10"))
    assert result.returncode == 0, f"cdc-writer failed:\n{result.stderr}"
    got = summary(result.stdout)
    assert (got.done, got.inserts, got.updates, got.deletes) == (1000, 700, 200, 100), got


def test_rate_is_paced_and_sigterm_stops_cleanly(dbs: Databases) -> None:
    process = start_cli(writer(dbs, "--rate", "50", "--log-format", "json"))
    wait_until(
        lambda: "writing to" in process.stderr_text() or process.poll() is not None,
        timeout=60,
        message="the writer never started writing",
    )
    assert process.poll() is None, f"the writer exited early:\n{process.stderr_text()}"
    time.sleep(4)  # the measurement window itself, not a wait for a condition
    code = stop_process(process)
    assert code == 0, f"SIGTERM should stop the writer cleanly, exit code {code}:\n{process.stderr_text()}"
    got = summary(process.stdout_text())
    assert got.signal == "SIGTERM", got
    assert got.seconds > 0, got
    achieved = got.done / got.seconds
    assert 35 <= achieved <= 65, f"--rate 50 gave {achieved:.1f} operations/s ({got})"


def assert_one_line_error(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


def test_unreachable_source_is_one_masked_line() -> None:
    result = run_cli(
        ["cdc-writer", "--source-dsn", "postgresql://nobody:secret@127.0.0.1:1/x", "--log-format", "text"],
        timeout=60,
    )
    assert result.returncode != 0
    line = assert_one_line_error(result.stderr)
    assert "cannot connect" in line, line
    assert "127.0.0.1:1" in line, line
    assert "secret" not in result.stderr + result.stdout, "the password leaked"


def test_bad_mix_is_one_line_naming_the_option(dbs: Databases) -> None:
    result = run_cli(writer(dbs, "--mix", "1,2", "--log-format", "text"), timeout=60)
    assert result.returncode != 0
    line = assert_one_line_error(result.stderr)
    assert "--mix" in line, line


def test_key_changes_and_big_values(dbs: Databases) -> None:
    result = run_cli(
        writer(dbs, "--key-change-ratio", "0.5", "--big-ratio", "0.3", "--count", "300", "--rate", "0")
    )
    assert result.returncode == 0, f"cdc-writer failed:\n{result.stderr}"
    assert summary(result.stdout).done == 300
    [(big,)] = psql_rows(dbs.source_dsn, "SELECT count(*) FROM public.orders WHERE length(note) > 8000")
    assert big > 0, "--big-ratio 0.3 wrote no large note"


def test_keys_changed_and_rows_deleted_by_another_session_do_not_stop_the_writer(dbs: Databases) -> None:
    # the writer reads a person's id, then inserts an order of it: a key changed or a row deleted in
    # between fails the insert's foreign key, which drops that batch, not the writer
    run_cli(writer(dbs, "--count", "300", "--rate", "0", "--seed", "5"))
    process = start_cli(writer(dbs, "--rate", "1000", "--batch", "5", "--mix", "80,10,10"))
    wait_until(
        lambda: "writing to" in process.stderr_text() or process.poll() is not None,
        timeout=60,
        message="the writer never started writing",
    )
    try:
        for step in range(30):
            for statement in (
                f"UPDATE person SET id = id + 1000000 WHERE id % 3 = {step % 3}",
                f"DELETE FROM person WHERE id % 7 = {step % 7}",
            ):
                with contextlib.suppress(psycopg2.errors.DeadlockDetected):  # this side may lose too
                    psql_rows(dbs.source_dsn, statement)
            assert process.poll() is None, f"the writer stopped:\n{process.stderr_text()[-3000:]}"
    finally:
        code = stop_process(process)
    assert code == 0, f"exit code {code}:\n{process.stderr_text()[-3000:]}"
    assert "Traceback" not in process.stderr_text()
