"""Which tables the source replicates: partitioned tables as their root, leaves routed to it,
UNLOGGED and temporary tables refused or left out; the wal2json filter; the lines logged while a
slot waits for open transactions. The catalog's queries are replaced by an in-memory catalog."""

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from pg_kafka_cdc.common.catalog import Column, Relation, TableDef
from pg_kafka_cdc.common.errors import SourceError
from pg_kafka_cdc.common.tables import TableName, TableSelection, parse_selection
from source_connector import catalog as catalog_module
from source_connector.catalog import Catalog
from source_connector.scope import ALL_TABLES, Scope, overlap_problem, persistence_problem, wal2json_filter
from source_connector.slot_wait import OpenTransaction, WaitReporter, describe, shorten, waiting_line


def t(name: str, schema: str = "public") -> TableName:
    return TableName(schema, name)


def named(*tables: TableName) -> Scope:
    """The scope of --tables naming `tables`."""
    return Scope(selection_of(*tables))


def selection_of(*tables: TableName) -> TableSelection:
    return parse_selection(",".join(map(str, tables)), None)


# --- scope ----------------------------------------------------------------------------------------


def test_a_leaf_is_replicated_as_its_root_in_the_default_scope() -> None:
    scope = Scope()
    assert scope.replicated_as([t("m_1"), t("m")]) == t("m")
    assert scope.replicated_as([t("plain")]) == t("plain")
    assert scope.replicated_as([t("x", "other")]) == t("x", "other"), "every schema"
    assert scope.replicated_as([t("m_1"), t("m", "other")]) == t("m", "other"), "the root, in its own schema"
    assert scope.replicated_as([t("x", "pg_catalog")]) is None
    assert scope.replicated_as([t("offsets", "cdc_sink")]) is None, "the sink's bookkeeping"
    assert Scope(TableSelection(), frozenset({t("m")})).replicated_as([t("m_1"), t("m")]) is None, "left out"


def test_a_leaf_goes_to_the_highest_table_named() -> None:
    chain = [t("m_1_a"), t("m_1"), t("m")]
    assert named(t("m")).replicated_as(chain) == t("m")
    assert named(t("m_1")).replicated_as(chain) == t("m_1"), "a sub-partitioned partition named alone"
    assert named(t("m_1_a")).replicated_as(chain) == t("m_1_a"), "a leaf named alone is a table"
    assert named(t("other")).replicated_as(chain) is None


def test_the_wal2json_filter() -> None:
    two = named(t("a b"), t("c"))
    assert wal2json_filter(two, [t("a b"), t("c")], partitioned=False) == ["public.a\\ b", "public.c"]
    assert wal2json_filter(Scope(), [t("c")], partitioned=False) == ["*.*"], "every schema"
    assert wal2json_filter(two, [t("c")], partitioned=True) == [ALL_TABLES] == ["*.*"]
    assert wal2json_filter(Scope(), [], partitioned=True) == ["*.*"]


def rel(
    name: str, kind: str = "r", persistence: str = "p", partition: bool = False, schema: str = "public"
) -> Relation:
    return Relation(t(name, schema), hash(name) % 100_000, kind, persistence, partition)


def test_unlogged_and_temporary_tables_are_named_with_the_fix() -> None:
    assert persistence_problem(rel("a")) is None
    assert persistence_problem(rel("u", persistence="u")) == (
        "table public.u is UNLOGGED: its changes never reach the WAL, so they cannot be streamed. "
        "Fix: ALTER TABLE public.u SET LOGGED"
    )
    leaf = persistence_problem(rel("m_1", persistence="u", partition=True), t("m"))
    assert leaf is not None and leaf.startswith("table public.m has a partition public.m_1 that is UNLOGGED")
    assert "ALTER TABLE public.m_1 SET LOGGED" in leaf
    temp = persistence_problem(rel("tmp", persistence="t", schema="pg_temp_3"))
    assert temp is not None and temp.startswith("table pg_temp_3.tmp is a temporary table")
    assert "\n" not in temp


def test_a_leaf_named_with_its_root_is_refused() -> None:
    both = selection_of(t("m"), t("m_1"))
    assert overlap_problem(t("m"), [t("m")], both) is None
    assert overlap_problem(t("m_1"), [t("m_1"), t("m")], both) == (
        "table public.m_1 is a partition of public.m, which --tables names too, and its rows are replicated "
        "as public.m's: remove public.m_1 from --tables / TABLES"
    )
    assert overlap_problem(t("m_1"), [t("m_1"), t("m")], selection_of(t("m_1"))) is None


# --- the catalog ----------------------------------------------------------------------------------

COLUMNS = (Column("id", "integer", True, 23, "b", "pg_catalog", "int4", 0, "", "", ""),)


@dataclass
class FakeDb:
    """A catalog: relations, the parent of each partition, and each table's key and replica identity."""

    relations: dict[TableName, Relation] = field(default_factory=dict)
    parents: dict[TableName, TableName] = field(default_factory=dict)
    replica_identity: dict[TableName, str] = field(default_factory=dict)
    queries: int = 0

    def add(self, name: str, kind: str = "r", persistence: str = "p", parent: str | None = None) -> None:
        self.relations[t(name)] = rel(name, kind, persistence, parent is not None)
        if parent is not None:
            self.parents[t(name)] = t(parent)

    def chain(self, name: TableName) -> list[TableName]:
        out = [name]
        while out[-1] in self.parents:
            out.append(self.parents[out[-1]])
        return out

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def relation(conn: Any, table: TableName) -> Relation | None:
            self.queries += 1
            return self.relations.get(table)

        def ancestors(conn: Any, r: Relation) -> list[TableName]:
            return self.chain(r.name)

        def partitions(conn: Any, r: Relation) -> list[Relation]:
            return [p for n, p in self.relations.items() if r.name in self.chain(n)[1:]]

        def read_table(conn: Any, table: TableName) -> TableDef | None:
            if table not in self.relations:
                return None
            return TableDef(table, 1, COLUMNS, ("id",), True, self.replica_identity.get(table, "d"))

        def every_table(conn: Any) -> list[TableName]:
            return sorted(n for n, r in self.relations.items() if not r.is_partition)

        for name, fn in [
            ("relation", relation),
            ("ancestors", ancestors),
            ("partitions", partitions),
            ("read_table", read_table),
            ("every_table", every_table),
            ("table_exists", lambda conn, table: table in self.relations),
        ]:
            monkeypatch.setattr(catalog_module, name, fn)


@pytest.fixture
def db(monkeypatch: pytest.MonkeyPatch) -> FakeDb:
    fake = FakeDb()
    fake.add("plain")
    fake.add("m", kind="p")
    for leaf in ("m_1", "m_2", "m_3"):
        fake.add(leaf, parent="m")
    fake.install(monkeypatch)
    return fake


def started(requested: tuple[TableName, ...]) -> Catalog:
    catalog = Catalog(None, "cdc")
    for name in catalog.tables(selection_of(*requested)):
        catalog.known(catalog.read(name))
    return catalog


def test_the_default_scope_lists_roots_not_leaves(db: FakeDb) -> None:
    catalog = Catalog(None, "cdc")
    assert catalog.tables(TableSelection()) == [t("m"), t("plain")]
    assert catalog.partitioned


def test_a_leaf_change_is_published_as_the_root(db: FakeDb) -> None:
    catalog = started((t("m"),))
    info = catalog.lookup("public", "m_2", False)
    assert info is not None and info.name == t("m") and info.topic == "cdc.public.m"
    assert catalog.lookup("public", "m_2", False) is info, "cached"
    assert catalog.lookup("public", "plain", False) is None, "out of scope"


def test_a_partition_attached_later_is_found_after_an_empty_commit(db: FakeDb) -> None:
    catalog = started((t("m"),))
    db.add("m_4")
    assert catalog.lookup("public", "m_4", False) is None
    db.add("m_4", parent="m")  # ATTACH PARTITION
    assert catalog.lookup("public", "m_4", False) is None, "still the cached answer"
    catalog.forget_unrouted()
    info = catalog.lookup("public", "m_4", False)
    assert info is not None and info.name == t("m")


def test_a_leaf_named_with_its_root_is_refused_at_start(db: FakeDb) -> None:
    with pytest.raises(SourceError, match=r"table public\.m_1 is a partition of public\.m"):
        Catalog(None, "cdc").tables(selection_of(t("m"), t("m_1")))
    leaf_alone = started((t("m_1"),))
    info = leaf_alone.lookup("public", "m_1", False)
    assert info is not None and info.name == t("m_1")
    assert not leaf_alone.partitioned


def test_unlogged_tables_are_refused_when_named_and_left_out_by_default(
    db: FakeDb, caplog: pytest.LogCaptureFixture
) -> None:
    db.add("scratch", persistence="u")
    with pytest.raises(SourceError, match=r"^table public\.scratch is UNLOGGED.*SET LOGGED$"):
        Catalog(None, "cdc").tables(selection_of(t("scratch")))
    with caplog.at_level(logging.WARNING):
        catalog = Catalog(None, "cdc")
        assert catalog.tables(TableSelection()) == [t("m"), t("plain")]
    assert "table public.scratch is UNLOGGED" in caplog.text and "left out" in caplog.text


def test_a_root_with_an_unlogged_leaf_is_refused(db: FakeDb, caplog: pytest.LogCaptureFixture) -> None:
    db.add("m_9", persistence="u", parent="m")
    with pytest.raises(SourceError, match=r"table public\.m has a partition public\.m_9 that is UNLOGGED"):
        Catalog(None, "cdc").tables(selection_of(t("m")))
    catalog = Catalog(None, "cdc")
    assert catalog.tables(TableSelection()) == [t("plain")]
    assert catalog.lookup("public", "m_1", False) is None, "the root left out, its leaves too"


def test_a_leaf_without_a_usable_replica_identity_is_refused(db: FakeDb) -> None:
    db.replica_identity[t("m_3")] = "n"
    with pytest.raises(SourceError, match=r"table public\.m_3 has REPLICA IDENTITY NOTHING"):
        Catalog(None, "cdc").tables(selection_of(t("m")))


def test_a_table_dropped_before_its_changes_are_read_is_skipped(db: FakeDb) -> None:
    catalog = started(())
    assert catalog.lookup("public", "gone", False) is None


# --- waiting for open transactions ---------------------------------------------------------------


def test_the_waiting_line() -> None:
    one = OpenTransaction(1234, 35.4, "idle in transaction", "UPDATE item\n   SET qty = qty + 1 WHERE id = 7")
    assert waiting_line("cdc_slot", [one], 1) == (
        "creating slot cdc_slot: waiting for 1 open transaction to end: "
        "pid 1234, open for 35 s (idle in transaction: UPDATE item SET qty = qty + 1 WHERE id = 7)"
    )
    two = OpenTransaction(99, None, "", "")
    line = waiting_line("s", [one, two], 5)
    assert line.startswith("creating slot s: waiting for 5 open transactions to end: pid 1234, open for 35 s")
    assert line.endswith("; pid 99; and 3 more")
    assert "none is visible to this role" in waiting_line("s", [], 0)


def test_long_queries_are_shortened() -> None:
    query = "SELECT " + ", ".join(f"c{i}" for i in range(50))
    short = shorten(query)
    assert len(short) == 60 and short.endswith("...")
    assert describe(OpenTransaction(1, 2.0, "active", query)) == f"pid 1, open for 2 s (active: {short})"


class FakeCursor:
    def __init__(self, conn: "FakeConn") -> None:
        self.conn = conn

    def __enter__(self) -> "FakeCursor":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def execute(self, query: str, params: tuple[list[int], int]) -> None:
        self.conn.excluded.append(params[0])

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [(4321, 12.0, "idle in transaction", "INSERT INTO t VALUES (1)", 1)]


class FakeConn:
    closed = False

    def __init__(self) -> None:
        self.excluded: list[list[int]] = []

    def cursor(self) -> FakeCursor:
        return FakeCursor(self)

    def close(self) -> None:
        self.closed = True


def test_the_reporter_logs_until_stopped(caplog: pytest.LogCaptureFixture) -> None:
    conn = FakeConn()
    polled = threading.Event()
    original = FakeCursor.fetchall

    def fetchall(self: FakeCursor) -> list[tuple[Any, ...]]:
        polled.set()
        return original(self)

    with caplog.at_level(logging.WARNING), pytest.MonkeyPatch.context() as mp:
        mp.setattr(FakeCursor, "fetchall", fetchall)
        reporter = WaitReporter(lambda: conn, "cdc_slot", [11, 12], interval=0.01)
        reporter.thread.start()
        assert polled.wait(5)
        reporter.stop()
    assert not reporter.thread.is_alive() and conn.closed
    assert conn.excluded[0] == [11, 12], "our own backends are never named"
    assert "creating slot cdc_slot: waiting for 1 open transaction to end: pid 4321, open for 12 s" in caplog.text


def test_the_reporter_says_nothing_when_the_slot_is_created_at_once(caplog: pytest.LogCaptureFixture) -> None:
    connected: list[bool] = []
    with caplog.at_level(logging.DEBUG):
        reporter = WaitReporter(lambda: connected.append(True), "s", [], interval=5.0)
        reporter.thread.start()
        reporter.stop()
    assert not reporter.thread.is_alive()
    assert connected == [] and "creating slot" not in caplog.text
