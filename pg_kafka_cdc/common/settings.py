"""Settings shared by every program: each a flag and an environment variable, defaulting to the
local stack, so one environment file configures the whole pipeline."""

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import click

from pg_kafka_cdc.common.dsn import mask, parse
from pg_kafka_cdc.common.errors import ConfigError
from pg_kafka_cdc.common.options import option, with_options
from pg_kafka_cdc.common.tables import TableName, TableSelection, parse_selection

DEFAULT_SOURCE_DSN = "postgresql://postgres:postgres@127.0.0.1:5432/testdb"
DEFAULT_TARGET_DSN = "postgresql://postgres:postgres@127.0.0.1:5433/testdb"
DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_TOPIC_PREFIX = "cdc"

# Environment variables passed through to librdkafka: KAFKA_SASL_USERNAME -> sasl.username.
KAFKA_PASSTHROUGH_PREFIXES = ("KAFKA_SECURITY_", "KAFKA_SASL_", "KAFKA_SSL_", "KAFKA_CLIENT_ID")
SECRET_KAFKA_KEYS = frozenset({"sasl.password", "ssl.key.password", "ssl.keystore.password"})


class _Throttle(logging.Filter):
    """librdkafka repeats a failing connect every few hundred ms: one line per kind per 30 s."""

    def __init__(self, seconds: float = 30.0) -> None:
        super().__init__()
        self.seconds = seconds
        self.last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = record.getMessage().split("|")[0][:80] if "|" in record.getMessage() else record.getMessage()[:80]
        now = time.monotonic()
        if now - self.last.get(key, -1e9) < self.seconds:
            return False
        self.last[key] = now
        return True


# librdkafka prints its own log lines straight to stderr ("%3|...|FAIL|..."), dozens a second while
# the broker is unreachable: they would bypass the text/JSON log format and bury the one-line error.
# Given a `logger`, a client hands them to Python logging instead, when it is polled (the producer
# and consumers are; the admin client never is, and wait_for_kafka reports what it needs to).
KAFKA_CLIENT_LOG = logging.getLogger("kafka.client")
KAFKA_CLIENT_LOG.addFilter(_Throttle())


@dataclass(frozen=True)
class Settings:
    """What every program needs to find the pipeline's three services and its topics."""

    source_dsn: str = field(repr=False)
    target_dsn: str = field(repr=False)
    bootstrap_servers: str
    topic_prefix: str
    # The tables --tables names, when it names only exact tables; empty for the default scope and
    # when --tables holds a pattern (`selection` has the whole of --tables and --exclude-tables).
    tables: tuple[TableName, ...]
    kafka: Mapping[str, str] = field(repr=False, default_factory=dict)
    selection: TableSelection = field(default_factory=TableSelection)

    def kafka_config(self, **extra: Any) -> dict[str, Any]:
        """librdkafka configuration: bootstrap servers, pass-through security settings, then `extra`.
        librdkafka's own log lines go through Python logging (throttled), not straight to stderr."""
        return {"bootstrap.servers": self.bootstrap_servers, "logger": KAFKA_CLIENT_LOG, **self.kafka, **extra}

    def describe(self) -> dict[str, str]:
        """The settings as printable text, secrets masked."""
        return {
            "source_dsn": mask(self.source_dsn),
            "target_dsn": mask(self.target_dsn),
            "bootstrap_servers": self.bootstrap_servers,
            "topic_prefix": self.topic_prefix,
            "tables": str(self.selection),
            **{k: ("***" if k in SECRET_KAFKA_KEYS else v) for k, v in self.kafka.items()},
        }


def read_properties(path: str) -> dict[str, str]:
    """A Java-style properties file (key=value, # comments), as librdkafka settings."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the Kafka properties file {path}: {exc.strerror}") from None
    props: dict[str, str] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ConfigError(f"{path}:{number}: expected key=value, got {line!r}")
        props[key.strip()] = value.strip()
    return props


def kafka_from_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """librdkafka security settings from KAFKA_SECURITY_*, KAFKA_SASL_*, KAFKA_SSL_* variables."""
    return {
        name[len("KAFKA_") :].lower().replace("_", "."): value
        for name, value in environ.items()
        if name.startswith(KAFKA_PASSTHROUGH_PREFIXES) and value != ""
    }


def build_settings(
    source_dsn: str,
    target_dsn: str,
    bootstrap_servers: str,
    topic_prefix: str,
    tables: str | None,
    kafka_config: str | None,
    environ: Mapping[str, str] | None = None,
    exclude_tables: str | None = None,
) -> Settings:
    """Validate the shared flags into a Settings object (a ConfigError names the bad setting)."""
    parse(source_dsn, "--source-dsn / SOURCE_DSN")
    parse(target_dsn, "--target-dsn / TARGET_DSN")
    if not bootstrap_servers.strip():
        raise ConfigError("--bootstrap-servers / KAFKA_BOOTSTRAP_SERVERS is empty")
    prefix = topic_prefix.strip()
    if not prefix or any(not (c.isascii() and (c.isalnum() or c in "._-")) for c in prefix):
        raise ConfigError(f"--topic-prefix / TOPIC_PREFIX must be letters, digits, '.', '_' or '-': {prefix!r}")
    kafka = kafka_from_environment(os.environ if environ is None else environ)
    if kafka_config:
        kafka.update(read_properties(kafka_config))
    kafka.pop("bootstrap.servers", None)
    selection = parse_selection(tables, exclude_tables)
    exact = selection.names if selection.exact else ()
    return Settings(source_dsn, target_dsn, bootstrap_servers.strip(), prefix, exact, kafka, selection)


COMMON_OPTIONS = [
    option(
        "--source-dsn",
        "SOURCE_DSN",
        DEFAULT_SOURCE_DSN,
        "Source PostgreSQL connection string.",
        show_default=mask(DEFAULT_SOURCE_DSN),
    ),
    option(
        "--target-dsn",
        "TARGET_DSN",
        DEFAULT_TARGET_DSN,
        "Target PostgreSQL connection string.",
        show_default=mask(DEFAULT_TARGET_DSN),
    ),
    option(
        "--bootstrap-servers",
        "KAFKA_BOOTSTRAP_SERVERS",
        DEFAULT_BOOTSTRAP,
        "Kafka bootstrap servers.",
        show_default=True,
    ),
    option(
        "--topic-prefix",
        "TOPIC_PREFIX",
        DEFAULT_TOPIC_PREFIX,
        "Topics are <prefix>.<schema>.<table>.",
        show_default=True,
    ),
    option(
        "--tables",
        "TABLES",
        None,
        "Comma-separated schema.table list (quote names like SQL); * matches any characters of a part "
        "(sales.*, public.order_*). Default: every table of every non-system schema.",
    ),
    option(
        "--exclude-tables",
        "EXCLUDE_TABLES",
        None,
        "Tables left out of --tables (or of the default), written as --tables.",
    ),
    option(
        "--kafka-config",
        "KAFKA_CONFIG",
        None,
        "A properties file of extra librdkafka settings (TLS, SASL...).",
        click.Path(dir_okay=False),
    ),
    option(
        "--log-format",
        "LOG_FORMAT",
        "auto",
        "Log lines as text or JSON (auto: text on a terminal).",
        click.Choice(["auto", "text", "json"]),
        show_default=True,
    ),
    option(
        "--log-level",
        "LOG_LEVEL",
        "info",
        "Least severe log level printed.",
        click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        show_default=True,
    ),
]
common_options = with_options(COMMON_OPTIONS)  # the shared flags, with their environment variables


def settings_from(kwargs: dict[str, Any]) -> Settings:
    """Pop the shared flags out of a click command's keyword arguments and build Settings."""
    for key in ("log_format", "log_level"):
        kwargs.pop(key, None)
    return build_settings(
        kwargs.pop("source_dsn"),
        kwargs.pop("target_dsn"),
        kwargs.pop("bootstrap_servers"),
        kwargs.pop("topic_prefix"),
        kwargs.pop("tables"),
        kwargs.pop("kafka_config"),
        exclude_tables=kwargs.pop("exclude_tables", None),
    )
