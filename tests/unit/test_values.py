"""The value contract of events and keys: integers and booleans as JSON, the rest as text."""

import orjson
import pytest

from schemas.values import json_row, typed_columns

TYPES = {"id": "bigint", "s": "smallint", "i": "integer", "o": "oid", "ok": "boolean", "n": "numeric", "t": "text"}


def test_typed_columns() -> None:
    assert typed_columns(TYPES) == (frozenset({"id", "s", "i", "o"}), frozenset({"ok"}))
    assert typed_columns({"a": "integer[]", "b": "boolean[]", "c": "numeric(12,2)"}) == (frozenset(), frozenset())


def test_json_row_types_integers_and_booleans_only() -> None:
    integers, booleans = typed_columns(TYPES)
    texts = ("9223372036854775807", "-2", "3", "4294967295", "false", "1.50", "true")
    assert json_row(TYPES, texts, integers, booleans) == {
        "id": 9223372036854775807,
        "s": -2,
        "i": 3,
        "o": 4294967295,
        "ok": False,
        "n": "1.50",
        "t": "true",
    }


def test_json_row_keeps_null() -> None:
    integers, booleans = typed_columns(TYPES)
    row = json_row(("id", "ok", "t"), (None, None, None), integers, booleans)
    assert row == {"id": None, "ok": None, "t": None}


def test_json_row_serializes_as_the_source_key() -> None:
    integers, booleans = typed_columns({"id": "integer", "ok": "boolean", "c": "character(3)"})
    assert orjson.dumps(json_row(("id", "ok", "c"), ("7", "true", "a  "), integers, booleans)) == (
        b'{"id":7,"ok":true,"c":"a  "}'
    )


def test_json_row_needs_one_text_per_name() -> None:
    with pytest.raises(ValueError):
        json_row(("id", "t"), ("1",), frozenset({"id"}), frozenset())
