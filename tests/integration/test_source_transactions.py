"""cdc-source --transaction-metadata against the real stack: a BEGIN and an END record on
<prefix>.transaction for every source transaction with change messages, valid against
schemas/transaction.schema.json, each END counting exactly the messages of its transaction in each
topic (row events, tombstones, truncate events on every partition); none for a transaction on a
table out of scope; after `kill -9` under load and restarts, still one BEGIN and one END each.
(The `reader` fixture keeps the envelopes a test read: see tests/source_events.py.)"""

import json
import signal
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from tests.conftest import Databases, Stack
from tests.helpers import REPO, psql_rows, stop_process, wait_until
from tests.integration.test_source_slot import people, total
from tests.kafka_read import Record, read_topics
from tests.pipeline import execute, start_source, start_writer, stop_cleanly, wait_while_running
from tests.source_events import EventReader, new_slot, stop_source, topic_of

SCHEMA: dict[str, Any] = json.loads(Path(REPO / "schemas" / "transaction.schema.json").read_text())
Draft202012Validator.check_schema(SCHEMA)
VALIDATOR = Draft202012Validator(SCHEMA)
KILLS = 3

Transaction = tuple[str, int]  # (stream, commit LSN)


def records_topic(prefix: str) -> str:
    """The transaction topic, spelled out (not derived by the production code)."""
    return f"{prefix}.transaction"


def transaction_of(record: Record) -> Transaction | None:
    """The transaction of a change message (a tombstone's from its header); None for a snapshot read."""
    if record.value is None:
        header = json.loads(dict(record.headers or ()).get("cdc.source") or b"null")
        assert isinstance(header, dict), f"{record.topic}@{record.offset}: a tombstone without its position"
        return header["stream"], header["commit_lsn"]
    envelope = json.loads(record.value)
    if envelope["op"] == "r":
        return None
    source = envelope["source"]
    assert source["txId"] is not None, envelope
    return source["stream"], source["commit_lsn"]


def position(doc: dict[str, Any]) -> tuple[int, int]:
    return doc["source"]["commit_lsn"], doc["source"]["seq"]


def transaction_problems(stack: Stack, prefix: str, topics: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """What is wrong with the transaction records of `topics` (empty: nothing), and the records."""
    problems: list[str] = []
    messages: Counter[tuple[Transaction, str]] = Counter()
    for r in read_topics(stack.bootstrap_servers, topics, quiet=1.0):
        tx = transaction_of(r)
        if tx is not None:
            messages[(tx, r.topic)] += 1
    with_messages = {tx for tx, _ in messages}
    records = []
    for r in read_topics(stack.bootstrap_servers, [records_topic(prefix)], quiet=1.0):
        assert r.partition == 0 and r.value is not None
        doc = json.loads(r.value)
        for error in VALIDATOR.iter_errors(doc):
            problems.append(f"record @{r.offset} at /{'/'.join(map(str, error.absolute_path))}: {error.message}")
        source = doc["source"]
        if json.loads(r.key or b"null") != {"id": f"{source['txId']}:{source['commit_lsn']}"} or doc["id"] != (
            f"{source['txId']}:{source['commit_lsn']}"
        ):
            problems.append(f"record @{r.offset}: key {r.key!r} or id {doc['id']} is not <txId>:<commit_lsn>")
        records.append(doc)
    seen = Counter((d["status"], (d["source"]["stream"], d["source"]["commit_lsn"])) for d in records)
    twice = [k for k, n in seen.items() if n > 1]
    if twice:
        problems.append(f"{len(twice)} records published more than once, e.g. {twice[:3]}")
    for tx in sorted(with_messages):
        if seen[("BEGIN", tx)] == 0 or seen[("END", tx)] == 0:
            problems.append(
                f"transaction {tx}: change messages but BEGIN x{seen[('BEGIN', tx)]}, END x{seen[('END', tx)]}"
            )
    for status, tx in seen:
        if tx not in with_messages:
            problems.append(f"{status} of transaction {tx}, which has no change message")
    for doc in records:
        if doc["status"] != "END":
            continue
        tx = (doc["source"]["stream"], doc["source"]["commit_lsn"])
        counts = {c["topic"]: c["event_count"] for c in doc["data_collections"]}
        found = {topic: n for (t, topic), n in messages.items() if t == tx}
        if counts != found:
            problems.append(f"END of {tx} counts {counts}, the topics hold {found}")
        if doc["event_count"] != sum(counts.values()):
            problems.append(f"END of {tx}: event_count {doc['event_count']} is not the sum of {counts}")
    positions = [position(d) for d in records]
    if any(b <= a for a, b in pairwise(positions)):
        problems.append("the records' positions do not strictly increase along the transaction topic")
    return problems, records


def test_a_multi_table_transaction_gets_a_begin_and_an_end_counting_each_topic(
    stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    execute(
        dbs.source_dsn,
        "CREATE TABLE account (id int PRIMARY KEY, balance int NOT NULL)",
        "CREATE TABLE entry (id int PRIMARY KEY, note text)",
        "CREATE TABLE audit (id serial PRIMARY KEY, what text)",  # out of scope
        separately=True,
    )
    slot = new_slot()
    tables = "public.account,public.entry"
    source = start_source(
        dbs, topic_prefix, slot, "--partitions", "3", "--transaction-metadata", "--tables", tables, streaming=True
    )
    execute(
        dbs.source_dsn,
        "BEGIN",
        "INSERT INTO account SELECT g, 100 FROM generate_series(1, 6) g",
        "INSERT INTO entry VALUES (1, 'one'), (2, 'two')",
        "UPDATE account SET balance = balance - 10 WHERE id IN (1, 2)",
        "DELETE FROM account WHERE id = 3",
        "UPDATE account SET id = 30 WHERE id = 4",  # a key change: d, tombstone, c
        "UPDATE entry SET note = 'uno' WHERE id = 1",
        "TRUNCATE entry",  # a t on each of the 3 partitions
        "INSERT INTO entry VALUES (3, 'three')",
        "COMMIT",
        separately=True,
    )
    execute(dbs.source_dsn, "INSERT INTO audit (what) VALUES ('out of scope')")
    execute(dbs.source_dsn, "UPDATE account SET balance = 0 WHERE id = 5")
    topics = [topic_of(topic_prefix, "account"), topic_of(topic_prefix, "entry")]
    everything = [*topics, records_topic(topic_prefix)]
    wait_while_running(
        lambda: total(stack, everything) >= 2 + 20 + 2 + 1, [source], timeout=60, message="the records"
    )
    stop_source(source)
    reader.read(topics)
    problems, records = transaction_problems(stack, topic_prefix, topics)
    assert problems == []
    assert [r["status"] for r in records] == ["BEGIN", "END", "BEGIN", "END"]  # nothing for audit's transaction
    big, small = records[1], records[3]
    # account: 6 c, 2 u, d + tombstone, d + tombstone + c; entry: 2 c, u, 3 t, c
    assert big["data_collections"] == [
        {"data_collection": "public.account", "topic": topics[0], "event_count": 13},
        {"data_collection": "public.entry", "topic": topics[1], "event_count": 7},
    ]
    assert big["event_count"] == 20 and big["ts_ms"] == big["source"]["ts_us"] // 1000
    assert small["data_collections"] == [
        {"data_collection": "public.account", "topic": topics[0], "event_count": 1}
    ]
    assert records[0]["source"]["seq"] == 0 and big["source"]["seq"] > 0
    reader.assert_valid()


def test_kill_9_under_load_then_restart_one_begin_and_one_end_each_with_their_counts(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    writer = start_writer(dbs, "--rate", "0", "--batch", "20", "--key-change-ratio", "0.1")
    wait_until(lambda: writer.poll() is not None or people(dbs) >= 200, timeout=120, message="no writes")
    slot = new_slot()
    topics = [topic_of(topic_prefix, "person"), topic_of(topic_prefix, "orders")]
    options = ("--partitions", "3", "--transaction-metadata")
    for kill in range(KILLS):
        source = start_source(dbs, topic_prefix, slot, *options, streaming=True)
        wanted = total(stack, topics) + 2000

        def streamed(source: Any = source, wanted: int = wanted) -> bool:
            return source.poll() is not None or total(stack, topics) > wanted

        wait_until(streamed, timeout=120, message=f"no changes streamed before kill {kill + 1}")
        assert source.poll() is None, f"cdc-source exited:\n{source.stderr_text()}"
        assert stop_process(source, signal.SIGKILL) == -signal.SIGKILL
    last = start_source(dbs, topic_prefix, slot, *options, streaming=True)
    stop_cleanly(writer)
    [(end,)] = psql_rows(dbs.source_dsn, "SELECT pg_current_wal_lsn()::text")

    def caught_up() -> bool:
        assert last.poll() is None, f"cdc-source exited:\n{last.stderr_text()}"
        [(done,)] = psql_rows(
            dbs.source_dsn,
            "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
            (end, slot),
        )
        return bool(done)

    wait_until(caught_up, timeout=120, interval=0.5, message="cdc-source never confirmed the end of the writes")
    log = stop_source(last)
    problems, records = transaction_problems(stack, topic_prefix, topics)
    assert problems == [], "\n".join(problems[:20])
    ends = sum(1 for r in records if r["status"] == "END")
    assert ends > 100, f"only {ends} transactions"
    assert "not published twice" in log, log[-3000:]
