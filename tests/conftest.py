"""Shared fixtures for the integration tests. They run against the real local stack (`make up`);
a missing service fails the test with a message saying so, it is never skipped."""

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg2
import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn

from tests.helpers import psql_rows, reap_started, wait_until

DEFAULT_SOURCE_ADMIN_DSN = "postgresql://postgres:postgres@127.0.0.1:5432/postgres"
DEFAULT_TARGET_ADMIN_DSN = "postgresql://postgres:postgres@127.0.0.1:5433/postgres"
DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


@dataclass(frozen=True)
class Stack:
    """Where the local stack's services are: admin connections to the `postgres` databases."""

    source_admin_dsn: str
    target_admin_dsn: str
    bootstrap_servers: str


@dataclass(frozen=True)
class Databases:
    """A fresh database of the same name on the source and the target server."""

    name: str
    source_dsn: str
    target_dsn: str


def _check_postgres(role: str, dsn: str) -> None:
    try:
        psycopg2.connect(dsn, connect_timeout=5).close()
    except psycopg2.Error as exc:
        reason = " ".join(str(exc).split())
    else:
        return
    parts = parse_dsn(dsn)
    pytest.fail(
        f"the {role} PostgreSQL does not answer at {parts.get('host')}:{parts.get('port')} ({reason}); "
        "run `make up` to start the local stack",
        pytrace=False,
    )


def admin_client(bootstrap_servers: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap_servers, "socket.timeout.ms": 5000})


def _check_kafka(bootstrap_servers: str) -> None:
    try:
        brokers = admin_client(bootstrap_servers).list_topics(timeout=5).brokers
    except KafkaException as exc:
        brokers, reason = {}, str(exc)
    else:
        reason = "no broker in the metadata"
    if not brokers:
        pytest.fail(
            f"Kafka does not answer at {bootstrap_servers} ({reason}); run `make up` to start the local stack",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def stack() -> Stack:
    """The running local stack; fails (never skips) when a service does not answer."""
    found = Stack(
        source_admin_dsn=os.environ.get("TEST_SOURCE_ADMIN_DSN", DEFAULT_SOURCE_ADMIN_DSN),
        target_admin_dsn=os.environ.get("TEST_TARGET_ADMIN_DSN", DEFAULT_TARGET_ADMIN_DSN),
        bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", DEFAULT_BOOTSTRAP),
    )
    _check_postgres("source", found.source_admin_dsn)
    _check_postgres("target", found.target_admin_dsn)
    _check_kafka(found.bootstrap_servers)
    return found


def _drop_slots(admin_dsn: str, database: str) -> None:
    """Drop the replication slots of `database`, stopping the walsenders that hold them first."""

    def remaining() -> list[tuple[str, int | None]]:
        return [
            (str(name), pid)
            for name, pid in psql_rows(
                admin_dsn,
                "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s",
                (database,),
            )
        ]

    def all_dropped() -> bool:
        for name, pid in remaining():
            if pid is not None:
                psql_rows(admin_dsn, "SELECT pg_terminate_backend(%s)", (pid,))
                continue  # the slot stays active until the walsender has exited
            try:
                psql_rows(admin_dsn, "SELECT pg_drop_replication_slot(%s)", (name,))
            except psycopg2.errors.ObjectInUse:  # taken again meanwhile: next round
                pass
            except psycopg2.errors.UndefinedObject:  # dropped by someone else
                pass
        return not remaining()

    wait_until(all_dropped, timeout=30, message=f"replication slots of {database} could not be dropped")


def _drop_database(admin_dsn: str, database: str) -> None:
    psql_rows(
        admin_dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (database,),
    )
    psql_rows(admin_dsn, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))


@pytest.fixture
def dbs(stack: Stack) -> Iterator[Databases]:
    """A fresh uniquely named database on both servers, dropped after the test with its slots."""
    name = f"t_{uuid.uuid4().hex[:8]}"
    servers = (stack.source_admin_dsn, stack.target_admin_dsn)
    created = []
    try:
        for admin_dsn in servers:
            psql_rows(admin_dsn, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            created.append(admin_dsn)
        yield Databases(
            name=name,
            source_dsn=make_dsn(stack.source_admin_dsn, dbname=name, user="postgres", password="postgres"),
            target_dsn=make_dsn(stack.target_admin_dsn, dbname=name, user="postgres", password="postgres"),
        )
    finally:
        if stack.source_admin_dsn in created:
            _drop_slots(stack.source_admin_dsn, name)
        for admin_dsn in created:
            _drop_database(admin_dsn, name)


def delete_topics_with_prefix(bootstrap_servers: str, prefix: str) -> None:
    admin = admin_client(bootstrap_servers)
    topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
    if topics:
        for future in admin.delete_topics(topics, operation_timeout=30).values():
            future.result()


@pytest.fixture
def topic_prefix(stack: Stack) -> Iterator[str]:
    """A unique topic prefix; every topic named `<prefix>.…` is deleted after the test."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    yield prefix
    delete_topics_with_prefix(stack.bootstrap_servers, prefix + ".")


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    """Background programs a test started and did not stop are killed, and the test fails."""
    yield
    leftovers = reap_started()
    assert not leftovers, f"the test left these programs running (now killed): {leftovers}"
