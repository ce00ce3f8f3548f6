"""A wal2json row change of the shape its table is known to have, read without parsing it. Pure.

Most changes carry exactly the columns the table had last time: same names, types and attnums, in
the same order, every value of a form this module knows. Such a message is matched by one regular
expression built from the table's shape, and its values' JSON text is put into the event as it is:
no dict per column is made, no value is parsed and printed again. The result is the same event
`EventBuilder.row` builds from the parsed message (tests/unit/test_row_match.py compares the two);
anything else (another shape, unchanged TOAST columns left out, a null in a numeric column, names
that need escapes, a partition's change) does not match and takes that general path.

How each value is matched and written (wal2json 2.5; with numeric-data-types-as-string, 2.6):
- integer types: a bare integer or null, kept (2.6: a quoted integer, unquoted; null: no match);
- numeric, real, double precision: a bare number, quoted so no digit is lost (2.6: a quoted
  string, kept); null, which may stand for NaN (see wal2json.py), does not match;
- boolean: true, false or null, kept;
- bytea: a quoted hex string, given back its `\\x` prefix; null does not match;
- every other type: a JSON string or null, kept.
"""

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from schemas.values import BOOLEAN_TYPE, INTEGER_TYPES
from source_connector.table_info import TableInfo, is_decimal

_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
# {"action":"U","xid":1,"timestamp":"...","lsn":"1/4546","schema":"public","table":"person",
HEAD = re.compile(
    rb'\{"action":"([IUD])","xid":[0-9]+,"timestamp":"[^"\\]*","lsn":"([0-9A-F]+)/([0-9A-F]+)",'
    rb'"schema":"([^"\\]*)","table":"([^"\\]*)",'
)
# What may follow the columns and identity of a change: wal2json's list of the key columns, or the end.
_TAIL = re.compile(rb'(?:,"pk":\[[^\]]*\])?\}\Z')


def _value_form(wal2json_type: str, numbers_as_strings: bool) -> tuple[bytes, bytes, bytes]:
    """(pattern of the value with one group, text before the group's text, text after it)."""
    if wal2json_type in INTEGER_TYPES:
        return (rb'"(-?[0-9]+)"', b"", b"") if numbers_as_strings else (rb"(-?[0-9]+|null)", b"", b"")
    if is_decimal(wal2json_type):
        return (rb'("[^"\\]*")', b"", b"") if numbers_as_strings else (rb"(-?[0-9][0-9.eE+-]*)", b'"', b'"')
    if wal2json_type == BOOLEAN_TYPE:
        return rb"(true|false|null)", b"", b""
    if wal2json_type == "bytea":
        return rb'"([0-9a-f]*)"', b'"\\\\x', b'"'
    return b"(" + _STRING + rb"|null)", b"", b""


@dataclass(frozen=True)
class Entries:
    """A list of column entries (`"columns":[...]` or `"identity":[...]`) of one shape: the pattern,
    and the JSON object of the values it captures as a %-template."""

    pattern: re.Pattern[bytes]
    template: bytes
    names: tuple[str, ...]


def _entries(label: bytes, columns: Sequence[tuple[str, str, int | None]], numbers_as_strings: bool) -> Entries:
    """Entries of (name, type as wal2json prints it, attnum; None: identity entries, which carry none)."""
    patterns: list[bytes] = []
    template: list[bytes] = []
    for name, type_name, position in columns:
        value, before, after = _value_form(type_name, numbers_as_strings)
        head = b'{"name":' + orjson.dumps(name) + b',"type":' + orjson.dumps(type_name) + b',"value":'
        tail = b"}" if position is None else b',"position":%d}' % position
        patterns.append(re.escape(head) + value + re.escape(tail))
        template.append(orjson.dumps(name).replace(b"%", b"%%") + b":" + before + b"%s" + after)
    pattern = re.compile(b'"' + label + b'":\\[' + b",".join(patterns) + b"\\]")
    return Entries(pattern, b"{" + b",".join(template) + b"}", tuple(c[0] for c in columns))


class RowShape:
    """The patterns of one table shape: its columns, its identity (the key's columns, or all of them
    under REPLICA IDENTITY FULL), and how to write the key from either."""

    def __init__(self, info: TableInfo, numbers_as_strings: bool) -> None:
        shape = info.shape
        self.key_names = info.key
        self.columns = _entries(b"columns", [(n, t, a) for a, n, t in shape], numbers_as_strings)
        identity = [(n, t, None) for _, n, t in shape if info.full_identity or n in info.key]
        self.identity = _entries(b"identity", identity, numbers_as_strings)
        # The key's JSON object as a %-template of the key columns' captured texts
        forms = [_value_form(info.wal2json_types[info.columns.index(k)], numbers_as_strings) for k in info.key]
        self.key_template = (
            b"{"
            + b",".join(
                orjson.dumps(k).replace(b"%", b"%%") + b":" + before + b"%s" + after
                for k, (_, before, after) in zip(info.key, forms, strict=True)
            )
            + b"}"
        )
        self.key_in_columns = self._key_of(self.columns)
        self.key_in_identity = self._key_of(self.identity)

    def _key_of(self, entries: Entries) -> Callable[[tuple[bytes, ...]], Any] | None:
        """The key columns' captured texts out of the entries' groups (None: not all there)."""
        names = entries.names
        if not all(k in names for k in self.key_names):
            return None
        where = [names.index(k) for k in self.key_names]
        return operator.itemgetter(*where) if len(where) > 1 else lambda groups: (groups[where[0]],)

    def key(self, groups: tuple[bytes, ...], of: Callable[[tuple[bytes, ...]], Any]) -> bytes:
        key: bytes = self.key_template % of(groups)
        return key


def match_entries(
    shape: RowShape, action: bytes, payload: bytes, at: int
) -> tuple[bytes | None, bytes | None, bytes, bytes | None] | None:
    """(after, before, key, old key) of the change whose entries start at `at`; None: no match."""
    after = before = old_key = None
    if action != b"D":
        found = shape.columns.pattern.match(payload, at)
        if found is None or shape.key_in_columns is None:
            return None
        groups = found.groups()
        after = shape.columns.template % groups
        key = shape.key(groups, shape.key_in_columns)
        at = found.end()
        if action == b"I":
            return (after, None, key, None) if _TAIL.match(payload, at) else None
        if payload[at : at + 1] != b",":
            return None
        at += 1
    found = shape.identity.pattern.match(payload, at)
    if found is None or shape.key_in_identity is None or not _TAIL.match(payload, found.end()):
        return None
    groups = found.groups()
    before = shape.identity.template % groups
    if action == b"D":
        return None, before, shape.key(groups, shape.key_in_identity), None
    old_key = shape.key(groups, shape.key_in_identity)
    return after, before, key, old_key
