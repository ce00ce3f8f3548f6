"""Command-line options: every setting is a flag and an environment variable, declared once."""

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
Decorator = Callable[[F], F]


def option(flag: str, envvar: str | None, default: Any, help_text: str, kind: Any = None, **extra: Any) -> Any:
    """`flag` with its environment variable `envvar`."""
    return click.option(flag, envvar=envvar, type=kind, default=default, help=help_text, **extra)


def with_options(options: Sequence[Any]) -> Callable[[F], F]:
    """A decorator that adds `options` to a click command, in the order given (as `--help` lists them)."""

    def add(func: F) -> F:
        for declared in reversed(options):
            func = declared(func)
        return func

    return add


# The connectors' own options that both have.
KAFKA_TIMEOUT = option(
    "--kafka-timeout",
    "KAFKA_TIMEOUT",
    60.0,
    "Seconds to keep retrying an unreachable Kafka at start-up.",
    click.FloatRange(min=0),
)
METRICS_PORT = option(
    "--metrics-port",
    "METRICS_PORT",
    0,
    "Serve Prometheus /metrics and /healthz on this port (0: off).",
    click.IntRange(min=0, max=65535),
)
