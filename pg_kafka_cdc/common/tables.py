"""Table names as the user writes them (`schema.table`, PostgreSQL identifier rules) and as values."""

from dataclasses import dataclass

from pg_kafka_cdc.common.errors import ConfigError


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


def _split_identifiers(text: str) -> list[list[str]]:
    """Split `a.b, "c,d".e` into [[a, b], [c,d, e]]: commas and dots outside double quotes separate."""
    names: list[list[str]] = []
    parts: list[str] = []
    current: list[str] = []
    quoted_part = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            end = i + 1
            buf = []
            while True:
                if end >= len(text):
                    raise ConfigError(f"unterminated quoted identifier in table list: {text!r}")
                if text[end] == '"':
                    if end + 1 < len(text) and text[end + 1] == '"':
                        buf.append('"')
                        end += 2
                        continue
                    break
                buf.append(text[end])
                end += 1
            current.append("".join(buf))
            quoted_part = True
            i = end + 1
            continue
        if ch in ".,":
            parts.append(_finish(current, quoted_part, text))
            current, quoted_part = [], False
            if ch == ",":
                names.append(parts)
                parts = []
        elif not ch.isspace():
            if quoted_part:
                raise ConfigError(f"unexpected {ch!r} after a quoted identifier in table list: {text!r}")
            current.append(ch)
        i += 1
    parts.append(_finish(current, quoted_part, text))
    names.append(parts)
    return names


def _finish(current: list[str], quoted: bool, text: str) -> str:
    ident = "".join(current)
    if not ident and not quoted:
        raise ConfigError(f"empty name in table list: {text!r}")
    return ident if quoted else ident.lower()


def parse_tables(text: str | None) -> tuple[TableName, ...]:
    """Parse `--tables`: comma-separated `schema.table`, unquoted names fold to lower case, quoted
    names are exact (`public."Order Items"`), a bare `table` means `public.table`."""
    if text is None or not text.strip():
        return ()
    result: list[TableName] = []
    for parts in _split_identifiers(text.strip()):
        if len(parts) == 1:
            result.append(TableName("public", parts[0]))
        elif len(parts) == 2:
            result.append(TableName(parts[0], parts[1]))
        else:
            raise ConfigError(f"table names are schema.table; got {'.'.join(parts)!r} in {text!r}")
    return tuple(dict.fromkeys(result))
