"""cdc-source, start to end: check the source, prepare Kafka, decide how to start from the slot and
the connector's own record (start.py), take the initial snapshot when the slot is new, then stream.
One place decides the order, as Debezium's coordinator does; the pieces live in their own modules."""

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from confluent_kafka import Producer

from pg_kafka_cdc.common.catalog import table_now
from pg_kafka_cdc.common.errors import SourceError
from pg_kafka_cdc.common.kafka import admin_client, ensure_topics, wait_for_kafka
from pg_kafka_cdc.common.lsn import int_to_lsn
from pg_kafka_cdc.common.pg import connect_source
from pg_kafka_cdc.common.service import serving
from pg_kafka_cdc.common.settings import KAFKA_CLIENT_LOG, Settings
from pg_kafka_cdc.common.signals import StopFlag
from pg_kafka_cdc.common.tables import TableName
from schemas.envelope import SchemaChange, stream_id
from schemas.signals import snapshot_request
from schemas.topics import state_topic
from schemas.transactions import transaction_topic
from source_connector.catalog import Catalog
from source_connector.change_topics import MAX_MESSAGE_BYTES, ChangeTopics
from source_connector.confirm import Confirmer
from source_connector.events import EventBuilder
from source_connector.heartbeat import Heartbeat, emit_heartbeat
from source_connector.held import held_transactions, replay_of, topics_holding
from source_connector.incremental import Incremental, Request, emit
from source_connector.losses import NanLosses
from source_connector.metrics import collect
from source_connector.oversized import PRODUCER_SIZE_SETTINGS
from source_connector.published_shapes import PublishedShapes, is_shape_key
from source_connector.publisher import Publisher, SizeLimits
from source_connector.readback import ReadBack
from source_connector.replay import Replay
from source_connector.scope import wal2json_filter
from source_connector.session import SourceSession
from source_connector.shapes import renamed_key
from source_connector.slot import ServerInfo, check_plugin_allowed, create_slot, drop_slot, get_slot, server_info
from source_connector.slot_wait import reporting_waits
from source_connector.slot_watch import SlotWatch
from source_connector.snapshot import publish_snapshot
from source_connector.start import Adopt, Create, Refuse, Restart, Resume, decide
from source_connector.state import (
    STATE_TOPIC_CONFIG,
    SourceState,
    clear_state,
    decode_state,
    read_records,
    state_key,
    write_state,
)
from source_connector.stream import Stream
from source_connector.table_info import TableInfo
from source_connector.transactions import TransactionRecords

log = logging.getLogger("source")


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
    transaction_metadata: bool = False  # BEGIN and END records on <prefix>.transaction


# How cdc-source produces (bench/kafka_transactions.py measures the same settings).
PRODUCER_TUNING: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": 5,
    "batch.num.messages": 10_000,
    "batch.size": 1_048_576,
}


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
            **PRODUCER_TUNING,
            "queue.buffering.max.messages": options.max_in_flight,
            "queue.buffering.max.kbytes": 65_536,
            "message.timeout.ms": 0,  # never give up on a message: Kafka down means wait, not lose
            "message.max.bytes": MAX_MESSAGE_BYTES,
            "partitioner": "murmur2_random",
            "error_cb": on_error,
            "logger": KAFKA_CLIENT_LOG,
            **{k: v for k, v in settings.kafka.items() if k in PRODUCER_SIZE_SETTINGS},
        }
    )


def check_readable(conn: Any, infos: list[TableInfo]) -> None:
    """The snapshot and the key-change read-back SELECT from the tables: refuse before a slot exists."""
    with conn.cursor() as cur:
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


def partition_truncated(info: TableInfo, partition: TableName) -> None:
    log.warning(
        "TRUNCATE of %s alone is not replicated (%s is replicated as a whole): the target keeps its rows; "
        "DELETE FROM %s instead would replicate their removal",
        partition,
        info.name,
        partition,
        extra={"table": str(info.name)},
    )


@dataclass
class Source:
    """What the start found on the source: the server, the own connection, the tables."""

    server: ServerInfo
    session: SourceSession
    catalog: Catalog
    infos: list[TableInfo]


class SourceConnector:
    def __init__(self, settings: Settings, options: SourceOptions, stop: StopFlag) -> None:
        self.settings = settings
        self.options = options
        self.stop = stop
        self.kafka_errors: Counter[str] = Counter()
        self.nan = NanLosses()
        self.snapshot_rows: Counter[str] = Counter()
        self.builder: EventBuilder | None = None
        self.readback: ReadBack | None = None
        self.watch: SlotWatch | None = None
        self.stream: Stream | None = None
        self.producer: Any = None
        self.publisher: Publisher | None = None
        self.incremental: Incremental | None = None
        self.records: TransactionRecords | None = None
        # This process began the slot's stream (created the slot, or adopted one no cdc-source had
        # streamed from): no earlier process can have messages of it still on their way to Kafka.
        self.began_stream = False
        self.snapshotted: set[TableName] = set()  # tables whose topics hold their snapshot (or all changes)
        self.state_records: dict[bytes, bytes | None] = {}  # the state topic as read at start
        self.resumed_at: int | None = None  # where streaming resumed an earlier run's slot
        self.shapes: PublishedShapes | None = None

    def run(self) -> None:
        with serving(self.options.metrics_port, lambda: collect(self), self.health):
            self._run()

    def health(self) -> tuple[bool, str]:
        if self.publisher is not None and (problem := self.publisher.problem()) is not None:
            return False, problem
        if self.stream is None:
            return True, "starting"
        return self.stream.health()

    def _run(self) -> None:
        source = self._open_source()
        admin = admin_client(self.settings)
        wait_for_kafka(self.settings, self.options.kafka_timeout, self.stop)
        topic = state_topic(self.settings.topic_prefix)
        ensure_topics(admin, [topic], 1, self.options.replication_factor, STATE_TOPIC_CONFIG, quiet=True)
        config = producer_config(self.settings, self.options, self.kafka_errors)
        self.producer = Producer(config)
        publisher = self.publisher = Publisher(self.producer, self.stop, SizeLimits(admin, config))
        topics = ChangeTopics(
            admin, self.options.partitions, self.options.replication_factor, self.options.topic_config
        )
        if self.options.transaction_metadata:
            records_topic = transaction_topic(self.settings.topic_prefix)
            topics.transactions = records_topic
            self.records = TransactionRecords(self.settings.topic_prefix, records_topic)
        builder = self.builder = self._builder(source, topics)
        state = self._start(source, builder, publisher, topics, topic)
        self._published_shapes(source, state, topic)
        topics.ensure(source.infos)
        state, requests = self._added_tables(source, state)
        log.info(
            "replicating %d tables of %s: %s",
            len(source.infos),
            source.server.database,
            ", ".join(str(i.name) for i in source.infos) or "(none yet)",
        )
        confirmer = Confirmer(self.producer, state, topic)
        if self.options.snapshot == "initial":
            self.incremental = self._incremental(source, builder, publisher, confirmer, requests)
        self._stream(source, builder, publisher, confirmer, topics)
        self.producer.flush(30)

    def _added_tables(self, source: Source, state: SourceState) -> tuple[SourceState, list[Request]]:
        """Tables in scope whose topics do not hold their rows yet (added to --tables, or created
        under a pattern while the connector was stopped): snapshotted while streaming. A state record
        of an older version lists none: every table in scope then counts as snapshotted."""
        names = [i.name for i in source.infos]
        if state.tables is None:
            state = replace(state, tables=[[t.schema, t.name] for t in names])
        self.snapshotted = {TableName(*t) for t in state.tables or ()}
        requests = [Request.decode(r) for r in state.incremental]
        if self.options.snapshot != "initial":
            self.snapshotted |= set(names)
            return replace(state, tables=[[t.schema, t.name] for t in sorted(self.snapshotted)]), []
        queued = {r.table for r in requests}
        added = [i for i in source.infos if i.name not in self.snapshotted and i.name not in queued]
        holding = topics_holding(self.settings, [i.topic for i in added]) if added else set()
        for info in added:
            log.info(
                "%s is new in the scope: its rows are read while streaming goes on (a snapshot in chunks)%s",
                info.name,
                "; its topic holds older messages, so it starts with a truncate event"
                if info.topic in holding
                else "",
                extra={"table": str(info.name)},
            )
            requests.append(Request(info.name, None, info.topic in holding))
        return replace(state, incremental=[r.encode() for r in requests]), requests

    def _incremental(
        self,
        source: Source,
        builder: EventBuilder,
        publisher: Publisher,
        confirmer: Confirmer,
        requests: list[Request],
    ) -> Incremental:
        def lookup(table: TableName) -> TableInfo | None:
            info = source.session.run(lambda conn: source.catalog.lookup(table.schema, table.name, False))
            return info if info is not None and info.name == table else None

        def progress(pending: list[Request], done: list[TableName]) -> None:
            self.snapshotted.update(done)
            confirmer.record(
                tables=[[t.schema, t.name] for t in sorted(self.snapshotted)],
                incremental=[r.encode() for r in pending],
            )

        incremental = Incremental(
            self.options.slot,
            source.session,
            builder,
            publisher,
            lambda: confirmer.tracker,
            lookup,
            progress,
        )
        for request in requests:
            incremental.request(request)
        confirmer.record()  # the scope as it is now, before anything is streamed
        return incremental

    def _held_transactions(
        self, topics: ChangeTopics, builder: EventBuilder
    ) -> Callable[[int], dict[int, Counter[str]]]:
        """What the change topics hold of each transaction committed from a position on."""

        def read(since: int) -> dict[int, Counter[str]]:
            changes = {t: n for t, n in topics.counts.items() if t != topics.transactions}
            return held_transactions(self.settings, changes, builder.stream, since)

        return read

    def _held(self, topics: ChangeTopics) -> Callable[[], Replay]:
        """What the topics hold, read before each start of streaming; the first time, on a slot an
        earlier process streamed from, once they stopped growing (held.wait_settled)."""
        first = [not self.began_stream]

        def read() -> Replay:
            replay = replay_of(self.settings, topics.counts, topics.partitions, settle=first[0])
            first[0] = False
            return replay

        return read

    def _published_shapes(self, source: Source, state: SourceState, topic: str) -> None:
        """The tables as their changes were published up to where streaming resumes: the stream is
        compared with those, so a schema change made while cdc-source was stopped is published too."""
        shapes = self.shapes = PublishedShapes(self.producer, topic, state)
        shapes.load(self.state_records)
        self.state_records = {}
        for info in source.infos:
            published = shapes.as_published(info, self.resumed_at)
            if published is not info:
                source.catalog.known(published)
        shapes.flush()

    def _seen(self, info: TableInfo) -> None:
        """A table first met in the stream was created while streaming: the stream holds all its rows."""
        if self.shapes is not None and info.name not in self.shapes.histories:
            self.shapes.record(info, 0)
        if info.name not in self.snapshotted and self.incremental is not None:
            if any(r.table == info.name for r in self.incremental.queue):
                return
            self.snapshotted.add(info.name)
            self.incremental.progress(list(self.incremental.queue), [])

    def _open_source(self) -> Source:
        session = SourceSession(self.settings.source_dsn)
        server = server_info(session.conn)
        check_plugin_allowed(session.conn)
        catalog = Catalog(session.conn, self.settings.topic_prefix)
        session.on_reconnect = lambda conn: setattr(catalog, "conn", conn)
        catalog.on_new = self._seen
        infos = [catalog.read(t) for t in catalog.tables(self.settings.selection)]  # refuses what cannot be
        for info in infos:
            catalog.known(info)
        check_readable(session.conn, infos)
        return Source(server, session, catalog, infos)

    def _builder(self, source: Source, topics: ChangeTopics) -> EventBuilder:
        def lookup(schema: str, name: str, refresh: bool) -> TableInfo | None:
            info = None if refresh else source.catalog.cached(schema, name)
            if info is None:
                info = source.session.run(lambda conn: source.catalog.lookup(schema, name, refresh))
            if info is not None:
                topics.ensure_one(info)
            return info

        self.readback = readback = ReadBack(source.session, self.stop)
        return EventBuilder(
            self.settings.topic_prefix,
            source.server.database,
            self.options.slot,
            lookup,
            topics.partitions,
            self.nan,
            self.readback,
            partition_truncated,
            lambda table, xid: readback.catalog(lambda conn: table_now(conn, table), xid, table),
            source.catalog.remember,
            lambda old, new, change, lsn: self._schema_changed(source, old, new, change, lsn),
        )

    def _schema_changed(
        self, source: Source, old: TableInfo, new: TableInfo, change: SchemaChange, lsn: int | None
    ) -> None:
        """A schema-change event was built (in the transaction committed at `lsn`): keep the new shape,
        say what changed; a rewritten table is snapshotted again."""
        if self.shapes is not None and lsn is not None:
            self.shapes.record(new, lsn)
        parts = [f"renamed {r['from']} -> {r['to']}" for r in change["renamed"]]
        parts += [f"retyped {r['name']} {r['from']} -> {r['to']}" for r in change["retyped"]]
        parts += [f"dropped {n}" for n in change["dropped"]]
        parts += [f"added {a['name']} {a['type']}" for a in change["added"]]
        log.info("schema change of %s: %s", new.name, ", ".join(parts), extra={"table": new.label})
        for was, now in renamed_key(old, change):
            log.warning(
                "key column %s of %s was renamed to %s: the Kafka key's JSON of its changes changes with it "
                "(consumers keyed on the old name see new keys from here on)",
                was,
                new.name,
                now,
                extra={"table": new.label},
            )
        if not change["rewritten"]:
            return
        if self.incremental is None:
            log.warning(
                "%s was rewritten (its storage changed) with a schema change: rows no event carries may hold "
                "other values; no snapshot is taken (--snapshot is not initial)",
                new.name,
                extra={"table": new.label},
            )
            return
        log.info(
            "%s was rewritten (its storage changed) with a schema change: asking for a snapshot of it "
            "while streaming goes on",
            new.name,
            extra={"table": new.label},
        )
        request = snapshot_request(self.options.slot, [new.name])
        source.session.run(lambda conn: emit(conn, request))

    def _start(
        self, source: Source, builder: EventBuilder, publisher: Publisher, topics: ChangeTopics, topic: str
    ) -> SourceState:
        """Carry out the start decision: resume, adopt, or create the slot (and snapshot)."""
        name, server = self.options.slot, source.server
        self.state_records = read_records(self.settings, topic)
        state = decode_state(self.state_records.get(state_key(server.system_id, server.database, name)))
        decision = decide(name, get_slot(source.session.conn, name), state, server.database, server.system_id)
        if isinstance(decision, Refuse):
            raise SourceError(decision.reason)
        if isinstance(decision, Resume | Adopt):
            builder.stream = stream_id(server.system_id, name, decision.state.snapshot_lsn)
        if isinstance(decision, Resume):
            self.resumed_at = decision.at
            log.info("resuming slot %s from %s", name, int_to_lsn(decision.at), extra={"slot": name})
            return decision.state
        if isinstance(decision, Adopt):
            log.warning(
                "slot %s existed before this connector first used it: no initial snapshot is taken, "
                "the topics start with the changes after %s",
                name,
                int_to_lsn(decision.state.confirmed_lsn),
                extra={"slot": name},
            )
            write_state(self.producer, topic, decision.state)  # acknowledged before anything is streamed
            self.began_stream = True
            return decision.state
        if isinstance(decision, Restart):
            log.info("the initial snapshot did not finish last time: dropping slot %s and starting over", name)
            drop_slot(source.session.conn, name)
        restart = isinstance(decision, Restart) or (isinstance(decision, Create) and decision.restart)
        return self._create_slot(source, builder, publisher, topics, topic, restart)

    def _create_slot(
        self,
        source: Source,
        builder: EventBuilder,
        publisher: Publisher,
        topics: ChangeTopics,
        topic: str,
        restart: bool,
    ) -> SourceState:
        name, server = self.options.slot, source.server
        repl = connect_source(self.settings.source_dsn, application_name="cdc-source", replication=True)
        ours = [repl.get_backend_pid(), source.session.conn.get_backend_pid()]
        with reporting_waits(self.settings.source_dsn, name, ours):
            consistent, snapshot_name = create_slot(repl.cursor(), name)
        topics.ensure(source.infos)
        initial = self.options.snapshot == "initial"
        state = SourceState(
            name,
            server.database,
            server.system_id,
            "started" if initial else "skipped",
            consistent,
            consistent,
            consistent,
        )
        builder.stream = stream_id(server.system_id, name, consistent)
        self.began_stream = True
        log.info("created slot %s at %s", name, int_to_lsn(consistent), extra={"slot": name})
        if initial:
            write_state(self.producer, topic, state)
            self._snapshot(source, builder, publisher, snapshot_name, consistent, restart)
            state = replace(state, snapshot="done")
        repl.close()
        write_state(self.producer, topic, state)
        return state

    def _snapshot(
        self,
        source: Source,
        builder: EventBuilder,
        publisher: Publisher,
        name: str,
        consistent: int,
        restart: bool,
    ) -> None:
        holding = topics_holding(self.settings, [i.topic for i in source.infos])
        if holding and not restart:
            log.warning(
                "the topics of %d tables hold changes of an earlier slot: the snapshot starts each with a "
                "truncate event, so that a consumer replaying them drops what came before",
                len(holding),
            )
        conn = connect_source(self.settings.source_dsn, application_name="cdc-source snapshot", autocommit=False)
        try:
            rows = publish_snapshot(
                conn, name, consistent, source.infos, builder, publisher, self.snapshot_rows, holding
            )
        finally:
            conn.close()
        log.info("initial snapshot published: %d rows of %d tables", rows, len(source.infos))

    def _stream(
        self,
        source: Source,
        builder: EventBuilder,
        publisher: Publisher,
        confirmer: Confirmer,
        topics: ChangeTopics,
    ) -> None:
        interval = self.options.heartbeat_interval
        heartbeat = Heartbeat(interval, lambda: source.session.run(emit_heartbeat)) if interval > 0 else None
        catalog = source.catalog
        add_tables = wal2json_filter(catalog.scope, [i.name for i in source.infos], catalog.partitioned)
        self.watch = SlotWatch(source.session, self.options.slot)
        self.stream = Stream(
            self.settings,
            self.options.slot,
            add_tables,
            builder,
            publisher,
            confirmer,
            self.stop,
            heartbeat,
            self._held(topics),
            catalog.forget_unrouted,
            self.incremental,
            self.records,
            self._held_transactions(topics, builder) if self.records is not None else None,
        )
        if self.records is not None:
            self.records.stream = builder.stream
        self.stream.periodic = self.watch.check
        self.stream.run()


def drop(settings: Settings, options: SourceOptions, stop: StopFlag) -> bool:
    """`cdc-source drop-slot`: drop the slot and forget the connector's state for it."""
    conn = connect_source(settings.source_dsn, application_name="cdc-source")
    try:
        server = server_info(conn)
        dropped = drop_slot(conn, options.slot)
        admin = admin_client(settings)
        wait_for_kafka(settings, options.kafka_timeout, stop)
        topic = state_topic(settings.topic_prefix)
        if topic in admin.list_topics(timeout=10).topics:
            producer = Producer(settings.kafka_config(**{"client.id": "cdc-source", "logger": KAFKA_CLIENT_LOG}))
            key = state_key(server.system_id, server.database, options.slot)
            records = read_records(settings, topic)
            state = decode_state(records.get(key))
            shapes = (
                []
                if state is None
                else [k for k, v in records.items() if v is not None and is_shape_key(k, state)]
            )
            clear_state(producer, topic, key, shapes)
    finally:
        conn.close()
    return dropped
