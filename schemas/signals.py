"""Requests written to the source's WAL for the cdc-source streaming from a slot: logical messages
(`pg_logical_emit_message`, non-transactional) with prefix SNAPSHOT_PREFIX, read back through the
slot. `cdc-source snapshot` and cdc-sink (after a column was added with a value it cannot know)
write them; the source's snapshot watermarks use the same prefix."""

import orjson

from pg_kafka_cdc.common.tables import TableName

SNAPSHOT_PREFIX = "cdc-snapshot"


def snapshot_request(slot: str, tables: list[TableName]) -> str:
    """The message content asking the connector of `slot` to snapshot `tables` while streaming."""
    return orjson.dumps({"slot": slot, "snapshot": [[t.schema, t.name] for t in tables]}).decode()
