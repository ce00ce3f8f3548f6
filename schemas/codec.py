"""The bytes of a change message: its value (the envelope, schemas/envelope.py), its key and a
tombstone's `cdc.source` header. The source writes them with the encode functions, the sink reads
them with the decode functions; schemas/envelope.schema.json describes the same bytes.

Encoding is the source's hot path: nothing is checked or copied, the caller's dicts go to orjson as
they are, in the envelope's key order. `columns` and `key` may be orjson Fragments (a table's columns
and key, serialized once). Decoding checks what applying a change relies on (op, rows holding the
key columns, values as the value rules allow, positions, `unchanged`, `partitions`) and raises
BadMessage naming the first thing wrong; the descriptive fields (`ts_ms`, the source's names, `seq`,
`snapshot`) are passed on as they are.
"""

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, cast

import msgspec
import orjson

from schemas.envelope import OPS, TOMBSTONE_HEADER, Envelope, Op, Row, SchemaChange, Source, TombstoneSource
from schemas.values import VALUE_TYPES, value_problem

Columns = Mapping[str, str] | orjson.Fragment
KeyColumns = Sequence[str] | orjson.Fragment
Headers = Sequence[tuple[str, bytes | None]]

REQUIRED = ("op", "source", "columns", "key", "before", "after")  # checked in this order
POSITION = ("txId", "lsn", "commit_lsn", "ts_us")  # where a change happened, as in TombstoneSource
_POSITION_TYPES = frozenset({int, type(None)})
_NAME_TYPES = frozenset({str})
_REQUIRED = frozenset(REQUIRED)


class BadMessage(Exception):
    """A message that cannot be read as a change message; names what is wrong with it."""


# --- encoding -----------------------------------------------------------------------------------


def encode(
    before: Row | None,
    after: Row | None,
    op: Op,
    ts_ms: int,
    source: Source,
    columns: Columns,
    key: KeyColumns,
    unchanged: list[str] | None = None,
    refetched: list[str] | None = None,
    partitions: int | None = None,
    schema_change: SchemaChange | None = None,
) -> bytes:
    """The value of a change message. `unchanged` and `refetched` are left out when empty,
    `partitions` and `schema_change` when None."""
    env: dict[str, object] = {
        "before": before,
        "after": after,
        "op": op,
        "ts_ms": ts_ms,
        "source": source,
        "columns": columns,
        "key": key,
    }
    if unchanged:
        env["unchanged"] = unchanged
    if refetched:
        env["refetched"] = refetched
    if partitions is not None:
        env["partitions"] = partitions
    if schema_change is not None:
        env["schema_change"] = schema_change
    return orjson.dumps(env)


def encode_key(row: Mapping[str, object], key: Sequence[str]) -> bytes:
    """The message key: the key columns of the row as a JSON object, in key order."""
    return orjson.dumps({k: row[k] for k in key})


def encode_tombstone(position: TombstoneSource) -> bytes:
    """The `cdc.source` header of a delete's tombstone."""
    return orjson.dumps(position)


# --- decoding -----------------------------------------------------------------------------------

# The value rules (schemas/values.py) as types. An integer beyond 64 bits is refused by `decode`, as
# orjson reads it as a float; one above 2**63 - 1 and within 64 bits unsigned takes `decode`'s path.
_Integer = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_Value = str | _Integer | bool | None
_ROW_OPS = frozenset({"c", "u", "d", "r"})


class RowSource(msgspec.Struct):
    """The position fields of a row change's `source` (the others are skipped unread)."""

    txId: _Integer | None = None
    lsn: _Integer | None = None
    commit_lsn: _Integer | None = None
    ts_us: _Integer | None = None
    seq: _Integer | None = None
    stream: str | None = None


class RowChange(msgspec.Struct):
    """A row change's envelope (c, u, d, r) as the sink reads it."""

    op: Literal["c", "u", "d", "r"]
    source: RowSource
    columns: msgspec.Raw  # read once per distinct text (see _columns)
    key: list[str]
    before: dict[str, _Value] | None
    after: dict[str, _Value] | None
    unchanged: list[str] | None = None
    refetched: list[str] | None = None  # checked, not read


_row_change = msgspec.json.Decoder(RowChange)
_column_types = msgspec.json.Decoder(dict[str, str])
# `columns` by its text: a table's events carry one shape, read once; the dicts are shared (and
# never changed by their readers)
_shapes: dict[bytes, dict[str, str]] = {}
SHAPES_KEPT = 1024


def _columns(raw: msgspec.Raw) -> dict[str, str] | None:
    text = bytes(raw)
    found = _shapes.get(text)
    if found is None:
        try:
            found = _column_types.decode(text)
        except msgspec.DecodeError:
            return None
        if len(_shapes) >= SHAPES_KEPT:
            _shapes.clear()
        _shapes[text] = found
    return found


def decode_row_change(value: bytes) -> tuple[RowChange, dict[str, str]] | None:
    """The sink's hot path: a row change's envelope read and checked in one pass, with no object made
    for what applying it does not read, and its column types; None for anything else (`decode`
    reads it, or says what is wrong). It accepts exactly what `decode` accepts of a row change, and
    reads the same values."""
    try:
        env = _row_change.decode(value)
    except msgspec.DecodeError:  # ValidationError included: `decode` decides, and names the problem
        return None
    key, op = env.key, env.op
    row = env.before if op == "d" else env.after
    if not key or row is None or not (key[0] in row if len(key) == 1 else row.keys() >= set(key)):
        return None
    if env.unchanged is not None and op not in ("u", "c"):
        return None
    columns = _columns(env.columns)
    return None if columns is None else (env, columns)


def decode(value: bytes) -> Envelope:
    """The envelope of a change message's value, checked."""
    env = _loads(value, "value")
    if type(env) is dict and _valid(env):
        return cast(Envelope, env)
    return _checked(env)


def _valid(env: dict[str, Any]) -> bool:
    """The checks of `_checked` in one pass, without naming what is wrong (the sink's hot path)."""
    try:
        op, source, columns, key = env["op"], env["source"], env["columns"], env["key"]
        before, after = env["before"], env["after"]
    except KeyError:
        return False
    if type(op) is not str or op not in OPS or type(columns) is not dict or type(source) is not dict:
        return False
    if op == "s":  # rare: checked field by field
        try:
            _checked_schema_change(env)
        except BadMessage:
            return False
        return True
    if not (type(key) is list and key and _NAME_TYPES.issuperset(map(type, key))):
        return False
    if not (_NAME_TYPES.issuperset(map(type, columns.values())) and _is_position(source)):
        return False
    if op == "t":
        partitions = env.get("partitions")
        if not isinstance(partitions, int) or partitions < 1:
            return False
    else:
        row = before if op == "d" else after
        if type(row) is not dict or not (key[0] in row if len(key) == 1 else row.keys() >= set(key)):
            return False
    for row in (before, after):
        if row is not None and (type(row) is not dict or not VALUE_TYPES.issuperset(map(type, row.values()))):
            return False
    unchanged, refetched = env.get("unchanged"), env.get("refetched")
    return (unchanged is None or (op in ("u", "c") and _is_names(unchanged))) and (
        refetched is None or _is_names(refetched)
    )


def _checked(env: object) -> Envelope:
    """The envelope, checked field by field: BadMessage names the first thing wrong."""
    if not isinstance(env, dict):
        raise BadMessage("value is not a JSON object")
    if not env.keys() >= _REQUIRED:
        missing = next(name for name in REQUIRED if name not in env)
        raise BadMessage(f"envelope has no {missing!r} field")
    op, columns, key, source = env["op"], env["columns"], env["key"], env["source"]
    if not isinstance(op, str) or op not in OPS:
        raise BadMessage(f"unknown op {op!r}")
    if op == "s":
        return _checked_schema_change(env)
    if not isinstance(columns, dict) or not _is_names(key) or not key:
        raise BadMessage("envelope `columns` must be an object and `key` a non-empty list of column names")
    if not _NAME_TYPES.issuperset(map(type, columns.values())):
        raise BadMessage("envelope `columns` must map each column to its type name")
    if not isinstance(source, dict):
        raise BadMessage("envelope `source` must be an object")
    if not _is_position(source):
        raise BadMessage("envelope `source` txId, lsn, commit_lsn and ts_us must be integers or nulls")
    if op != "t":
        name = "before" if op == "d" else "after"
        row = env[name]
        if not isinstance(row, dict) or not row.keys() >= set(key):
            raise BadMessage(f"`{name}` must be an object holding the key columns")
    _check_rows(env["before"], env["after"])
    _check_lists(env, op)
    partitions = env.get("partitions")
    if op == "t" and (not isinstance(partitions, int) or partitions < 1):
        raise BadMessage("truncate event without a valid `partitions` count")
    return cast(Envelope, env)


_CHANGE_KEYS = ("renamed", "retyped", "dropped", "added", "rewritten")
_ADDED_KEYS = ("name", "type", "not_null", "default", "missing")


def _checked_schema_change(env: dict[str, Any]) -> Envelope:
    """A schema-change event: no rows, the new shape in `columns` and `key` (key may be empty, as the
    table may have none by now), `partitions`, and a well-formed `schema_change`."""
    columns, key, source = env["columns"], env["key"], env["source"]
    if not isinstance(columns, dict) or not _NAME_TYPES.issuperset(map(type, columns.values())):
        raise BadMessage("schema change: `columns` must map each column to its type name")
    if key is not None and not _is_names(key):
        raise BadMessage("schema change: `key` must be a list of column names")
    if not isinstance(source, dict) or not _is_position(source):
        raise BadMessage("envelope `source` txId, lsn, commit_lsn and ts_us must be integers or nulls")
    if env["before"] is not None or env["after"] is not None:
        raise BadMessage("schema change: `before` and `after` must be null")
    partitions = env.get("partitions")
    if type(partitions) is not int or partitions < 1:
        raise BadMessage("schema change event without a valid `partitions` count")
    change = env.get("schema_change")
    if not isinstance(change, dict):
        raise BadMessage("schema change event without a `schema_change` object")
    problem = _schema_change_problem(change)
    if problem is not None:
        raise BadMessage(f"schema change: {problem}")
    _check_lists(env, "s")
    return cast(Envelope, env)


def _schema_change_problem(change: dict[str, Any]) -> str | None:
    missing = [k for k in _CHANGE_KEYS if k not in change]
    if missing:
        return f"`schema_change` has no {missing[0]!r} field"
    if type(change["renamed"]) is not list or not all(
        _is_str_object(r, ("from", "to")) for r in change["renamed"]
    ):
        return '`renamed` must be a list of {"from": name, "to": name}'
    if type(change["retyped"]) is not list or not all(
        _is_str_object(r, ("name", "from", "to")) for r in change["retyped"]
    ):
        return '`retyped` must be a list of {"name": name, "from": type, "to": type}'
    if not _is_names(change["dropped"]):
        return "`dropped` must be a list of column names"
    added = change["added"]
    if type(added) is not list or not all(_is_added(a) for a in added):
        return (
            '`added` must be a list of {"name": name, "type": type, "not_null": boolean, '
            '"default": text or null, "missing": text or null}'
        )
    if type(change["rewritten"]) is not bool:
        return "`rewritten` must be true or false"
    return None


def _is_str_object(value: object, keys: tuple[str, ...]) -> bool:
    return isinstance(value, dict) and all(type(value.get(k)) is str for k in keys)


def _is_added(value: object) -> bool:
    return (
        isinstance(value, dict)
        and all(k in value for k in _ADDED_KEYS)
        and type(value["name"]) is str
        and type(value["type"]) is str
        and type(value["not_null"]) is bool
        and type(value["default"]) in (str, type(None))
        and type(value["missing"]) in (str, type(None))
    )


def decode_key(key: bytes) -> Row:
    """The key columns of a message key."""
    row = _loads(key, "key")
    if not isinstance(row, dict) or not row:
        raise BadMessage("key is not a JSON object of key columns")
    problem = value_problem(row)
    if problem is not None:
        raise BadMessage(f"key {problem}")
    return row


def decode_tombstone(headers: Headers | None) -> TombstoneSource | None:
    """Where a tombstone's delete happened, from its `cdc.source` header; None without one (a
    delete of its key at an unknown position)."""
    found: TombstoneSource | None = None
    for name, raw in headers or ():
        if name != TOMBSTONE_HEADER:
            continue
        position = _loads(raw or b"", f"tombstone header {TOMBSTONE_HEADER}")
        if not isinstance(position, dict) or not _is_position(position):
            raise BadMessage(f"tombstone header {TOMBSTONE_HEADER} must be an object of integers or nulls")
        found = {
            "txId": position.get("txId"),
            "lsn": position.get("lsn"),
            "commit_lsn": position.get("commit_lsn"),
            "ts_us": position.get("ts_us"),
        }
        seq, stream = position.get("seq"), position.get("stream")
        if type(seq) is int:
            found["seq"] = seq
        if type(stream) is str:
            found["stream"] = stream
    return found


# --- positions ----------------------------------------------------------------------------------

Position = tuple[int, int, int]  # (commit LSN, seq, rank): see envelope.py
RANKS = {"s": -1, "d": 0, "c": 2, "u": 2, "r": 2, "t": 2}
TOMBSTONE_RANK = 1
TRANSACTION_RANKS = {"BEGIN": 0, "END": 0}  # a transaction record's status (schemas/transactions.py)


def position(value: bytes | None, headers: Headers | None) -> Position | None:
    """Where a message (a change message, or a record of the transaction topic) stands in its
    partition (None for a message without a full position: another producer's, or a tombstone written before tombstones carried their delete's seq)."""
    try:
        if value is None:
            tombstone = decode_tombstone(headers)
            if tombstone is None:
                return None
            commit_lsn, seq, rank = tombstone["commit_lsn"], tombstone.get("seq"), TOMBSTONE_RANK
        else:
            doc = orjson.loads(value)
            # a transaction record (schemas/transactions.py) stands at rank 0 of its seq
            rank = RANKS[doc["op"]] if "op" in doc else TRANSACTION_RANKS[doc["status"]]
            commit_lsn, seq = doc["source"]["commit_lsn"], doc["source"]["seq"]
    except (BadMessage, orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if type(commit_lsn) is not int or type(seq) is not int:
        return None
    return commit_lsn, seq, rank


def _loads(raw: bytes, what: str) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadMessage(f"{what} is not JSON: {exc}") from None


def _is_position(fields: Mapping[str, object]) -> bool:
    """The position fields present are integers or nulls."""
    types = _POSITION_TYPES
    get = fields.get
    return (
        type(get("txId")) in types
        and type(get("lsn")) in types
        and type(get("commit_lsn")) in types
        and type(get("ts_us")) in types
    )


def _is_names(names: object) -> bool:
    return isinstance(names, list) and _NAME_TYPES.issuperset(map(type, names))


def _check_rows(before: object, after: object) -> None:
    """Both rows are objects or null, of values the value rules allow."""
    for name, row in (("before", before), ("after", after)):
        if row is None:
            continue
        if not isinstance(row, dict):
            raise BadMessage(f"`{name}` must be an object or null")
        problem = value_problem(row)
        if problem is not None:
            raise BadMessage(f"`{name}` {problem}")


def _check_lists(env: dict[str, Any], op: str) -> None:
    unchanged = env.get("unchanged")
    if unchanged is not None and (op not in ("u", "c") or not _is_names(unchanged)):
        raise BadMessage("`unchanged` is only allowed on updates and creates, as a list")
    refetched = env.get("refetched")
    if refetched is not None and not _is_names(refetched):
        raise BadMessage("`refetched` must be a list of column names")
