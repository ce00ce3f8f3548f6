"""Connection strings: parse, describe and mask them so a password never reaches a log line."""

import re

from psycopg2.extensions import parse_dsn

from pg_kafka_cdc.common.errors import ConfigError

_URI_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]*):(?P<password>[^@\s]*)@", re.IGNORECASE)
_KV_PASSWORD = re.compile(
    r"(?P<key>\b(?:password|sasl\.password|ssl\.key\.password)\s*=\s*)(?P<v>'(?:[^'\\]|\\.)*'|\S+)"
)
_QUERY_PASSWORD = re.compile(r"(?P<key>[?&]password=)(?P<v>[^&\s]*)", re.IGNORECASE)


def mask(text: str) -> str:
    """Replace every password-looking part of `text` (URIs, key=value pairs, query strings) with ***."""
    text = _URI_PASSWORD.sub(r"\g<scheme>:***@", text)
    text = _KV_PASSWORD.sub(r"\g<key>***", text)
    return _QUERY_PASSWORD.sub(r"\g<key>***", text)


def parse(dsn: str, setting: str) -> dict[str, str]:
    """The DSN's parts as libpq reads them; a malformed DSN is a ConfigError naming the setting."""
    try:
        return parse_dsn(dsn)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "malformed"
        raise ConfigError(
            f"{setting} is not a valid PostgreSQL connection string ({first}): {mask(dsn)}"
        ) from None


def describe(dsn: str) -> str:
    """A short, password-free description of where a DSN points: user@host:port/dbname."""
    try:
        parts = parse_dsn(dsn)
    except Exception:
        return mask(dsn)
    host = parts.get("host", "localhost")
    port = parts.get("port", "5432")
    user = parts.get("user", "")
    db = parts.get("dbname", user)
    return f"{user + '@' if user else ''}{host}:{port}/{db}"
