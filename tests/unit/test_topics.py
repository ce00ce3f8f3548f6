"""Topic naming: reversible and injective for any PostgreSQL identifier, valid for Kafka."""

import re

import pytest
from hypothesis import assume, given, reject
from hypothesis import strategies as st

from pg_kafka_cdc.common.errors import ConfigError
from pg_kafka_cdc.common.tables import TableName
from schemas.topics import (
    MAX_TOPIC_LENGTH,
    change_topic_pattern,
    collisions,
    decode_identifier,
    dlq_topic,
    encode_identifier,
    state_topic,
    table_for,
    topic_for,
)

KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
# identifiers PostgreSQL accepts: any characters but NUL, at most 63 bytes (longer ones are truncated)
identifiers = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=10).filter(
    lambda s: len(s.encode()) <= 63
)
tricky = st.sampled_from(
    [
        "public",
        "person",
        "Order Items",
        "a.b",
        "a-b",
        "a_b",
        "a-2Eb",
        "-",
        ".",
        "..",
        '"',
        "'",
        " ",
        "-2D",
        "ß",
        "日本",
    ]
)
any_identifier = st.one_of(tricky, identifiers)
tables = st.builds(TableName, any_identifier, any_identifier)


def topic_or_reject(prefix: str, table: TableName) -> str:
    try:
        return topic_for(prefix, table)
    except ConfigError:
        reject()


@pytest.mark.parametrize(
    ("table", "topic"),
    [
        (TableName("public", "person"), "cdc.public.person"),
        (TableName("public", "Order Items"), "cdc.public.Order-20Items"),
        (TableName("sales", "order_items"), "cdc.sales.order_items"),
        (TableName("a.b", "c-d"), "cdc.a-2Eb.c-2Dd"),
        (TableName("public", "Bücher"), "cdc.public.B-C3-BCcher"),
    ],
)
def test_known_topics(table: TableName, topic: str) -> None:
    assert topic_for("cdc", table) == topic
    assert table_for("cdc", topic) == table


@given(tables)
def test_round_trip(table: TableName) -> None:
    topic = topic_or_reject("cdc", table)
    assert KAFKA_TOPIC.fullmatch(topic)
    assert table_for("cdc", topic) == table


@given(any_identifier)
def test_identifier_round_trip(ident: str) -> None:
    encoded = encode_identifier(ident)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", encoded)
    assert decode_identifier(encoded) == ident


@given(tables, tables)
def test_two_tables_never_share_a_topic(a: TableName, b: TableName) -> None:
    assume(a != b)
    assert topic_or_reject("cdc", a) != topic_or_reject("cdc", b)


@given(any_identifier, any_identifier)
def test_encoding_is_injective(a: str, b: str) -> None:
    assume(a != b)
    assert encode_identifier(a) != encode_identifier(b)


def test_too_long_topic_is_refused() -> None:
    with pytest.raises(ConfigError, match="249"):
        topic_for("cdc", TableName("public", "é" * 63))  # 63 two-byte characters -> 378 characters


@given(st.text(min_size=1, max_size=8, alphabet="abcXYZ019_-."), tables)
def test_prefixes_stay_apart(prefix: str, table: TableName) -> None:
    topic = topic_or_reject(prefix, table)
    assert table_for(prefix, topic) == table
    assert table_for(prefix + "x", topic) is None


@pytest.mark.parametrize(
    "topic",
    [
        "cdc._cdc_source_state",
        "cdc.public.person.dlq",
        "cdc.public",
        "cdc..person",
        "cdc.public.",
        "other.public.person",
        "cdcx.public.person",
        "cdc.public.bad-",
        "cdc.public.bad-ZZ",
        "cdc.public.bad-FF",  # not UTF-8
    ],
)
def test_table_for_rejects_other_topics(topic: str) -> None:
    assert table_for("cdc", topic) is None


@given(tables)
def test_change_topic_pattern(table: TableName) -> None:
    pattern = re.compile(change_topic_pattern("cdc"))
    topic = topic_or_reject("cdc", table)
    assert pattern.search(topic)
    assert not pattern.search(dlq_topic(topic))
    assert not pattern.search(state_topic("cdc"))
    assert not pattern.search(topic_or_reject("cdc2", table))
    assert not pattern.search("x" + topic)


@pytest.mark.parametrize("prefix", ["cdc", "my.cdc", "cdc-prod", "a_b"])
def test_change_topic_pattern_with_any_prefix(prefix: str) -> None:
    pattern = change_topic_pattern(prefix)
    assert pattern.startswith("^")  # librdkafka treats only ^-prefixed subscriptions as regexes
    compiled = re.compile(pattern)
    assert compiled.search(topic_for(prefix, TableName("public", "Order Items")))
    assert not compiled.search(state_topic(prefix))
    assert not compiled.search(dlq_topic(topic_for(prefix, TableName("public", "person"))))
    if "." in prefix:
        # a dot in the prefix is literal
        assert not compiled.search(prefix.replace(".", "x") + ".public.person")


@pytest.mark.parametrize(
    "topic",
    ["cdc.public.bad-2", "cdc.public.a-2d", "cdc.public.-41", "cdc.-70ublic.person"],
)
def test_table_for_rejects_non_canonical_topics(topic: str) -> None:
    assert table_for("cdc", topic) is None


def test_state_and_dlq_names() -> None:
    assert state_topic("cdc") == "cdc._cdc_source_state"
    assert dlq_topic("cdc.public.person") == "cdc.public.person.dlq"
    assert table_for("cdc", state_topic("cdc")) is None


def test_colliding_tables_are_detected() -> None:
    # Kafka identifies '.' and '_' in topic names, so these two tables cannot both have a topic: the
    # source names both at start-up instead of failing on the second topic's creation.
    a = topic_for("cdc", TableName("sales_eu", "orders"))
    b = topic_for("cdc", TableName("sales", "eu_orders"))
    assert collisions([a, b, "cdc.public.person"]) == [tuple(sorted((a, b)))]
    assert collisions(["cdc.public.person", "cdc.public.orders", "cdc.public.person"]) == []


def test_dlq_topic_of_the_longest_change_topic_is_valid() -> None:
    # valid identifiers (at most 63 bytes each) whose topic would be exactly Kafka's limit: refused,
    # so that its dead-letter topic fits too; four characters shorter is accepted
    table = TableName("é" * 20, "é" * 20 + "abcd")
    assert all(len(part.encode()) <= 63 for part in (table.schema, table.name))
    with pytest.raises(ConfigError):
        topic_for("cdc", table)
    topic = topic_for("cdc", TableName("é" * 20, "é" * 20))
    assert len(dlq_topic(topic)) <= MAX_TOPIC_LENGTH
    assert KAFKA_TOPIC.fullmatch(dlq_topic(topic))
