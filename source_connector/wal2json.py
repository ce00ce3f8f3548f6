"""Decoding wal2json format-version 2 messages: bytes in, plain dicts out, no digit lost.

wal2json prints numeric, real and double precision values as bare JSON numbers, which any JSON
parser turns into floats (12345678901234567890.0123456789 -> 1.2345678901234567e+19). Before
parsing, the bare numbers of those types are quoted, so they arrive as the exact text PostgreSQL
printed. Integers stay JSON integers (exact to 64 bits). bytea arrives as hex without its `\\x`
prefix, which is put back so the text reads back as the same bytea.

With wal2json 2.6 and `numeric-data-types-as-string`, every number arrives quoted (NaN and Infinity
included); the integer types are then unquoted so events look the same whichever build runs.
"""

import datetime as dt
import re
from typing import Any

import orjson

from pg_kafka_cdc.common.errors import SourceError
from schemas.values import INTEGER_TYPES

# `"type":"numeric(12,2)","value":123.45` -> `"type":"numeric(12,2)","value":"123.45"`. Inside a JSON
# string every '"' is escaped, so this can only match real keys, never the content of a value.
_BARE_DECIMAL = re.compile(
    rb'("type":"(?:numeric(?:\(\d+,-?\d+\))?|real|double precision)","value":)(-?[0-9][0-9.eE+-]*)'
)
_INTEGER_TYPE = "|".join(sorted(INTEGER_TYPES)).encode()
_QUOTED_INTEGER = re.compile(rb'("type":"(?:' + _INTEGER_TYPE + rb')","value":)"(-?[0-9]+)"')
_BYTEA_VALUE = b'"type":"bytea","value":"'
_BYTEA_FIXED = b'"type":"bytea","value":"\\\\x'

WAL2JSON_OPTIONS = {
    "format-version": "2",
    "include-xids": "1",
    "include-lsn": "1",
    "include-timestamp": "1",
    "include-types": "1",
    "include-typmod": "1",
    "include-pk": "1",
    "include-transaction": "1",
    # `"position": attnum` after each value of I and U `columns` (wal2json 2.5 prints name, type,
    # value, position; identity entries carry none): how the source tells a shape change (shapes.py).
    "include-column-positions": "1",
}
NUMBERS_AS_STRING_OPTION = "numeric-data-types-as-string"

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class Decoder:
    """Turns the payload of one wal2json message into a dict."""

    def __init__(self, numbers_as_strings: bool = False) -> None:
        self.numbers_as_strings = numbers_as_strings

    def decode(self, payload: bytes) -> dict[str, Any]:
        if b'"bytea"' in payload:
            payload = payload.replace(_BYTEA_VALUE, _BYTEA_FIXED)
        payload = unquote_integers(payload) if self.numbers_as_strings else quote_decimals(payload)
        try:
            doc: dict[str, Any] = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise SourceError(unreadable_line(payload, exc)) from None
        return doc


def quote_decimals(payload: bytes) -> bytes:
    """The bare numbers of numeric, real and double precision values in quotes, so that they are
    read as the text PostgreSQL printed, not as floats. (Split and joined: a template given to
    re.sub is expanded by Python code for every match, at twice the cost.)"""
    parts = _BARE_DECIMAL.split(payload)
    if len(parts) == 1:
        return payload
    parts[2::3] = [b'"' + number + b'"' for number in parts[2::3]]
    return b"".join(parts)


def unquote_integers(payload: bytes) -> bytes:
    """With numeric-data-types-as-string: the values of integer columns out of their quotes."""
    parts = _QUOTED_INTEGER.split(payload)  # the quotes are outside the groups: joined, they are gone
    return payload if len(parts) == 1 else b"".join(parts)


_TABLE = re.compile(rb'"schema":"((?:[^"\\]|\\.)*)","table":"((?:[^"\\]|\\.)*)"')


def unreadable_line(payload: bytes, exc: Exception) -> str:
    """Why a wal2json message cannot be read, with the table it is about and the fix."""
    found = _TABLE.search(payload)
    table = (
        ""
        if found is None
        else f" of table {found[1].decode(errors='replace')}.{found[2].decode(errors='replace')}"
    )
    return (
        f"wal2json printed a change{table} that is not valid JSON ({exc}): wal2json does not escape the "
        'double quotes of a type name it prints schema-qualified and quoted ("Odd Schema"."Mood", for '
        "example), so such columns cannot be streamed. Fix: give the type a name and schema that need no "
        "quotes on the source (ALTER TYPE ... RENAME TO ..., ALTER TYPE ... SET SCHEMA ...), then restart "
        "cdc-source; the change is read again"
    )


def timestamp_to_us(text: str) -> int:
    """wal2json's commit timestamp (`2026-11-25 14:43:17.81871+00`) in microseconds since the epoch."""
    delta = dt.datetime.fromisoformat(text) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def escape_table_pattern(ident: str) -> str:
    """An identifier for wal2json's add-tables option, where ',', '.', '*', '\\' and spaces are syntax."""
    return "".join("\\" + c if c.isascii() and not (c.isalnum() or c == "_") else c for c in ident)
