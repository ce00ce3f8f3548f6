"""The pure parts of user-defined types on the target: the order types are created in, the statements
that create them, where added enum labels go, and reading the enum error PostgreSQL raises."""

import pytest
from psycopg2 import sql

from pg_kafka_cdc.common.errors import SinkError
from pg_kafka_cdc.common.tables import TableName
from sink_connector.user_types import (
    Attribute,
    Check,
    LabelAddition,
    LabelOrderError,
    UserType,
    add_value_statement,
    create_statements,
    creation_order,
    default_multirange_name,
    is_missing_enum_value,
    label_additions,
    missing_enum_value_line,
)


def render(composable: sql.Composable) -> str:
    """The statement as text, without a connection (identifiers always quoted, strings as literals)."""
    if isinstance(composable, sql.Composed):
        return "".join(render(part) for part in composable.seq)
    if isinstance(composable, sql.SQL):
        return composable.string
    if isinstance(composable, sql.Identifier):
        return ".".join('"' + s.replace('"', '""') + '"' for s in composable.strings)
    if isinstance(composable, sql.Literal):
        value = composable.wrapped
        assert isinstance(value, str)
        return "'" + value.replace("'", "''") + "'"
    raise TypeError(composable)


def statements(user_type: UserType) -> list[str]:
    return [render(s) for s in create_statements(user_type)]


# --- creation order --------------------------------------------------------------------------------


def names(types: list[UserType]) -> list[str]:
    return [t.name for t in types]


def test_dependencies_come_first_whatever_order_they_were_found_in() -> None:
    composite = UserType(5, "public", "address", "c", depends=(4, 3))
    outer = UserType(4, "public", "small_posint", "d", depends=(2,))
    inner = UserType(2, "public", "posint", "d")
    mood = UserType(1, "public", "mood", "e")
    good = UserType(3, "public", "good_mood", "d", depends=(1,))
    ordered = creation_order({5: composite, 4: outer, 2: inner, 3: good, 1: mood})
    assert names(ordered) == ["posint", "small_posint", "mood", "good_mood", "address"]


def test_dependencies_outside_the_mapping_exist_already() -> None:
    domain = UserType(7, "public", "d", "d", depends=(99, 98))
    assert creation_order({7: domain}) == [domain]


def test_a_type_needed_twice_is_created_once() -> None:
    mood = UserType(1, "public", "mood", "e")
    a = UserType(2, "public", "a", "d", depends=(1,))
    b = UserType(3, "public", "b", "c", depends=(1, 2))
    assert names(creation_order({3: b, 2: a, 1: mood})) == ["mood", "a", "b"]


def test_independent_types_keep_their_order() -> None:
    types = {oid: UserType(oid, "s", f"t{oid}", "e") for oid in (30, 10, 20)}
    assert names(creation_order(types)) == ["t30", "t10", "t20"]


def test_a_cycle_does_not_loop() -> None:
    a = UserType(1, "s", "a", "c", depends=(2,))
    b = UserType(2, "s", "b", "c", depends=(1,))
    assert sorted(names(creation_order({1: a, 2: b}))) == ["a", "b"]


# --- statements ------------------------------------------------------------------------------------


def test_enum_keeps_the_labels_in_order_and_quotes_them() -> None:
    mood = UserType(1, "Odd Schema", "Mood", "e", labels=("sad", "it's", 'a "b"'))
    assert statements(mood) == [
        """CREATE TYPE "Odd Schema"."Mood" AS ENUM ('sad', 'it''s', 'a "b"')""",
    ]


def test_an_enum_without_labels() -> None:
    assert statements(UserType(1, "public", "empty", "e")) == ['CREATE TYPE "public"."empty" AS ENUM ()']


def test_domain_with_everything() -> None:
    domain = UserType(
        1,
        "public",
        "code",
        "d",
        base="character varying(8)",
        not_null=True,
        default="'A'::character varying",
        collation=("pg_catalog", "C"),
        checks=(
            Check("code_check", "CHECK (((VALUE)::text ~ '^[A-Z]'::text))", True),
            Check("not_x", "CHECK (((VALUE)::text <> 'X'::text)) NOT VALID", False),
            Check("short", "CHECK ((length((VALUE)::text) < 5))", True),
        ),
    )
    assert statements(domain) == [
        'CREATE DOMAIN "public"."code" AS character varying(8) COLLATE "pg_catalog"."C"'
        " DEFAULT 'A'::character varying NOT NULL"
        """ CONSTRAINT "code_check" CHECK (((VALUE)::text ~ '^[A-Z]'::text))"""
        ' CONSTRAINT "short" CHECK ((length((VALUE)::text) < 5))',
        """ALTER DOMAIN "public"."code" ADD CONSTRAINT "not_x" CHECK (((VALUE)::text <> 'X'::text)) NOT VALID""",
    ]


def test_plain_domain_over_a_domain() -> None:
    domain = UserType(1, "public", "small", "d", base="public.posint")
    assert statements(domain) == ['CREATE DOMAIN "public"."small" AS public.posint']


def test_composite_with_attributes_in_order() -> None:
    composite = UserType(
        1,
        "public",
        "address",
        "c",
        attributes=(
            Attribute("street", "text", ("pg_catalog", "C")),
            Attribute("num", "public.small_posint", None),
            Attribute("Tags", "kinds.mood[]", None),
        ),
    )
    assert statements(composite) == [
        'CREATE TYPE "public"."address" AS ("street" text COLLATE "pg_catalog"."C", "num" public.small_posint, '
        '"Tags" kinds.mood[])'
    ]


def test_composite_without_attributes() -> None:
    assert statements(UserType(1, "public", "nothing", "c")) == ['CREATE TYPE "public"."nothing" AS ()']


def test_range_with_defaults_only_names_its_subtype() -> None:
    assert statements(UserType(1, "public", "floatrange", "r", base="double precision")) == [
        'CREATE TYPE "public"."floatrange" AS RANGE (SUBTYPE = double precision)'
    ]


def test_range_with_every_option() -> None:
    user_type = UserType(
        1,
        "public",
        "textrange",
        "r",
        base="text",
        opclass=("pg_catalog", "text_pattern_ops"),
        collation=("pg_catalog", "C"),
        subtype_diff=("public", "text_diff"),
        multirange=("public", "textranges"),
    )
    assert statements(user_type) == [
        'CREATE TYPE "public"."textrange" AS RANGE (SUBTYPE = text, SUBTYPE_OPCLASS = "pg_catalog"."text_pattern_ops", '
        'COLLATION = "pg_catalog"."C", SUBTYPE_DIFF = "public"."text_diff", '
        'MULTIRANGE_TYPE_NAME = "public"."textranges")'
    ]


def test_other_kinds_have_no_statement() -> None:
    with pytest.raises(ValueError, match="kind 'b'"):
        create_statements(UserType(1, "public", "geometry", "b"))


def test_descriptions() -> None:
    assert UserType(1, "public", "mood", "e").description == "enum public.mood"
    assert UserType(1, "Odd", "my type", "d").description == 'domain "Odd"."my type"'
    assert UserType(1, "s", "c", "c").description == "composite s.c"
    assert UserType(1, "s", "r", "r").description == "range s.r"


@pytest.mark.parametrize(
    ("range_name", "multirange"),
    [
        ("floatrange", "floatmultirange"),
        ("range_of_x", "multirange_of_x"),
        ("rangerange", "multirangerange"),
        ("period", "period_multirange"),
        ("p" * 63, "p" * 52 + "_multirange"),
        ("x" * 60 + "range", "x" * 60 + "mul"),
    ],
)
def test_default_multirange_name(range_name: str, multirange: str) -> None:
    assert default_multirange_name(range_name) == multirange


# --- enum labels -----------------------------------------------------------------------------------


def test_nothing_to_add_when_the_labels_are_equal() -> None:
    assert label_additions(["a", "b"], ["a", "b"]) == []


def test_labels_go_after_their_predecessor_or_before_the_first_shared_one() -> None:
    source = ["awful", "sad", "meh", "fine", "ok", "happy", "ecstatic"]
    assert label_additions(source, ["sad", "ok", "happy"]) == [
        LabelAddition("awful", "BEFORE", "sad"),
        LabelAddition("meh", "AFTER", "sad"),
        LabelAddition("fine", "AFTER", "meh"),
        LabelAddition("ecstatic", "AFTER", "happy"),
    ]


def test_applying_the_additions_gives_the_sources_order() -> None:
    source = ["z", "y", "a", "m", "b", "c", "q"]
    target = ["a", "b", "c"]
    result = list(target)
    for addition in label_additions(source, target):
        if addition.position is None:
            result.append(addition.label)
        else:
            assert addition.neighbour is not None
            at = result.index(addition.neighbour)
            result.insert(at + (addition.position == "AFTER"), addition.label)
    assert result == source


def test_an_empty_target_enum_gets_every_label_in_order() -> None:
    assert label_additions(["a", "b"], []) == [LabelAddition("a", None, None), LabelAddition("b", "AFTER", "a")]


def test_labels_only_the_target_has_stay() -> None:
    assert label_additions(["a", "b", "c"], ["a", "local", "c"]) == [LabelAddition("b", "AFTER", "a")]


def test_shared_labels_in_another_order_cannot_be_fixed() -> None:
    with pytest.raises(LabelOrderError, match="the target orders 'ok', 'sad'; the source 'sad', 'ok'"):
        label_additions(["sad", "ok", "happy"], ["ok", "sad"])


def test_add_value_statements() -> None:
    name = ("kinds", "mood")
    assert render(add_value_statement(name, LabelAddition("it's", "BEFORE", "ok"))) == (
        """ALTER TYPE "kinds"."mood" ADD VALUE IF NOT EXISTS 'it''s' BEFORE 'ok'"""
    )
    assert render(add_value_statement(name, LabelAddition("z", "AFTER", "y"))) == (
        """ALTER TYPE "kinds"."mood" ADD VALUE IF NOT EXISTS 'z' AFTER 'y'"""
    )
    assert render(add_value_statement(name, LabelAddition("z", None, None))) == (
        """ALTER TYPE "kinds"."mood" ADD VALUE IF NOT EXISTS 'z'"""
    )


class Diag:
    def __init__(self, message: str) -> None:
        self.message_primary = message


class FakePgError(Exception):
    """What psycopg2 raises for a server error: SQLSTATE in `pgcode`, the message in `diag`."""

    def __init__(self, pgcode: str, message: str) -> None:
        super().__init__(f"ERROR:  {message}\nLINE 1: ...")
        self.pgcode = pgcode
        self.diag = Diag(message)


ENUM_ERROR = FakePgError("22P02", 'invalid input value for enum kinds.mood: "it\'s "new""')


def test_the_enum_error_is_recognized() -> None:
    assert is_missing_enum_value(ENUM_ERROR)
    assert not is_missing_enum_value(FakePgError("22P02", 'invalid input syntax for type integer: "x"'))
    assert not is_missing_enum_value(FakePgError("23505", 'invalid input value for enum kinds.mood: "x"'))
    assert not is_missing_enum_value(ValueError("invalid input value for enum kinds.mood: x"))


def test_the_enum_error_is_recognized_as_a_cause() -> None:
    try:
        try:
            raise ENUM_ERROR
        except FakePgError as exc:
            raise SinkError("batch failed") from exc
    except SinkError as wrapped:
        assert is_missing_enum_value(wrapped)


def test_the_enum_error_without_diagnostics_is_read_from_its_text() -> None:
    exc = FakePgError("22P02", 'invalid input value for enum public.mood: "x"')
    del exc.diag
    assert is_missing_enum_value(exc)
    assert "ALTER TYPE public.mood ADD VALUE 'x'" in missing_enum_value_line(TableName("public", "t"), exc)


def test_the_line_names_the_table_the_type_the_value_and_the_fix() -> None:
    line = missing_enum_value_line(TableName("Sales", "orders"), ENUM_ERROR)
    assert "\n" not in line
    assert line.startswith('cannot apply a change to "Sales".orders: enum type kinds.mood on the target has no')
    assert """ALTER TYPE kinds.mood ADD VALUE 'it''s "new"' on the target""" in line
    assert line.endswith("then restart the sink")
