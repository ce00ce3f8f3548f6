"""Topic naming: `<prefix>.<schema>.<table>`, reversible for any PostgreSQL identifier.

Kafka topic names allow only ASCII letters, digits, '.', '_' and '-'. Letters, digits and '_' stay
as they are; every other character (including '-' and '.') becomes '-' followed by the two hex digits
of each of its UTF-8 bytes, so `public.person` stays `cdc.public.person` and `"Order Items"` becomes
`cdc.public.Order-20Items`. The mapping is injective: two tables never share a topic.
"""

import re
from collections.abc import Iterable

from pg_kafka_cdc.common.errors import ConfigError
from pg_kafka_cdc.common.tables import TableName

MAX_TOPIC_LENGTH = 249
DLQ_SUFFIX = ".dlq"
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_ESCAPE = re.compile(r"-([0-9A-F]{2})")


def encode_identifier(ident: str) -> str:
    """One identifier as a topic name component."""
    if all(c in _PLAIN for c in ident):
        return ident
    return "".join(c if c in _PLAIN else "".join(f"-{b:02X}" for b in c.encode()) for c in ident)


def decode_identifier(part: str) -> str:
    """The inverse of encode_identifier."""
    if "-" not in part:
        return part
    raw = bytearray()
    i = 0
    while i < len(part):
        if part[i] == "-":
            raw.append(int(part[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(part[i].encode())
            i += 1
    return raw.decode()


def topic_for(prefix: str, table: TableName) -> str:
    """The topic that carries the changes of `table`."""
    topic = f"{prefix}.{encode_identifier(table.schema)}.{encode_identifier(table.name)}"
    if len(topic) > MAX_TOPIC_LENGTH - len(DLQ_SUFFIX):  # room for its dead-letter topic
        raise ConfigError(
            f"the topic name for table {table} would be longer than Kafka's {MAX_TOPIC_LENGTH} characters"
        )
    return topic


def table_for(prefix: str, topic: str) -> TableName | None:
    """The table a change topic belongs to, or None when `topic` is not a change topic of `prefix`."""
    if not topic.startswith(prefix + "."):
        return None
    parts = topic[len(prefix) + 1 :].split(".")
    if len(parts) != 2 or not all(parts):
        return None
    try:
        table = TableName(decode_identifier(parts[0]), decode_identifier(parts[1]))
    except (ValueError, UnicodeDecodeError, IndexError):
        return None
    # Only the names topic_for gives: `order-2024` is no table's topic, even if it decodes.
    return (
        table if f"{prefix}.{encode_identifier(table.schema)}.{encode_identifier(table.name)}" == topic else None
    )


def change_topic_pattern(prefix: str) -> str:
    """A librdkafka subscription regex for every change topic under `prefix` (not DLQ or state)."""
    return "^" + re.escape(prefix) + r"\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$"


def state_topic(prefix: str) -> str:
    """The source connector's own compacted state topic (slot identity, snapshot progress)."""
    return f"{prefix}._cdc_source_state"


def dlq_topic(topic: str) -> str:
    """Where the sink parks messages it cannot apply, with `--on-error dlq`."""
    return topic + DLQ_SUFFIX


def collisions(topics: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of distinct topics Kafka refuses to hold together: it treats '.' and '_' as the same
    character in topic names (`cdc.sales_eu.orders` and `cdc.sales.eu_orders` collide)."""
    seen: dict[str, str] = {}
    found = []
    for topic in sorted(set(topics)):
        folded = topic.replace(".", "_")
        other = seen.setdefault(folded, topic)
        if other != topic:
            found.append((other, topic))
    return found
