"""How a column's value is written in events and keys (see envelope.py): the text PostgreSQL's output
function prints for it, except integers and booleans, which are JSON integers and booleans, as
wal2json writes them. Whoever reads a row from PostgreSQL itself (the source's snapshot, the sink
working out a key) reads it with `output_text` and turns it into JSON values with `json_row`. Whoever
reads an event checks its rows with `value_problem`: a JSON number that is not an integer (or does
not fit 64 bits) would be parsed as a float and lose digits, so it is refused, never rounded."""

from collections.abc import Iterable, Mapping

from psycopg2 import sql

from schemas.envelope import Row

INTEGER_TYPES = frozenset({"smallint", "integer", "bigint", "oid"})
BOOLEAN_TYPE = "boolean"

# What a JSON parser makes of the values a row may hold: strings, integers, booleans and null.
VALUE_TYPES = frozenset({str, int, bool, type(None)})
_REFUSED = {float: "number that is not a 64-bit integer", list: "array", dict: "object"}


def typed_columns(types: Mapping[str, str]) -> tuple[frozenset[str], frozenset[str]]:
    """(the integer columns, the boolean columns) of a table, from its columns' type names."""
    integers = frozenset(c for c, t in types.items() if t in INTEGER_TYPES)
    booleans = frozenset(c for c, t in types.items() if t == BOOLEAN_TYPE)
    return integers, booleans


def json_row(
    names: Iterable[str], texts: Iterable[str | None], integers: frozenset[str], booleans: frozenset[str]
) -> Row:
    """A row read as text (`output_text`) as JSON values: integers and booleans typed, NULL kept."""
    row: Row = {}
    for name, text in zip(names, texts, strict=True):
        if text is None:
            row[name] = None
        elif name in integers:
            row[name] = int(text)
        elif name in booleans:
            row[name] = text == "true"
        else:
            row[name] = text
    return row


def value_problem(row: Mapping[str, object]) -> str | None:
    """What is wrong with the first value of a parsed row that is not a string, integer, boolean or
    null (`column 'n' is a JSON number ...`); None when every value is one."""
    if VALUE_TYPES.issuperset(map(type, row.values())):
        return None
    name, value = next((n, v) for n, v in row.items() if type(v) not in VALUE_TYPES)
    kind = _REFUSED.get(type(value), type(value).__name__)
    return f"column {name!r} is a JSON {kind}: numbers other than integers are sent as their exact text"


def output_text(column: str, type_name: str) -> sql.Composable:
    """The column as its type's output function prints it, which is what wal2json sends for the same
    value. `col::text` is not that for every type: character(n) loses its trailing blanks and inet
    gains a /32 or /128 host mask. format('%s') calls the output function (NULL kept NULL: format
    would print ''). Booleans stay `::text` (true/false), the form json_row turns into JSON booleans."""
    ident = sql.Identifier(column)
    if type_name == BOOLEAN_TYPE:
        return sql.SQL("{}::text").format(ident)
    return sql.SQL("CASE WHEN num_nonnulls({0}) = 1 THEN format('%s', {0}) END").format(ident)
