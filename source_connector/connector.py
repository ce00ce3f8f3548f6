"""cdc-source, start to end: check the source, prepare topics, find or create the slot (with its
initial snapshot), then stream. One place decides the order, as Debezium's coordinator does."""

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import psycopg2
from confluent_kafka import Producer
from psycopg2 import sql

from cdc_common.errors import ConfigError, SourceError
from cdc_common.kafka import HISTORY_TOPIC_CONFIG, admin_client, ensure_topics, wait_for_kafka
from cdc_common.lsn import int_to_lsn
from cdc_common.pg import connect_source, is_connection_loss
from cdc_common.service import OpsServer
from cdc_common.settings import KAFKA_CLIENT_LOG, Settings
from cdc_common.signals import StopFlag
from cdc_common.snapshots import parse_snapshot
from schemas.topics import collisions, state_topic
from schemas.values import output_text
from source_connector.catalog import Catalog
from source_connector.events import EventBuilder, snapshot_values
from source_connector.metrics import collect
from source_connector.slot import ServerInfo, check_slot, create_slot, drop_slot, get_slot, server_info
from source_connector.snapshot import publish_snapshot
from source_connector.state import STATE_TOPIC_CONFIG, SourceState, clear_state, read_state, state_key
from source_connector.stream import HEARTBEAT_PREFIX, Stream, add_tables_option
from source_connector.table_info import TableInfo

log = logging.getLogger("source")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class SourceOptions:
    slot: str = "cdc_slot"
    snapshot: str = "initial"
    partitions: int = 1
    replication_factor: int = 1
    topic_config: tuple[tuple[str, str], ...] = ()
    kafka_timeout: float = 60.0
    heartbeat_interval: float = 0.0
    max_in_flight: int = 100_000
    metrics_port: int = 0


def producer_config(settings: Settings, options: SourceOptions, errors: Counter[str]) -> dict[str, Any]:
    last_logged: dict[str, float] = {}

    def on_error(err: Any) -> None:
        errors[err.name()] += 1
        now = time.monotonic()
        if now - last_logged.get(err.name(), 0.0) > 30:
            last_logged[err.name()] = now
            log.warning("Kafka: %s", err.str())

    return settings.kafka_config(
        **{
            "client.id": "cdc-source",
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": "lz4",
            "linger.ms": 5,
            "batch.num.messages": 10_000,
            "batch.size": 1_048_576,
            "queue.buffering.max.messages": options.max_in_flight,
            "queue.buffering.max.kbytes": 65_536,
            "message.timeout.ms": 0,  # never give up on a message: Kafka down means wait, not lose
            "message.max.bytes": MAX_MESSAGE_BYTES,
            "partitioner": "murmur2_random",
            "error_cb": on_error,
            "logger": KAFKA_CLIENT_LOG,
        }
    )


T = TypeVar("T")


def read_if_visible(conn: Any, query: sql.Composable, xid: int | None) -> list[Any] | None:
    """`[row]` (row None when there is none) read by `query` in a snapshot that sees transaction
    `xid`, or None when that transaction is not visible yet."""
    with conn.cursor() as cur:
        cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            cur.execute("SELECT pg_current_snapshot()::text")
            if xid is not None and not parse_snapshot(cur.fetchone()[0]).visible(xid):
                return None
            cur.execute(query)
            return [cur.fetchone()]
        finally:
            if not conn.closed:
                cur.execute("ROLLBACK")


class SourceConnector:
    def __init__(self, settings: Settings, options: SourceOptions, stop: StopFlag) -> None:
        self.settings = settings
        self.options = options
        self.stop = stop
        self.kafka_errors: Counter[str] = Counter()
        self.nan_logged: set[tuple[str, str]] = set()
        self.nan_counts: Counter[tuple[str, str]] = Counter()
        self.refetched: Counter[str] = Counter()
        self.snapshot_rows: Counter[str] = Counter()
        self.builder: EventBuilder | None = None
        self.slot_state: tuple[str | None, int | None, int | None] = (
            None,
            None,
            None,
        )  # wal_status, safe, retained
        self.wal_warned: str | None = None
        self.partition_counts: dict[str, int] = {}
        self.stream: Stream | None = None
        self.conn: Any = None  # the connector's own connection (catalog, read-backs, heartbeat)
        self.catalog: Catalog

    # --- pieces ----------------------------------------------------------------------------

    def _topic_config(self) -> dict[str, str]:
        return {
            **HISTORY_TOPIC_CONFIG,
            "max.message.bytes": str(MAX_MESSAGE_BYTES),
            **dict(self.options.topic_config),
        }

    def _ensure_topic(self, info: TableInfo) -> None:
        if info.topic not in self.partition_counts:
            self.partition_counts.update(
                ensure_topics(
                    self.admin,
                    [info.topic],
                    self.options.partitions,
                    self.options.replication_factor,
                    self._topic_config(),
                )
            )

    def _on_source(self, work: Callable[[Any], T]) -> T:
        """`work(connection)` on the connector's own (not the replication) connection, with a new
        connection when the old one was lost: the stream reconnects by itself, and so must this."""
        for attempt in range(2):
            if self.conn.closed:
                self.conn = connect_source(self.settings.source_dsn, application_name="cdc-source")
                self.catalog.conn = self.conn
            try:
                return work(self.conn)
            except psycopg2.Error as exc:
                if attempt or not is_connection_loss(exc):
                    raise
                with contextlib.suppress(Exception):
                    self.conn.close()
        raise AssertionError("unreachable")

    def _lookup(self, schema: str, name: str, refresh: bool) -> TableInfo | None:
        info = self._on_source(lambda conn: self.catalog.lookup(schema, name, refresh))
        if info is not None:
            self._ensure_topic(info)
        return info

    def _partitions(self, topic: str) -> int:
        metadata = self.admin.list_topics(topic, timeout=10)
        if topic in metadata.topics and metadata.topics[topic].partitions:
            self.partition_counts[topic] = len(metadata.topics[topic].partitions)
        return self.partition_counts[topic]

    def _on_nan(self, info: TableInfo, column: str) -> None:
        # Once per table AND column: once per table only ever named the first column that lost a
        # value, so losses in the table's other columns went unreported.
        self.nan_counts[(str(info.name), column)] += 1
        if (str(info.name), column) not in self.nan_logged:
            self.nan_logged.add((str(info.name), column))
            log.warning(
                "column %s of %s is NOT NULL but arrived as null: wal2json (before 2.6) prints NaN and Infinity "
                "as null, so the value is lost in the stream; such rows will fail at the target until updated "
                "(logged once per column, counted in cdc_source_nan_nulls_total)",
                column,
                info.name,
                extra={"table": str(info.name)},
            )

    def _refetch(
        self, info: TableInfo, key: dict[str, Any], columns: list[str], xid: int | None
    ) -> dict[str, Any] | None:
        """The current values of `columns` in the row with `key` (a key change that did not carry
        unchanged TOASTed columns); None when the row is gone by now. Read in a snapshot that sees
        transaction `xid` (the key change): decoding can hand it over before it is visible."""
        self.refetched[str(info.name)] += 1
        # Literals, not parameters: output_text() holds a '%s' of its own.
        query = sql.SQL("SELECT {} FROM {} WHERE {}").format(
            sql.SQL(", ").join(output_text(c, info.types[c]) for c in columns),
            sql.Identifier(info.name.schema, info.name.name),
            sql.SQL(" AND ").join(
                sql.SQL("{} = {}::{}").format(
                    sql.Identifier(k),
                    sql.Literal(key[k] if isinstance(key[k], bool) else str(key[k])),
                    sql.SQL(info.types[k]),
                )
                for k in info.key
            ),
        )
        started = time.monotonic()
        next_log = started + 10
        while True:
            found = self._on_source(lambda conn: read_if_visible(conn, query, xid))
            if found is not None:
                break
            if self.stop:
                raise SourceError(
                    f"stopped while waiting for transaction {xid} to become visible; it will be re-read"
                )
            now = time.monotonic()
            if now >= next_log:
                next_log = now + 30
                log.warning(
                    "transaction %s is decoded but not visible for %.0f s (waiting for a synchronous "
                    "standby?): the read-back of a key change of %s waits for it",
                    xid,
                    now - started,
                    info.name,
                    extra={"table": str(info.name)},
                )
            self.stop.wait(0.05)
        [row] = found
        return None if row is None else snapshot_values(info, tuple(columns), row)

    def _write_state_now(self, state: SourceState) -> None:
        self.producer.produce(self.state_topic, state.encode(), state.key())
        if self.producer.flush(30) > 0:
            raise SourceError("Kafka did not acknowledge the connector's state record within 30 s")

    # --- the whole run -----------------------------------------------------------------------

    def run(self) -> None:
        port = self.options.metrics_port
        server = OpsServer(port, lambda: collect(self), self.health).start() if port else None
        try:
            self._run()
        finally:
            if server is not None:
                server.stop()

    def health(self) -> tuple[bool, str]:
        if self.stream is None:
            return True, "starting"
        return self.stream.health()

    def _check_slot(self) -> None:
        """Every 30 s: how much WAL the slot holds, and a warning when it is about to lose some."""

        def read(conn: Any) -> Any:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT wal_status, safe_wal_size, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint "
                    "FROM pg_replication_slots WHERE slot_name = %s",
                    (self.options.slot,),
                )
                return cur.fetchone()

        try:
            row = self._on_source(read)
        except Exception as exc:  # the stream reports a lost source; this check is only advisory
            log.debug("slot check failed: %s", exc)
            return
        if row is None:
            return
        self.slot_state = (row[0], row[1], row[2])
        if row[0] in ("extended", "unreserved", "lost") and row[0] != self.wal_warned:
            self.wal_warned = row[0]
            log.warning(
                "slot %s has wal_status %s: %s",
                self.options.slot,
                row[0],
                "its WAL is gone, changes were lost; rebuild with a new slot"
                if row[0] == "lost"
                else "it holds more WAL than max_wal_size and may lose it (max_slot_wal_keep_size); "
                "check that Kafka keeps up",
                extra={"slot": self.options.slot},
            )
        elif row[0] in ("reserved", None):
            self.wal_warned = None

    def _check_readable(self, infos: list[TableInfo]) -> None:
        """The snapshot and the key-change read-back SELECT from the tables: refuse before a slot exists."""
        with self.conn.cursor() as cur:
            for info in infos:
                cur.execute(
                    "SELECT has_table_privilege(format('%%I.%%I', %s::text, %s::text), 'SELECT')",
                    (info.name.schema, info.name.name),
                )
                if not cur.fetchone()[0]:
                    raise SourceError(
                        f"the source role may not read table {info.name}: GRANT SELECT ON {info.name} TO <role> "
                        "(see docs/roles.sql)"
                    )

    def _ensure_change_topics(self, infos: list[TableInfo]) -> None:
        """The tables' topics, created when missing (after the slot: a refused start leaves none)."""
        existing = self.admin.list_topics(timeout=10).topics
        wanted = {i.topic: i.name for i in infos}
        for a, b in collisions([*existing, *wanted]):
            if a in wanted or b in wanted:
                raise ConfigError(
                    f"topics {a} and {b} cannot both exist: Kafka treats '.' and '_' alike in topic names. "
                    "Rename one of the tables, or replicate them with separate --topic-prefix values"
                )
        self.partition_counts.update(
            ensure_topics(
                self.admin,
                [i.topic for i in infos],
                self.options.partitions,
                self.options.replication_factor,
                self._topic_config(),
            )
        )

    def _run(self) -> None:
        settings, options = self.settings, self.options
        self.conn = connect_source(
            settings.source_dsn,
            application_name="cdc-source",
        )
        server = server_info(self.conn)
        self.catalog = Catalog(self.conn, settings.topic_prefix)
        tables = self.catalog.tables(settings.tables)
        infos = [self.catalog.read(t) for t in tables]  # refuses tables that cannot be replicated
        for info in infos:
            self.catalog.cache[(info.name.schema, info.name.name)] = info
        self._check_readable(infos)

        self.admin = admin_client(settings)
        wait_for_kafka(settings, options.kafka_timeout, self.stop)
        self.state_topic = state_topic(settings.topic_prefix)
        ensure_topics(
            self.admin, [self.state_topic], 1, options.replication_factor, STATE_TOPIC_CONFIG, quiet=True
        )
        self.producer = Producer(producer_config(settings, options, self.kafka_errors))
        builder = self.builder = EventBuilder(
            settings.topic_prefix,
            server.database,
            options.slot,
            self._lookup,
            self._partitions,
            self._on_nan,
            self._refetch,
        )

        state, repl_conn = self._prepare_slot(server, infos, builder)
        self._ensure_change_topics(infos)
        log.info(
            "replicating %d tables of %s: %s",
            len(infos),
            server.database,
            ", ".join(str(i.name) for i in infos) or "(none yet)",
        )
        add_tables = add_tables_option([i.name for i in infos]) if settings.tables else ["public.*"]
        self.stream = Stream(
            settings,
            options.slot,
            add_tables,
            builder,
            self.producer,
            state,
            self.state_topic,
            self.stop,
            emit_heartbeat=self._heartbeat if options.heartbeat_interval > 0 else None,
            heartbeat_interval=options.heartbeat_interval,
        )
        self.stream.periodic = self._check_slot
        self.stream.run(repl_conn)
        self.producer.flush(30)

    def _heartbeat(self) -> None:
        def emit(conn: Any) -> None:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_logical_emit_message(false, %s, %s)", (HEARTBEAT_PREFIX, str(time.time())))

        try:
            self._on_source(emit)
        except Exception as exc:  # a heartbeat is best effort; the stream reports real failures
            log.warning("heartbeat failed: %s", exc)

    def _prepare_slot(
        self, server: ServerInfo, infos: list[TableInfo], builder: EventBuilder
    ) -> tuple[SourceState, Any]:
        """Find the slot and the connector's state and decide: stream on, or create and snapshot."""
        slot_name = self.options.slot
        key = state_key(server.system_id, server.database, slot_name)
        state = read_state(self.settings, self.state_topic, key)
        slot = get_slot(self.conn, slot_name)
        if slot is not None:
            check_slot(slot, server.database)
            confirmed = slot.confirmed_flush_lsn or 0
            if state is None:
                log.warning(
                    "slot %s existed before this connector first used it: no initial snapshot is taken, "
                    "the topics start with the changes after %s",
                    slot_name,
                    int_to_lsn(confirmed),
                    extra={"slot": slot_name},
                )
                state = SourceState(
                    slot_name, server.database, server.system_id, "skipped", confirmed, confirmed, confirmed
                )
                self._write_state_now(state)
                return state, None
            if state.snapshot == "started":
                if confirmed != state.snapshot_lsn:
                    raise SourceError(
                        f"slot {slot_name} moved ({int_to_lsn(confirmed)}) while its initial snapshot "
                        f"(at {int_to_lsn(state.snapshot_lsn)}) never finished: something else consumed it. "
                        f"Run `cdc-source drop-slot --slot {slot_name}` to start over"
                    )
                log.info(
                    "the initial snapshot did not finish last time: dropping slot %s and starting over",
                    slot_name,
                )
                drop_slot(self.conn, slot_name)
                slot = None
            elif confirmed > state.bound_lsn:
                raise SourceError(
                    f"slot {slot_name} is at {int_to_lsn(confirmed)}, past the last position this connector "
                    f"confirmed ({int_to_lsn(state.bound_lsn)}): it was dropped and recreated, or consumed by "
                    "another client, so changes in between are missing from the topics. To start over with a "
                    f"fresh snapshot run `cdc-source drop-slot --slot {slot_name}`, then rebuild the target"
                )
            else:
                log.info(
                    "resuming slot %s from %s",
                    slot_name,
                    int_to_lsn(max(confirmed, state.confirmed_lsn)),
                    extra={"slot": slot_name},
                )
                return state, None
        elif state is not None and state.snapshot != "started":
            raise SourceError(
                f"slot {slot_name} is gone: it was dropped while this connector was stopped (it had confirmed "
                f"{int_to_lsn(state.confirmed_lsn)}), so changes since then are lost from the WAL. To start over "
                f"with a fresh snapshot run `cdc-source drop-slot --slot {slot_name}`, then rebuild the target"
            )
        restart = state is not None and state.snapshot == "started"
        return self._create_slot(server, infos, builder, restart), None

    def _create_slot(
        self, server: ServerInfo, infos: list[TableInfo], builder: EventBuilder, restart: bool
    ) -> SourceState:
        slot_name = self.options.slot
        repl = connect_source(
            self.settings.source_dsn,
            application_name="cdc-source",
            replication=True,
        )
        consistent, snapshot_name = create_slot(repl.cursor(), slot_name)
        self._ensure_change_topics(infos)
        initial = self.options.snapshot == "initial"
        state = SourceState(
            slot_name,
            server.database,
            server.system_id,
            "started" if initial else "skipped",
            consistent,
            consistent,
            consistent,
        )
        log.info("created slot %s at %s", slot_name, int_to_lsn(consistent), extra={"slot": slot_name})
        if initial:
            self._write_state_now(state)
            snap_conn = connect_source(
                self.settings.source_dsn,
                application_name="cdc-source snapshot",
                autocommit=False,
            )
            try:
                rows = publish_snapshot(
                    snap_conn,
                    snapshot_name,
                    consistent,
                    infos,
                    builder,
                    self.producer,
                    self.stop,
                    self.snapshot_rows,
                    restart,
                )
            finally:
                snap_conn.close()
            log.info("initial snapshot published: %d rows of %d tables", rows, len(infos))
            state = replace(state, snapshot="done")
        repl.close()
        self._write_state_now(state)
        return state

    def drop(self) -> bool:
        """`cdc-source drop-slot`: drop the slot and forget the connector's state for it."""
        conn = connect_source(
            self.settings.source_dsn,
            application_name="cdc-source",
        )
        server = server_info(conn)
        dropped = drop_slot(conn, self.options.slot)
        admin = admin_client(self.settings)
        wait_for_kafka(self.settings, self.options.kafka_timeout, self.stop)
        topic = state_topic(self.settings.topic_prefix)
        if topic in admin.list_topics(timeout=10).topics:
            producer = Producer(
                self.settings.kafka_config(**{"client.id": "cdc-source", "logger": KAFKA_CLIENT_LOG})
            )
            clear_state(producer, topic, state_key(server.system_id, server.database, self.options.slot))
        conn.close()
        return dropped
