"""Pure logic shared by the programs: table lists, DSN masking, settings, backoff, mix and pacing."""

import random
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pg_kafka_cdc.common.dsn import describe, mask
from pg_kafka_cdc.common.errors import ConfigError
from pg_kafka_cdc.common.pg import is_connection_loss
from pg_kafka_cdc.common.retry import Backoff
from pg_kafka_cdc.common.service import samples
from pg_kafka_cdc.common.settings import (
    KAFKA_CLIENT_LOG,
    Settings,
    build_settings,
    kafka_from_environment,
    read_properties,
)
from pg_kafka_cdc.common.tables import TableName, parse_tables, quote_if_needed
from writer.pacing import KINDS, MixSchedule, Pacer, parse_mix

# --- table lists ----------------------------------------------------------------------------------


def test_parse_tables_plain_names() -> None:
    assert parse_tables("public.person, sales.orders") == (
        TableName("public", "person"),
        TableName("sales", "orders"),
    )


@pytest.mark.parametrize("empty", [None, "", "   "])
def test_parse_tables_empty_means_all(empty: str | None) -> None:
    assert parse_tables(empty) == ()


def test_parse_tables_bare_name_is_in_public() -> None:
    assert parse_tables("person") == (TableName("public", "person"),)


def test_parse_tables_folds_unquoted_names_to_lower_case() -> None:
    assert parse_tables("Sales.Orders") == (TableName("sales", "orders"),)


def test_parse_tables_keeps_quoted_names_exact() -> None:
    assert parse_tables('"Sales"."Order Items"') == (TableName("Sales", "Order Items"),)


def test_parse_tables_quoted_commas_dots_and_quotes() -> None:
    assert parse_tables('"a,b"."c.d", public."say ""hi"""') == (
        TableName("a,b", "c.d"),
        TableName("public", 'say "hi"'),
    )


def test_parse_tables_removes_duplicates_keeping_order() -> None:
    assert parse_tables("b, a, public.b, A") == (TableName("public", "b"), TableName("public", "a"))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('public."person', "unterminated"),
        ('"unterminated', "unterminated"),
        ("a.b.c", "schema.table"),
        ("a,,b", "empty name"),
        ("public.", "empty name"),
        ('"a"x.b', "after a quoted identifier"),
    ],
)
def test_parse_tables_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_tables(text)


@pytest.mark.parametrize(
    ("ident", "printed"),
    [
        ("person", "person"),
        ("_x1$", "_x1$"),
        ("Person", '"Person"'),
        ("order items", '"order items"'),
        ("1st", '"1st"'),
        ('say "hi"', '"say ""hi"""'),
        ("", '""'),
        ("café", '"café"'),
    ],
)
def test_quote_if_needed(ident: str, printed: str) -> None:
    assert quote_if_needed(ident) == printed


identifiers = st.text(min_size=1, max_size=20)


@given(schema=identifiers, name=identifiers)
def test_quoted_names_parse_back(schema: str, name: str) -> None:
    table = TableName(schema, name)
    assert parse_tables(f"{quote_if_needed(schema)}.{quote_if_needed(name)}") == (table,)
    assert parse_tables(str(table)) == (table,)


@given(st.lists(st.tuples(identifiers, identifiers), min_size=1, max_size=5, unique=True))
def test_table_lists_parse_back(pairs: list[tuple[str, str]]) -> None:
    tables = tuple(TableName(s, n) for s, n in pairs)
    assert parse_tables(" , ".join(map(str, tables))) == tables


# --- connection strings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "secret"),
    [
        ("postgresql://app:s3cret@db.example:5432/shop", "s3cret"),
        ("postgres://app:p%40ss%3Aw%2Frd@db/shop", "p%40ss%3Aw%2Frd"),
        ("postgresql://app:colon:inside@db/shop", "colon:inside"),
        ("postgresql://db/shop?user=app&password=qu%26ery", "qu%26ery"),
        ("host=db user=app password=plain dbname=shop", "plain"),
        ("host=db password='with space' user=app", "with space"),
        (r"host=db password='it\'s' user=app", "it\\'s"),
        ("host=db password = spaced user=app", "spaced"),
    ],
)
def test_mask_hides_passwords(dsn: str, secret: str) -> None:
    masked = mask(dsn)
    assert secret not in masked, masked
    assert "***" in masked
    assert "db" in masked, "the host should still be visible"


def test_mask_leaves_other_text_alone() -> None:
    text = "cannot connect to app@db:5432/shop: connection refused"
    assert mask(text) == text


def test_mask_inside_a_longer_message() -> None:
    text = "bad dsn postgresql://u:hunter2@h/db and password=hunter3 in config"
    masked = mask(text)
    assert "hunter2" not in masked
    assert "hunter3" not in masked
    assert masked.startswith("bad dsn postgresql://u:***@h/db")


@pytest.mark.parametrize(
    ("dsn", "described"),
    [
        ("postgresql://app:s3cret@db.example:6543/shop", "app@db.example:6543/shop"),
        ("postgresql://app:p%40ss@db/shop", "app@db:5432/shop"),
        ("host=db port=5433 user=app password='a b' dbname=shop", "app@db:5433/shop"),
        ("host=db user=app", "app@db:5432/app"),
    ],
)
def test_describe(dsn: str, described: str) -> None:
    assert describe(dsn) == described


def test_describe_a_malformed_dsn_is_masked() -> None:
    described = describe("host=db password=secret 'unbalanced")
    assert "secret" not in described


# --- settings -------------------------------------------------------------------------------------


def test_kafka_from_environment() -> None:
    environ = {
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "PLAIN",
        "KAFKA_SASL_USERNAME": "app",
        "KAFKA_SASL_PASSWORD": "pw",
        "KAFKA_SSL_CA_LOCATION": "/etc/ca.pem",
        "KAFKA_CLIENT_ID": "cdc",
        "KAFKA_BOOTSTRAP_SERVERS": "ignored:9092",
        "KAFKA_SASL_OAUTHBEARER_CONFIG": "",
        "PATH": "/usr/bin",
    }
    assert kafka_from_environment(environ) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "app",
        "sasl.password": "pw",
        "ssl.ca.location": "/etc/ca.pem",
        "client.id": "cdc",
    }


def test_read_properties(tmp_path: Path) -> None:
    path = tmp_path / "kafka.properties"
    path.write_text(
        "# comment\n! also a comment\n\nsecurity.protocol = SSL\nsasl.jaas.config=a=b c=d\n  ssl.ca.location=/x\n"
    )
    assert read_properties(str(path)) == {
        "security.protocol": "SSL",
        "sasl.jaas.config": "a=b c=d",
        "ssl.ca.location": "/x",
    }


def test_read_properties_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        read_properties(str(tmp_path / "missing.properties"))
    bad = tmp_path / "bad.properties"
    bad.write_text("ok=1\njust a line\n")
    with pytest.raises(ConfigError, match=r"bad.properties:2: expected key=value"):
        read_properties(str(bad))


def settings_with(
    *,
    source_dsn: str = "postgresql://u:pw@s/db",
    target_dsn: str = "host=t dbname=db",
    bootstrap_servers: str = " k:9092 ",
    topic_prefix: str = "cdc",
    tables: str | None = "public.person",
    kafka_config: str | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    return build_settings(
        source_dsn, target_dsn, bootstrap_servers, topic_prefix, tables, kafka_config, environ or {}
    )


def test_build_settings(tmp_path: Path) -> None:
    props = tmp_path / "k.properties"
    props.write_text("bootstrap.servers=elsewhere:1\nssl.key.password=kp\n")
    settings = settings_with(
        kafka_config=str(props), environ={"KAFKA_SASL_PASSWORD": "sp", "KAFKA_SASL_USERNAME": "u"}
    )
    assert settings.bootstrap_servers == "k:9092"
    assert settings.tables == (TableName("public", "person"),)
    config = settings.kafka_config(**{"group.id": "g"})
    assert config.pop("logger") is KAFKA_CLIENT_LOG  # librdkafka's lines go through logging
    assert config == {
        "bootstrap.servers": "k:9092",
        "sasl.password": "sp",
        "sasl.username": "u",
        "ssl.key.password": "kp",
        "group.id": "g",
    }
    shown = str(settings.describe()) + repr(settings)
    for secret in ("pw", "sp", "kp"):
        assert f"'{secret}'" not in shown and f":{secret}@" not in shown, shown


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"source_dsn": "host=db password=secret 'oops"}, "--source-dsn / SOURCE_DSN"),
        ({"target_dsn": "nonsense"}, "--target-dsn / TARGET_DSN"),
        ({"bootstrap_servers": "  "}, "KAFKA_BOOTSTRAP_SERVERS is empty"),
        ({"topic_prefix": "bad prefix"}, "--topic-prefix / TOPIC_PREFIX"),
        ({"topic_prefix": ""}, "--topic-prefix / TOPIC_PREFIX"),
        ({"tables": "a.b.c"}, "schema.table"),
    ],
)
def test_build_settings_errors(change: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as caught:
        settings_with(**change)
    assert "secret" not in str(caught.value)


def test_build_settings_missing_kafka_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the Kafka properties file"):
        settings_with(kafka_config=str(tmp_path / "nope"))


# --- backoff --------------------------------------------------------------------------------------


def test_backoff_delays_grow_until_the_cap() -> None:
    backoff = Backoff(base=0.5, cap=15.0, rng=random.Random(1))
    delays = [backoff.next_delay(float(i)) for i in range(12)]
    assert all(d is not None for d in delays)
    values = [d for d in delays if d is not None]
    # Below the cap each jittered range starts where the previous one ends: the delays never shrink.
    assert values[:5] == sorted(values[:5]), f"delays should grow: {values}"
    for n, delay in enumerate(values):
        ceiling = min(15.0, 0.5 * 2**n)
        assert ceiling / 2 <= delay <= ceiling, (n, delay)
    assert max(values) <= 15.0
    assert values[-1] >= 7.5


def test_backoff_deadline_gives_none_and_caps_the_last_delay() -> None:
    backoff = Backoff(base=4.0, cap=60.0, deadline=10.0, rng=random.Random(2))
    assert backoff.next_delay(100.0) is not None
    last = backoff.next_delay(108.0)
    assert last is not None and last <= 2.0, "no delay may run past the deadline"
    assert backoff.next_delay(110.0) is None
    assert backoff.next_delay(500.0) is None


def test_backoff_reset_starts_over() -> None:
    backoff = Backoff(base=1.0, cap=100.0, deadline=5.0, rng=random.Random(3))
    for t in range(5):
        backoff.next_delay(float(t))
    assert backoff.next_delay(6.0) is None
    backoff.reset()
    delay = backoff.next_delay(7.0)
    assert delay is not None and delay <= 1.0


@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=1, max_value=60))
def test_backoff_never_exceeds_the_cap(seed: int, attempts: int) -> None:
    backoff = Backoff(base=0.1, cap=3.0, rng=random.Random(seed))
    for t in range(attempts):
        delay = backoff.next_delay(float(t))
        assert delay is not None and 0 < delay <= 3.0


# --- writer mix and pacing ------------------------------------------------------------------------


def test_parse_mix() -> None:
    assert parse_mix("70,20,10") == (70, 20, 10)
    assert parse_mix(" 1, 0 ,0") == (1, 0, 0)


@pytest.mark.parametrize("text", ["1,2", "1,2,3,4", "a,b,c", "1.5,2,3", "-1,2,3", "0,0,0", ""])
def test_parse_mix_errors_name_the_option(text: str) -> None:
    with pytest.raises(ConfigError, match="--mix"):
        parse_mix(text)


def test_mix_schedule_1000_operations() -> None:
    schedule = MixSchedule((70, 20, 10))
    assert Counter(schedule.next() for _ in range(1000)) == {"insert": 700, "update": 200, "delete": 100}


@given(st.tuples(*[st.integers(min_value=0, max_value=12)] * 3).filter(lambda w: sum(w) > 0))
def test_mix_schedule_every_window_is_exact(weights: tuple[int, int, int]) -> None:
    schedule = MixSchedule(weights)
    total = sum(weights)
    kinds = [schedule.next() for _ in range(3 * total)]
    expected = {kind: w for kind, w in zip(KINDS, weights, strict=True) if w}
    for start in range(len(kinds) - total + 1):
        window = Counter(kinds[start : start + total])
        assert window == expected, (weights, start, window)


def test_pacer_unlimited_never_waits() -> None:
    pacer = Pacer(rate=0, batch=10)
    assert [pacer.delay(0.0) for _ in range(5)] == [0.0] * 5


def simulate(pacer: Pacer, seconds: float) -> int:
    """Transactions started in `seconds` by a caller that sleeps exactly as told."""
    now, started = 0.0, 0
    while True:
        now += pacer.delay(now)
        if now >= seconds:
            return started
        started += 1


@given(st.floats(min_value=1, max_value=500), st.integers(min_value=1, max_value=20))
def test_pacer_keeps_the_rate(rate: float, batch: int) -> None:
    operations = simulate(Pacer(rate, batch), seconds=10.0) * batch
    # + 1e-9: next_at accumulates batch / rate in floating point, so a start meant for t = 10.0 can land a hair
    # before it (rate=25.999999999999943, batch=1 gave 261 operations for 259.99999999999943)
    assert abs(operations - rate * 10) <= batch + 1e-9, (rate, batch, operations)


def test_pacer_spaces_batches() -> None:
    pacer = Pacer(rate=100, batch=10)
    assert pacer.delay(0.0) == 0.0
    assert pacer.delay(0.0) == pytest.approx(0.1)
    assert pacer.delay(0.05) == pytest.approx(0.15)


def test_pacer_catches_up_at_most_max_burst() -> None:
    pacer = Pacer(rate=10, batch=1, max_burst=1.0)
    pacer.delay(0.0)
    # Half a second late: the missed operations go out at once.
    assert [pacer.delay(0.6) for _ in range(5)] == [0.0] * 5
    # A five-second stall is not made up for: the schedule restarts from now.
    pacer.delay(10.0)
    assert pacer.delay(10.0) == pytest.approx(0.1)


def test_libpq_errors_without_sqlstate_are_lost_connections() -> None:
    assert is_connection_loss(psycopg2.DatabaseError("no COPY in progress"))
    assert is_connection_loss(
        psycopg2.DatabaseError("error with status PGRES_COPY_BOTH and no message from the libpq")
    )
    assert is_connection_loss(psycopg2.OperationalError("server closed the connection unexpectedly"))
    assert is_connection_loss(psycopg2.InterfaceError("connection already closed"))
    assert not is_connection_loss(psycopg2.ProgrammingError("syntax error"))
    assert not is_connection_loss(psycopg2.DataError("invalid input syntax"))


def test_metric_samples_from_counters() -> None:
    assert samples(Counter({"a": 2, "b": 1})) == [(("a",), 2), (("b",), 1)]
    assert samples(Counter({("t", "c"): 3})) == [(("t", "c"), 3)]
    assert samples(Counter()) == []
