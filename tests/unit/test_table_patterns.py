"""Table patterns: --tables with `*` wildcards and --exclude-tables, parsed, matched, turned into the
source's scope and wal2json filter, and into the sink's Kafka subscription; the default scope of
every non-system schema. Pure logic (the catalog is the in-memory one of test_source_tables)."""

import logging
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pg_kafka_cdc.common.errors import ConfigError, SourceError
from pg_kafka_cdc.common.settings import build_settings
from pg_kafka_cdc.common.tables import (
    NamePattern,
    TableName,
    TableSelection,
    parse_patterns,
    parse_selection,
    parse_tables,
    require_exact,
    reserved_schema,
)
from schemas.topics import table_for, topic_for
from sink_connector.subscription import in_subscription, subscription_for
from source_connector.catalog import Catalog
from source_connector.scope import Scope, overlap_problem, wal2json_filter
from tests.unit.test_source_tables import FakeDb, rel, t


def sel(tables: str | None, exclude: str | None = None) -> TableSelection:
    return parse_selection(tables, exclude)


# --- parsing ----------------------------------------------------------------------------------------


def test_patterns_and_exact_names_mix() -> None:
    patterns = parse_patterns('sales.*, *.*, public.order_*, public."Order Items", Person, "a*b".c')
    assert [str(p) for p in patterns] == [
        "sales.*",
        "*.*",
        "public.order_*",
        'public."Order Items"',
        "public.person",
        '"a*b".c',
    ]
    assert [p.exact for p in patterns] == [
        None,
        None,
        None,
        t("Order Items"),
        t("person"),
        TableName("a*b", "c"),
    ], "a quoted * is a character"


def test_a_pattern_part_folds_to_lower_case_and_keeps_quoted_pieces() -> None:
    [upper] = parse_patterns("Sales.Order_*")
    assert upper.schema == NamePattern(("sales",)) and upper.name == NamePattern(("order_", ""))
    [quoted] = parse_patterns('"Sales"*."X"')
    assert quoted.schema == NamePattern(("Sales", "")) and quoted.name == NamePattern(("X",))
    [double] = parse_patterns("a**b.*")
    assert double.schema == NamePattern(("a", "b")), "a run of wildcards is one"
    [bare] = parse_patterns("*")
    assert str(bare) == "public.*", "a bare name is in public, as without wildcards"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("sales.", r"--tables / TABLES: empty name in table list 'sales\.': each entry is schema\.table"),
        (".x", "empty name"),
        ("a,,b", "empty name"),
        ("a.b.c", r"table names are schema\.table; got 'a\.b\.c' in 'a\.b\.c': quote a name that holds a dot"),
        ("sales.*.x", r"got 'sales\.\*\.x'"),
        ('"a"x.b', "after a quoted identifier"),
        ('sales."x', "unterminated quoted identifier"),
    ],
)
def test_bad_patterns_name_the_value_and_the_fix(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as caught:
        parse_patterns(text)
    assert "\n" not in str(caught.value)


def test_an_exclusion_names_its_own_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--exclude-tables / EXCLUDE_TABLES: empty name"):
        sel("sales.*", "sales.")


def test_parse_tables_takes_exact_names_only() -> None:
    assert parse_tables('public."o*"') == (t("o*"),)
    with pytest.raises(ConfigError, match=r"needs exact table names, not the pattern public\.o\*"):
        parse_tables("public.o*")


# --- matching ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "table", "matches"),
    [
        ("sales.*", t("orders", "sales"), True),
        ("sales.*", t("orders"), False),
        ("public.order_*", t("order_items"), True),
        ("public.order_*", t("order_"), True),
        ("public.order_*", t("orders"), False),
        ("*.orders", t("orders", "eu"), True),
        ("*_eu.*", t("x", "sales_eu"), True),
        ("*_eu.*", t("x", "sales_us"), False),
        ("*.*", t("x", "Mixed Case"), True),
        ('"Sales"*.*', t("x", "Sales_2"), True),
        ('"Sales"*.*', t("x", "sales_2"), False),
        ("p*.*", t("x", "pg_catalog"), False),
        ("*.*", t("x", "pg_temp_3"), False),
        ("*.*", t("x", "pg_toast"), False),
        ("*.*", t("x", "information_schema"), False),
        ("*.*", t("offsets", "cdc_sink"), False),
        ("cdc_sink.*", t("offsets", "cdc_sink"), True),
        ("pg_temp_3.*", t("x", "pg_temp_3"), True),
    ],
)
def test_pattern_matching(pattern: str, table: TableName, matches: bool) -> None:
    [parsed] = parse_patterns(pattern)
    assert parsed.matches(table) is matches


def test_reserved_schemas() -> None:
    for schema in ("pg_catalog", "information_schema", "pg_toast", "pg_toast_temp_1", "pg_temp_12", "cdc_sink"):
        assert reserved_schema(schema), schema
    for schema in ("public", "sales", "pg", "pgsql", "cdc"):
        assert not reserved_schema(schema), schema


def test_the_selection() -> None:
    selection = sel("public.a, sales.*", "sales.secret, sales.tmp_*")
    assert selection.names == (t("a"),) and [str(p) for p in selection.patterns] == ["sales.*"]
    assert not selection.default and not selection.exact
    assert selection.selects(t("a")) and selection.selects(t("x", "sales"))
    assert not selection.selects(t("secret", "sales")) and not selection.selects(t("tmp_1", "sales"))
    assert not selection.selects(t("b"))
    assert str(selection) == "public.a,sales.* except sales.secret,sales.tmp_*"
    every = sel(None, "sales.*")
    assert (
        every.default
        and every.selects(t("x"))
        and every.selects(t("x", "eu"))
        and not every.selects(t("x", "sales"))
    )
    assert sel("public.a,public.b").exact


def test_a_table_named_and_excluded_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"^table public\.a is named in --tables / TABLES and matched by public\.\* in"
    ):
        sel("public.a", "public.*")


def test_rebuild_needs_exact_names() -> None:
    assert require_exact(sel("public.a,public.b"), "cdc-sink rebuild") == (t("a"), t("b"))
    assert require_exact(sel(None), "cdc-sink rebuild") == ()
    assert require_exact(sel("public.a", "sales.*"), "cdc-sink rebuild") == (t("a"),)
    with pytest.raises(ConfigError) as caught:
        require_exact(sel("public.a,sales.*"), "cdc-sink rebuild")
    assert str(caught.value) == (
        "cdc-sink rebuild needs exact table names in --tables / TABLES, not the pattern sales.*: "
        "name each table (schema.table)"
    )


def test_settings_keep_exact_tables_only_without_patterns() -> None:
    def build(tables: str | None, exclude: str | None = None) -> tuple[tuple[TableName, ...], TableSelection]:
        s = build_settings("host=s", "host=t", "k:9092", "cdc", tables, None, {}, exclude_tables=exclude)
        return s.tables, s.selection

    assert build("public.a,b") == ((t("a"), t("b")), sel("public.a,b"))
    tables, selection = build("public.a,sales.*", "sales.x")
    assert tables == () and selection.names == (t("a"),) and selection.exclude
    assert build(None) == ((), TableSelection())
    with pytest.raises(ConfigError, match="EXCLUDE_TABLES"):
        build(None, "a.b.c")


# --- the source's scope and wal2json filter ----------------------------------------------------------


def test_the_scope_of_patterns() -> None:
    scope = Scope(sel("public.a, sales.*", "sales.secret"), frozenset({t("scratch", "sales")}))
    assert scope.replicated_as([t("a")]) == t("a")
    assert scope.replicated_as([t("later", "sales")]) == t("later", "sales"), "created later, reached"
    assert scope.replicated_as([t("secret", "sales")]) is None, "excluded"
    assert scope.replicated_as([t("scratch", "sales")]) is None, "left out at start-up"
    assert scope.replicated_as([t("p_1", "sales"), t("p", "sales")]) == t("p", "sales"), "a leaf goes to its root"
    assert scope.replicated_as([t("p_1", "sales"), t("p", "other")]) is None, "a pattern reaches roots only"
    assert scope.replicated_as([t("b")]) is None


def test_the_wal2json_filter_of_patterns() -> None:
    scope = Scope(sel('public.a, sales.*, public.order_*, *_eu.orders, "A b".*'))
    started = [t("a"), t("x", "sales"), t("order_1")]
    assert wal2json_filter(scope, started, partitioned=False) == [
        "public.a",
        "sales.*",
        "public.*",
        "*.orders",
        "A\\ b.*",
    ]
    assert wal2json_filter(Scope(sel("public.a, *.*")), [t("a")], partitioned=False) == ["*.*"]
    assert wal2json_filter(Scope(sel(None, "sales.*")), [], partitioned=False) == ["*.*"]


def test_a_partition_named_under_a_root_a_pattern_reaches_is_refused() -> None:
    problem = overlap_problem(t("m_1"), [t("m_1"), t("m")], sel("public.m_1, public.*"))
    assert problem is not None and problem.startswith(
        "table public.m_1 is a partition of public.m, which a pattern"
    )
    assert "add public.m to --exclude-tables" in problem
    assert overlap_problem(t("m_1"), [t("m_1"), t("m")], sel("public.m_1, public.x*")) is None


@pytest.fixture
def db(monkeypatch: pytest.MonkeyPatch) -> FakeDb:
    fake = FakeDb()
    fake.add("plain")
    fake.add("m", kind="p")
    fake.add("m_1", parent="m")
    for schema, name, persistence in [
        ("sales", "orders", "p"),
        ("sales", "secret", "p"),
        ("sales", "scratch", "u"),
        ("cdc_sink", "offsets", "p"),
        ("pg_catalog", "pg_class", "p"),
    ]:
        fake.relations[t(name, schema)] = rel(name, persistence=persistence, schema=schema)
    fake.install(monkeypatch)
    return fake


def test_the_default_scope_is_every_schema(db: FakeDb, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        catalog = Catalog(None, "cdc")
        assert catalog.tables(TableSelection()) == [t("m"), t("plain"), t("orders", "sales"), t("secret", "sales")]
    assert [r.getMessage() for r in caplog.records] == [
        "table sales.scratch is UNLOGGED: its changes never reach the WAL, so they cannot be streamed. "
        "Fix: ALTER TABLE sales.scratch SET LOGGED; it is left out of the replicated tables"
    ]


def test_patterns_and_exclusions_at_start_and_later(db: FakeDb, caplog: pytest.LogCaptureFixture) -> None:
    catalog = Catalog(None, "cdc")
    with caplog.at_level(logging.WARNING):
        assert catalog.tables(sel("public.plain, sales.*", "sales.secret")) == [t("plain"), t("orders", "sales")]
    assert "sales.scratch is UNLOGGED" in caplog.text, "reached by a pattern: left out, with a warning"
    for name in catalog.tables(sel("public.plain, sales.*", "sales.secret")):
        catalog.known(catalog.read(name))
    assert catalog.lookup("sales", "secret", False) is None, "excluded"
    db.relations[t("later", "sales")] = rel("later", schema="sales")  # CREATE TABLE while streaming
    with caplog.at_level(logging.INFO):
        info = catalog.lookup("sales", "later", False)
    assert info is not None and info.topic == "cdc.sales.later"
    assert "table sales.later is new and in scope" in caplog.text
    assert catalog.lookup("public", "m_1", False) is None, "public.m is not in scope"


def test_a_table_named_exactly_is_still_refused_when_unlogged(db: FakeDb) -> None:
    with pytest.raises(SourceError, match=r"^table sales\.scratch is UNLOGGED"):
        Catalog(None, "cdc").tables(sel("sales.scratch, public.*"))


# --- the sink's subscription -------------------------------------------------------------------------


def test_the_subscription_of_exact_names_and_patterns() -> None:
    assert subscription_for("cdc", sel("public.a, public.b")) == ["cdc.public.a", "cdc.public.b"]
    assert subscription_for("cdc", sel(None)) == [r"^cdc\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$"]
    [topic, regex] = subscription_for("cdc", sel("public.a, sales.*"))
    assert topic == "cdc.public.a"
    assert regex == r"^cdc\.sales\.([A-Za-z0-9_]|-[0-9A-F][0-9A-F])*$"


TOPICS = [
    topic_for("cdc", TableName(s, n))
    for s in ("public", "sales", "sales_eu", "Sales", "s", "é", "pg_x")
    for n in ("a", "orders", "order_1", "secret", "secrets", "secre", "tmp_x", "x_tmp", "Order Items", "é", "-")
]


@pytest.mark.parametrize(
    ("tables", "exclude"),
    [
        ("sales.*", None),
        ("sales.*", "sales.secret"),
        ("public.a, sales.*, public.order_*", "sales.tmp_*"),
        (None, "sales.*, *.*_tmp"),
        ("*.*", 'sales.secret, "Sales".*, "é".*'),
        ("s*.*", "sales_eu.o*, *.é"),
        ('"Sales"*.*, *.o*', "*.orders"),
    ],
)
def test_the_subscription_takes_exactly_the_selected_topics(tables: str | None, exclude: str | None) -> None:
    selection = sel(tables, exclude)
    subscription = subscription_for("cdc", selection)
    expected = sorted(t for t in TOPICS if selection.selects(_table(t)))
    assert in_subscription(subscription, [*TOPICS, "cdc._cdc_source_state", "cdc.sales.secret.dlq"]) == expected
    for entry in subscription:
        assert "(?" not in entry, "librdkafka compiles POSIX expressions: no lookahead"


def _table(topic: str) -> TableName:
    table = table_for("cdc", topic)
    assert table is not None
    return table


def test_excluding_everything_is_refused() -> None:
    with pytest.raises(ConfigError, match="leaves out every table"):
        subscription_for("cdc", sel("sales.*", "sales.*"))


identifiers = st.text(alphabet="ab_.-é*", min_size=1, max_size=5)


@given(st.lists(st.tuples(identifiers, identifiers), min_size=1, max_size=4), st.sampled_from(["", "a*", "*b"]))
def test_the_subscription_agrees_with_the_selection(names: list[tuple[str, str]], glob: str) -> None:
    tables = [TableName(s, n) for s, n in names]
    exclude = f"{tables[0]}" + (f", *.{glob}" if glob else "")
    selection = sel("*.*", exclude)
    regex = re.compile(subscription_for("cdc", selection)[-1])
    for table in [*tables, TableName("x", "ab"), TableName("ab", "x")]:
        assert bool(regex.search(topic_for("cdc", table))) == selection.selects(table), table
