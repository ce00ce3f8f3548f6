"""wal2json format-version 2 messages as the plugin writes them, byte for byte, for the unit tests.

wal2json (2.5, without numeric-data-types-as-string) prints smallint/integer/bigint/oid, numeric,
real and double precision values as bare JSON numbers (NaN and Infinity as null), booleans as
true/false, bytea as hex without its `\\x` prefix, and every other value as an escaped JSON string.
A column of `columns` is `{"name":...,"type":...,"value":...,"position":N}` with no spaces (the
position, the column's attnum, from include-column-positions); identity entries have no position,
pk entries neither position nor value (as wal2json 2.5 printed them).
"""

from collections.abc import Sequence

import orjson

TIMESTAMP = "2026-11-25 14:43:17.816235+00"

# (name, type as wal2json prints it, value exactly as wal2json prints it), optionally followed by
# the column's attnum (else its place in the list, from 1)
Column = tuple[str, str, bytes] | tuple[str, str, bytes, int]


def text(value: str | None) -> bytes:
    """A value of any type wal2json prints as a JSON string (escaped like PostgreSQL's escape_json)."""
    return b"null" if value is None else orjson.dumps(value)


def bare(value: int | str | None) -> bytes:
    """A number printed without quotes, exactly as PostgreSQL's output function wrote it."""
    return b"null" if value is None else str(value).encode()


def boolean(value: bool | None) -> bytes:
    return b"null" if value is None else (b"true" if value else b"false")


def bytea(hex_digits: str | None) -> bytes:
    """bytea: PostgreSQL prints `\\x00ff`, wal2json drops the `\\x`."""
    return b"null" if hex_digits is None else b'"' + hex_digits.encode() + b'"'


def column(name: str, type_: str, value: bytes, position: int | None = None) -> bytes:
    out = b'{"name":' + orjson.dumps(name) + b',"type":' + orjson.dumps(type_) + b',"value":' + value
    return out + (b"}" if position is None else b',"position":' + str(position).encode() + b"}")


def _columns(columns: Sequence[Column], positions: bool) -> bytes:
    return (
        b"["
        + b",".join(
            column(c[0], c[1], c[2], (c[3] if len(c) > 3 else i + 1) if positions else None)
            for i, c in enumerate(columns)
        )
        + b"]"
    )


def _pk(pk: list[tuple[str, str]]) -> bytes:
    return (
        b"["
        + b",".join(b'{"name":' + orjson.dumps(n) + b',"type":' + orjson.dumps(t) + b"}" for n, t in pk)
        + b"]"
    )


def change(
    action: str,
    *,
    columns: Sequence[Column] | None = None,
    identity: Sequence[Column] | None = None,
    pk: list[tuple[str, str]] | None = None,
    schema: str = "public",
    table: str = "probe",
    xid: int = 729,
    timestamp: str = TIMESTAMP,
    lsn: str = "0/19276D8",
) -> bytes:
    """An I, U or D message (`columns` for I and U, `identity` for U and D)."""
    out = (
        b'{"action":"'
        + action.encode()
        + b'","xid":'
        + str(xid).encode()
        + b',"timestamp":"'
        + timestamp.encode()
        + b'","lsn":"'
        + lsn.encode()
        + b'","schema":'
        + orjson.dumps(schema)
        + b',"table":'
        + orjson.dumps(table)
    )
    if columns is not None:
        out += b',"columns":' + _columns(columns, True)
    if identity is not None:
        out += b',"identity":' + _columns(identity, False)
    out += b',"pk":' + _pk([("id", "bigint")] if pk is None else pk)
    return out + b"}"


def begin(xid: int = 730, lsn: str = "0/1927B78", nextlsn: str = "0/1927BA8", timestamp: str = TIMESTAMP) -> bytes:
    return f'{{"action":"B","xid":{xid},"timestamp":"{timestamp}","lsn":"{lsn}","nextlsn":"{nextlsn}"}}'.encode()


def commit(
    xid: int = 730, lsn: str = "0/1927B78", nextlsn: str = "0/1927BA8", timestamp: str = TIMESTAMP
) -> bytes:
    return f'{{"action":"C","xid":{xid},"timestamp":"{timestamp}","lsn":"{lsn}","nextlsn":"{nextlsn}"}}'.encode()


def truncate(
    schema: str = "public",
    table: str = "probe",
    xid: int = 730,
    lsn: str = "0/1927B00",
    timestamp: str = TIMESTAMP,
) -> bytes:
    return (
        f'{{"action":"T","xid":{xid},"timestamp":"{timestamp}","lsn":"{lsn}","schema":'.encode()
        + orjson.dumps(schema)
        + b',"table":'
        + orjson.dumps(table)
        + b"}"
    )
