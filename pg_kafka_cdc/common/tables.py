"""Table names as the user writes them (`schema.table`, PostgreSQL identifier rules) and as values;
table patterns (`sales.*`, `public.order_*`) and the selection --tables / --exclude-tables make."""

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pg_kafka_cdc.common.errors import ConfigError

WILDCARD = "*"

TABLES_FLAG = "--tables / TABLES"
EXCLUDE_FLAG = "--exclude-tables / EXCLUDE_TABLES"

# Schemas no pattern and no default scope reaches: PostgreSQL's own, and the sink's bookkeeping
# (`cdc_sink`, its default --state-schema), which a source database that is also some sink's target
# holds: replicated, its offsets would land in the next target's own bookkeeping tables. A table
# there is replicated only when its schema is named exactly (`cdc_sink.*`, `cdc_sink.offsets`).
SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
SYSTEM_SCHEMA_PREFIXES = ("pg_toast", "pg_temp")
BOOKKEEPING_SCHEMAS = frozenset({"cdc_sink"})


@dataclass(frozen=True, order=True)
class TableName:
    """A table's exact schema and name (case and characters as stored in the catalog)."""

    schema: str
    name: str

    def __str__(self) -> str:
        return f"{quote_if_needed(self.schema)}.{quote_if_needed(self.name)}"


def quote_if_needed(ident: str) -> str:
    """The identifier as PostgreSQL would print it: bare when it is lower-case and plain, else quoted."""
    plain = (
        ident != ""
        and (ident[0].isascii() and (ident[0].islower() or ident[0] == "_"))
        and all(c.isascii() and (c.islower() or c.isdigit() or c in "_$") for c in ident)
    )
    return ident if plain else '"' + ident.replace('"', '""') + '"'


@dataclass(frozen=True, order=True)
class NamePattern:
    """One part of a table pattern: the literal texts between its `*` wildcards (one text: an
    exact name). A `*` inside double quotes is a literal character."""

    pieces: tuple[str, ...]

    @property
    def exact(self) -> bool:
        return len(self.pieces) == 1

    def matches(self, ident: str) -> bool:
        if self.exact:
            return ident == self.pieces[0]
        return re.fullmatch(".*".join(map(re.escape, self.pieces)), ident, re.DOTALL) is not None

    def __str__(self) -> str:
        if self.exact:
            return quote_if_needed(self.pieces[0])
        return WILDCARD.join(p if quote_if_needed(p) == p or not p else quote_if_needed(p) for p in self.pieces)


@dataclass(frozen=True, order=True)
class TablePattern:
    """A `schema.table` entry of --tables or --exclude-tables; either part may hold `*` wildcards."""

    schema: NamePattern
    name: NamePattern

    @property
    def exact(self) -> TableName | None:
        """The one table the entry names, when it has no wildcard."""
        if self.schema.exact and self.name.exact:
            return TableName(self.schema.pieces[0], self.name.pieces[0])
        return None

    def matches(self, table: TableName) -> bool:
        """Whether the entry names `table`. A wildcard in the schema never reaches a system or
        bookkeeping schema (SYSTEM_SCHEMAS, BOOKKEEPING_SCHEMAS): name the schema for those."""
        if not self.schema.exact and reserved_schema(table.schema):
            return False
        return self.schema.matches(table.schema) and self.name.matches(table.name)

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


def reserved_schema(schema: str) -> bool:
    """PostgreSQL's own schemas and the sink's bookkeeping schema, which no default scope or
    schema wildcard includes."""
    return schema in SYSTEM_SCHEMAS or schema in BOOKKEEPING_SCHEMAS or schema.startswith(SYSTEM_SCHEMA_PREFIXES)


EVERY_TABLE = TablePattern(NamePattern(("", "")), NamePattern(("", "")))  # `*.*`, the default scope


@dataclass(frozen=True)
class TableSelection:
    """What --tables and --exclude-tables select: exact names and patterns, less the exclusions.
    Without --tables: every table of every schema but the reserved ones (reserved_schema)."""

    include: tuple[TablePattern, ...] = ()
    exclude: tuple[TablePattern, ...] = ()

    @property
    def default(self) -> bool:
        """No --tables: every table (`*.*`)."""
        return not self.include

    @property
    def names(self) -> tuple[TableName, ...]:
        """The tables --tables names exactly, in its order."""
        return tuple(t for t in (p.exact for p in self.include) if t is not None)

    @property
    def patterns(self) -> tuple[TablePattern, ...]:
        """The entries of --tables with a wildcard; `*.*` alone without --tables."""
        if self.default:
            return (EVERY_TABLE,)
        return tuple(p for p in self.include if p.exact is None)

    @property
    def exact(self) -> bool:
        """--tables names only exact tables (no pattern, not the default)."""
        return not self.default and not self.patterns

    def excluded(self, table: TableName) -> bool:
        return any(p.matches(table) for p in self.exclude)

    def by_pattern(self, table: TableName) -> bool:
        """A pattern of --tables (or the default) reaches `table` and --exclude-tables does not."""
        return any(p.matches(table) for p in self.patterns) and not self.excluded(table)

    def selects(self, table: TableName) -> bool:
        """`table` is named exactly or reached by a pattern, and not excluded."""
        return table in self.names or self.by_pattern(table)

    def __str__(self) -> str:
        shown = ",".join(map(str, self.include)) or "(all)"
        return shown + (f" except {','.join(map(str, self.exclude))}" if self.exclude else "")


def _split_identifiers(text: str, flag: str) -> list[list[NamePattern]]:
    """Split `a.b_*, "c,d".e` into [[a, b_*], [c,d, e]]: commas and dots outside double quotes
    separate, an unquoted `*` is a wildcard, unquoted text folds to lower case."""
    names: list[list[NamePattern]] = []
    parts: list[NamePattern] = []
    current = _Part()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            end = i + 1
            buf = []
            while True:
                if end >= len(text):
                    raise ConfigError(
                        f"{flag}: unterminated quoted identifier in table list {text!r}: close the quote"
                    )
                if text[end] == '"':
                    if end + 1 < len(text) and text[end + 1] == '"':
                        buf.append('"')
                        end += 2
                        continue
                    break
                buf.append(text[end])
                end += 1
            current.add("".join(buf), quoted=True)
            i = end + 1
            continue
        if ch in ".,":
            parts.append(current.finish(text, flag))
            current = _Part()
            if ch == ",":
                names.append(parts)
                parts = []
        elif not ch.isspace():
            if current.closed and ch != WILDCARD:
                raise ConfigError(
                    f"{flag}: unexpected {ch!r} after a quoted identifier in table list {text!r}: "
                    "quote the whole name"
                )
            current.add(ch, quoted=False)
        i += 1
    parts.append(current.finish(text, flag))
    names.append(parts)
    return names


@dataclass
class _Part:
    """One identifier being read: the pieces between its unquoted `*`s."""

    pieces: list[str] = field(default_factory=lambda: [""])
    unquoted: list[str] = field(default_factory=list)
    quoted_any: bool = False
    closed: bool = False  # a quoted identifier ended it

    def add(self, text: str, quoted: bool) -> None:
        if quoted:
            self._flush()
            self.pieces[-1] += text
            self.quoted_any = self.closed = True
        elif text == WILDCARD:
            self._flush()
            self.pieces.append("")
            self.closed = False
        else:
            self.unquoted.append(text)

    def _flush(self) -> None:
        self.pieces[-1] += "".join(self.unquoted).lower()
        self.unquoted = []

    def finish(self, text: str, flag: str) -> NamePattern:
        self._flush()
        if self.pieces == [""] and not self.quoted_any:
            raise ConfigError(
                f"{flag}: empty name in table list {text!r}: each entry is schema.table, and either part "
                "may hold * wildcards (sales.*, public.order_*)"
            )
        pieces = self.pieces
        if len(pieces) > 2:  # `a**b` is `a*b`
            pieces = [pieces[0], *(x for x in pieces[1:-1] if x), pieces[-1]]
        return NamePattern(tuple(pieces))


def parse_patterns(text: str | None, flag: str = TABLES_FLAG) -> tuple[TablePattern, ...]:
    """Parse a table list: comma-separated `schema.table`, unquoted names fold to lower case, quoted
    names are exact (`public."Order Items"`), a bare `table` means `public.table`, an unquoted `*`
    matches any characters of one part (`sales.*`, `*.*`, `public.order_*`)."""
    if text is None or not text.strip():
        return ()
    result: list[TablePattern] = []
    for parts in _split_identifiers(text.strip(), flag):
        if len(parts) == 1:
            result.append(TablePattern(NamePattern(("public",)), parts[0]))
        elif len(parts) == 2:
            result.append(TablePattern(parts[0], parts[1]))
        else:
            raise ConfigError(
                f"{flag}: table names are schema.table; got {'.'.join(map(str, parts))!r} in {text!r}: "
                'quote a name that holds a dot (public."a.b")'
            )
    return tuple(dict.fromkeys(result))


def parse_tables(text: str | None) -> tuple[TableName, ...]:
    """Parse a list of exact tables (`schema.table`, as parse_patterns; no wildcards)."""
    patterns = parse_patterns(text)
    exact = exact_tables(patterns, "this list")
    return tuple(dict.fromkeys(exact))


def exact_tables(patterns: Iterable[TablePattern], what: str) -> list[TableName]:
    """The tables of `patterns`, which must all be exact; else a ConfigError naming `what`."""
    names = []
    for pattern in patterns:
        table = pattern.exact
        if table is None:
            raise ConfigError(f"{what} needs exact table names, not the pattern {pattern}: name each table")
        names.append(table)
    return names


def parse_selection(tables: str | None, exclude: str | None) -> TableSelection:
    """--tables and --exclude-tables as a TableSelection; a table named exactly in --tables and
    matched by --exclude-tables is a ConfigError (which one is meant cannot be guessed)."""
    selection = TableSelection(parse_patterns(tables, TABLES_FLAG), parse_patterns(exclude, EXCLUDE_FLAG))
    for table in selection.names:
        hit = next((p for p in selection.exclude if p.matches(table)), None)
        if hit is not None:
            raise ConfigError(
                f"table {table} is named in {TABLES_FLAG} and matched by {hit} in {EXCLUDE_FLAG}: "
                "remove it from one of them"
            )
    return selection


def require_exact(selection: TableSelection, command: str) -> tuple[TableName, ...]:
    """The exact tables of --tables, for a command that acts on named tables only (`cdc-sink
    rebuild`): a pattern is a ConfigError naming the command and the fix."""
    if selection.patterns and not selection.default:
        raise ConfigError(
            f"{command} needs exact table names in {TABLES_FLAG}, not the pattern {selection.patterns[0]}: "
            "name each table (schema.table)"
        )
    return selection.names
