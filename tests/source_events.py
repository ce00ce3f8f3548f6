"""What cdc-source publishes, read back for the tests of tests/integration/test_source_*.py: the change
events of its topics, its state records, its slot, and the source's rows as PostgreSQL prints them.

Every envelope an EventReader reads is kept and validated against schemas/envelope.schema.json by
assert_valid() at the end of each test (the `reader` fixture gives each test its own)."""

import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator
from psycopg2 import sql
from psycopg2.extensions import make_dsn

from schemas.topics import state_topic
from tests.conftest import Databases
from tests.helpers import REPO, CliProcess, psql_rows
from tests.kafka_read import read_topics
from tests.pipeline import TEXT_SESSION, stop_cleanly, wait_while_running

SCHEMA: dict[str, Any] = json.loads((REPO / "schemas" / "envelope.schema.json").read_text())
Draft202012Validator.check_schema(SCHEMA)
VALIDATOR = Draft202012Validator(SCHEMA)


def _no_floats(text: str) -> Any:
    raise AssertionError(f"an envelope holds the bare JSON number {text}: numbers other than integers are strings")


@dataclass(frozen=True)
class Event:
    """One message of a change topic; `value` None is a tombstone."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    raw: bytes | None
    value: dict[str, Any] | None

    @property
    def op(self) -> str | None:
        """c, u, d, r, t, or None for a tombstone."""
        return None if self.value is None else str(self.value["op"])

    @property
    def env(self) -> dict[str, Any]:
        assert self.value is not None, f"{self.topic}[{self.partition}]@{self.offset} is a tombstone"
        return self.value

    @property
    def after(self) -> dict[str, Any] | None:
        after: dict[str, Any] | None = self.env["after"]
        return after

    @property
    def before(self) -> dict[str, Any] | None:
        before: dict[str, Any] | None = self.env["before"]
        return before

    @property
    def source(self) -> dict[str, Any]:
        source: dict[str, Any] = self.env["source"]
        return source


def on(events: list[Event], topic: str) -> list[Event]:
    return [e for e in events if e.topic == topic]


def describe(events: list[Event]) -> str:
    return "\n".join(
        f"  {e.topic}[{e.partition}]@{e.offset} key={e.key!r} {e.op or 'tombstone'} "
        f"{'' if e.value is None else json.dumps({k: e.env[k] for k in ('before', 'after')})[:200]}"
        for e in events
    )


def count(topic: str, n: int) -> Callable[[list[Event]], bool]:
    return lambda events: len(on(events, topic)) >= n


def stop_source(process: CliProcess) -> str:
    """SIGTERM: cdc-source must finish cleanly with exit code 0 and no Traceback; returns its stderr."""
    stop_cleanly(process)
    stderr = process.stderr_text()
    assert "Traceback" not in stderr, stderr
    return stderr


class EventReader:
    """Reads change topics from the beginning; keeps every envelope it read, by (topic, partition,
    offset), for assert_valid()."""

    def __init__(self, bootstrap_servers: str) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.envelopes: dict[tuple[str, int, int], dict[str, Any]] = {}

    def read(self, topics: Iterable[str], quiet: float = 2.0) -> list[Event]:
        """Every message of `topics` from the beginning, sorted by (topic, partition, offset)."""
        events = []
        for r in read_topics(self.bootstrap_servers, topics, quiet=quiet):
            value = None if r.value is None else json.loads(r.value, parse_float=_no_floats)
            if value is not None:
                assert isinstance(value, dict), (
                    f"{r.topic}@{r.offset}: the value is not a JSON object: {r.value!r}"
                )
                self.envelopes[(r.topic, r.partition, r.offset)] = value
            events.append(Event(r.topic, r.partition, r.offset, r.key, r.value, value))
        return events

    def wait_for(
        self,
        topics: list[str],
        enough: Callable[[list[Event]], bool],
        what: str,
        process: CliProcess | None = None,
        timeout: float = 120,
    ) -> list[Event]:
        """Read the topics until `enough(events)`; fails with what was there after `timeout` seconds,
        or at once when the connector `process` exits."""
        seen: list[Event] = []

        def ready() -> bool:
            seen[:] = self.read(topics)
            return enough(seen)

        try:
            wait_while_running(ready, [process] if process else [], timeout=timeout, message=what, interval=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the topics hold:\n{describe(seen)}") from None
        return list(seen)

    def wait_then_stop(
        self,
        topics: list[str],
        enough: Callable[[list[Event]], bool],
        what: str,
        process: CliProcess,
        timeout: float = 120,
    ) -> list[Event]:
        """Wait until `enough(events)`, stop the connector (SIGTERM, exit 0), then read the topics once
        more: whatever it sent meanwhile is in what the test checks, so extra messages are caught too."""
        self.wait_for(topics, enough, what, process, timeout)
        stop_source(process)
        return self.read(topics)

    def assert_valid(self) -> None:
        """Every envelope read so far validates against the JSON schema."""
        assert self.envelopes, "no envelope was read"
        problems = []
        for (topic, partition, offset), env in self.envelopes.items():
            for error in VALIDATOR.iter_errors(env):
                path = "/".join(str(p) for p in error.absolute_path)
                problems.append(f"{topic}[{partition}]@{offset} at /{path}: {error.message}")
        assert not problems, f"{len(problems)} schema violations, first ones:\n" + "\n".join(problems[:20])


# --- the connector -------------------------------------------------------------------------


def new_slot() -> str:
    return f"test_{uuid.uuid4().hex[:12]}"


def topic_of(prefix: str, table: str) -> str:
    """The topic of public.`table`, spelled out (not derived by the production code)."""
    return f"{prefix}.public.{table}"


def slot_row(dbs: Databases, slot: str) -> tuple[Any, ...] | None:
    rows = psql_rows(
        dbs.source_dsn,
        "SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    return rows[0] if rows else None


def state_records(bootstrap_servers: str, prefix: str, slot: str) -> list[dict[str, Any] | None]:
    """The connector's state records for `slot`, oldest first (None for a tombstone)."""
    found: list[dict[str, Any] | None] = []
    for r in read_topics(bootstrap_servers, [state_topic(prefix)], quiet=1.0):
        key = None if r.key is None else json.loads(r.key)
        if key is not None and len(key) == 3 and key[2] == slot:  # not the tables' shape records
            found.append(None if r.value is None else json.loads(r.value))
    return found


# --- the source's rows as text -----------------------------------------------------------------


def source_text_rows(
    dbs: Databases, table: str, key: str = "id", cast: bool = False
) -> dict[str, dict[str, str | None]]:
    """Every row of `table` as text (pinned session settings), by the text of its `key` column.

    By default each value as its type's output function prints it, which is what wal2json sends
    (`format('%s', col)`, NULL kept), booleans as `col::text` (true/false); with `cast`, `col::text`
    for every column, which differs from the output for character(n) (blanks trimmed) and inet
    (host mask added)."""
    columns = [
        (str(name), str(type_name))
        for name, type_name in psql_rows(
            dbs.source_dsn,
            "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = %s::regclass "
            "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (f"public.{table}",),
        )
    ]
    output = sql.SQL("CASE WHEN num_nonnulls({0}) = 1 THEN format('%s', {0}) END")
    query = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(
            (sql.SQL("{}::text") if cast or type_name == "boolean" else output).format(sql.Identifier(name))
            for name, type_name in columns
        ),
        sql.Identifier("public", table),
    )
    rows = psql_rows(make_dsn(dbs.source_dsn, options=TEXT_SESSION), query)
    names = [name for name, _ in columns]
    return {str(row[names.index(key)]): dict(zip(names, row, strict=True)) for row in rows}


def as_text(value: Any) -> str | None:
    """An envelope value as PostgreSQL's text: integers and booleans back to their text form."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def key_text(key: bytes | None) -> str:
    assert key is not None
    [value] = json.loads(key).values()
    return str(value)
