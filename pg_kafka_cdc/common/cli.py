"""How every program starts and ends: logging set up, settings validated, expected errors printed
as one line without a stack trace, Ctrl-C turned into a quiet exit."""

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import orjson
import psycopg2.errors

from pg_kafka_cdc.common.dsn import mask
from pg_kafka_cdc.common.errors import CdcError
from pg_kafka_cdc.common.logs import setup_logging, use_json
from pg_kafka_cdc.common.memory import tune_collector
from pg_kafka_cdc.common.pg import error_reason
from pg_kafka_cdc.common.settings import Settings, settings_from
from pg_kafka_cdc.common.threads import share_gil

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def fail(program: str, message: str, json_lines: bool) -> None:
    """Print an expected failure as one line on stderr."""
    line = mask(" ".join(message.split()))
    if json_lines:
        sys.stderr.write(orjson.dumps({"level": "error", "component": program, "msg": line}).decode() + "\n")
    else:
        sys.stderr.write(f"{program}: error: {line}\n")
    sys.stderr.flush()


@contextmanager
def program(name: str, kwargs: dict[str, Any], error_exit: int = EXIT_ERROR) -> Iterator[Settings]:
    """Run a command body: yields the shared settings; turns CdcError into one line and an exit code."""
    log_format = kwargs.get("log_format", "auto")
    setup_logging(name, log_format, kwargs.get("log_level", "info"))
    tune_collector()
    share_gil()
    try:
        yield settings_from(kwargs)
    except CdcError as exc:
        logging.getLogger(name).debug("fatal", exc_info=True)
        fail(name, str(exc), use_json(log_format))
        sys.exit(error_exit)
    except psycopg2.errors.InsufficientPrivilege as exc:
        fail(
            name,
            f"permission denied: {error_reason(exc)}; grant it to the role in the DSN (see docs/roles.sql)",
            use_json(log_format),
        )
        sys.exit(error_exit)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


class DefaultGroup(click.Group):
    """A command group that runs `default` when no subcommand is named: `cdc-source --slot s`
    is `cdc-source run --slot s`, while `cdc-source drop-slot` picks the subcommand."""

    default = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = [self.default, *args]
        return super().parse_args(ctx, args)
