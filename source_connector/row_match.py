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
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from schemas.values import BOOLEAN_TYPE, INTEGER_TYPES
from source_connector.table_info import TableInfo, is_decimal

_STRING = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'  # possessive: what a JSON string took, it keeps
# {"action":"U","xid":1,"timestamp":"...","lsn":"1/4546", with the action in place of %s
_ACTION_HEAD = rb'\{"action":"%s","xid":[0-9]++,"timestamp":"[^"\\]*+","lsn":"([0-9A-F]++)/([0-9A-F]++)",'
# ... and "schema":"public","table":"person", of any table whose names need no escapes
HEAD = re.compile(_ACTION_HEAD % rb"([IUD])" + rb'"schema":"([^"\\]*+)","table":"([^"\\]*+)",')
# What follows the columns and identity of a change: wal2json's list of the key columns, and the end.
_TAIL = rb'(?:,"pk":\[[^\]]*+\])?\}\Z'


def _value_form(wal2json_type: str, numbers_as_strings: bool) -> tuple[bytes, bytes, bytes]:
    """(pattern of the value with one group, text before the group's text, text after it)."""
    if wal2json_type in INTEGER_TYPES:
        return (rb'"(-?[0-9]++)"', b"", b"") if numbers_as_strings else (rb"(-?[0-9]++|null)", b"", b"")
    if is_decimal(wal2json_type):
        return (rb'("[^"\\]*+")', b"", b"") if numbers_as_strings else (rb"(-?[0-9][0-9.eE+-]*+)", b'"', b'"')
    if wal2json_type == BOOLEAN_TYPE:
        return rb"(true|false|null)", b"", b""
    if wal2json_type == "bytea":
        return rb'"([0-9a-f]*+)"', b'"\\\\x', b'"'
    return b"(" + _STRING + rb"|null)", b"", b""


@dataclass(frozen=True)
class Entries:
    """A list of column entries (`"columns":[...]` or `"identity":[...]`) of one shape: the pattern
    (one group per value), and the JSON object of the values it captures as a %-template."""

    pattern: bytes
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
    pattern = b'"' + label + b'":\\[' + b",".join(patterns) + b"\\]"
    return Entries(pattern, b"{" + b",".join(template) + b"}", tuple(c[0] for c in columns))


# (LSN, the new row, the old row, the key, an update's old key), each row and key as JSON
Match = tuple[int, bytes | None, bytes | None, bytes, bytes | None]


class RowShape:
    """A table shape's patterns of a whole insert, update and delete (the update's and delete's
    identity: the key's columns, or all of them under REPLICA IDENTITY FULL), the templates of their
    rows, and where their keys are."""

    def __init__(self, info: TableInfo, numbers_as_strings: bool) -> None:
        shape = info.shape
        self.info = info
        columns = _entries(b"columns", [(n, t, a) for a, n, t in shape], numbers_as_strings)
        identity = _entries(
            b"identity",
            [(n, t, None) for _, n, t in shape if info.full_identity or n in info.key],
            numbers_as_strings,
        )
        self.after, self.before = columns.template, identity.template
        self.columns = len(columns.names)
        name = re.escape(
            b'"schema":' + orjson.dumps(info.name.schema) + b',"table":' + orjson.dumps(info.name.name) + b","
        )

        def head(action: bytes) -> bytes:
            return _ACTION_HEAD % action + name

        self.insert = re.compile(head(b"I") + columns.pattern + _TAIL)
        self.update = re.compile(head(b"U") + columns.pattern + b"," + identity.pattern + _TAIL)
        self.delete = re.compile(head(b"D") + identity.pattern + _TAIL)
        # The key's JSON object as a %-template of the key columns' captured texts
        forms = [_value_form(info.wal2json_types[info.columns.index(k)], numbers_as_strings) for k in info.key]
        self.key = (
            b"{"
            + b",".join(
                orjson.dumps(k).replace(b"%", b"%%") + b":" + before + b"%s" + after
                for k, (_, before, after) in zip(info.key, forms, strict=True)
            )
            + b"}"
        )
        # The key columns' captured texts among a match's groups (the LSN's two come first)
        self.new_key = operator.itemgetter(*(2 + columns.names.index(k) for k in info.key))
        at = [2 + identity.names.index(k) for k in info.key if k in identity.names]
        known = len(at) == len(info.key)
        self.old_key = operator.itemgetter(*at) if known else None
        self.updated_old_key = operator.itemgetter(*(self.columns + i for i in at)) if known else None

    def match(self, action: bytes, payload: bytes) -> Match | None:
        """The change if `payload` is a whole I, U or D message of this shape, else None."""
        if action == b"I":
            found = self.insert.match(payload)
            if found is None:
                return None
            g = found.groups()
            return _lsn(g), self.after % g[2:], None, self.key % self.new_key(g), None
        if self.old_key is None or self.updated_old_key is None:
            return None
        if action == b"U":
            found = self.update.match(payload)
            if found is None:
                return None
            g = found.groups()
            end = 2 + self.columns
            after, before = self.after % g[2:end], self.before % g[end:]
            return _lsn(g), after, before, self.key % self.new_key(g), self.key % self.updated_old_key(g)
        found = self.delete.match(payload) if action == b"D" else None
        if found is None:
            return None
        g = found.groups()
        return _lsn(g), None, self.before % g[2:], self.key % self.old_key(g), None


def _lsn(groups: tuple[bytes, ...]) -> int:
    return (int(groups[0], 16) << 32) | int(groups[1], 16)
