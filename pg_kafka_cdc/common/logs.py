"""Logging: readable lines on a terminal, JSON lines for machines; passwords masked in both.

Context such as the table or the position goes in `extra` (`log.info("...", extra={"table": t})`)
and is printed as key=value pairs in text, as fields in JSON.
"""

import logging
import sys
import time
from typing import Any

import orjson

from pg_kafka_cdc.common.dsn import mask

CONTEXT_FIELDS = ("table", "topic", "partition", "offset", "lsn", "slot", "group", "xid")


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {k: getattr(record, k) for k in CONTEXT_FIELDS if getattr(record, k, None) is not None}


class TextFormatter(logging.Formatter):
    """`14:02:03.123 INFO  source  message  table=public.person lsn=0/16B3748`."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        context = " ".join(f"{k}={v}" for k, v in _context(record).items())
        line = f"{stamp} {record.levelname:<7} {self.component}  {record.getMessage()}"
        if context:
            line += f"  {context}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return mask(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, component, logger, msg and the context fields."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "msg": mask(record.getMessage()),
            **{k: mask(str(v)) if isinstance(v, str) else v for k, v in _context(record).items()},
        }
        if record.exc_info:
            doc["exc"] = mask(self.formatException(record.exc_info))
        return orjson.dumps(doc, default=str).decode()


def use_json(log_format: str) -> bool:
    """`auto` means text on a terminal and JSON lines otherwise (a service manager, a file, a pipe)."""
    if log_format == "auto":
        return not sys.stderr.isatty()
    return log_format == "json"


def setup_logging(component: str, log_format: str = "auto", level: str = "info") -> None:
    """Route all logging to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component) if use_json(log_format) else TextFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("faker").setLevel(logging.WARNING)
    # librdkafka's own lines (a failed connect every few hundred ms) only with --log-level debug: the
    # connectors report Kafka errors through its error callback, the commands through their error.
    logging.getLogger("kafka.client").setLevel(logging.DEBUG if level.lower() == "debug" else logging.CRITICAL)


class Every:
    """Paces a repeated log line: `due(now)` is true the first time `first` seconds after the start,
    then at most once per `interval` seconds."""

    def __init__(self, interval: float, first: float = 0.0, start: float | None = None) -> None:
        self.interval = interval
        self.next = (time.monotonic() if start is None else start) + first

    def due(self, now: float) -> bool:
        if now < self.next:
            return False
        self.next = now + self.interval
        return True
