"""cdc-source's errors for source servers the shared test server cannot imitate: wal_level not
logical, no slots, wal2json missing, no free slot, slot in use, the
output-plugin allow-list refusing wal2json."""

from types import TracebackType
from typing import Any

import pytest

from pg_kafka_cdc.common.errors import CdcError, SourceError
from source_connector.slot import ServerInfo, replication_error, server_info


class FakeCursor:
    def __init__(self, row: tuple[Any, ...]) -> None:
        self.row = row
        self.queries: list[str] = []

    def __enter__(self) -> "FakeCursor":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def execute(self, query: str, params: Any = None) -> None:
        self.queries.append(query)

    def fetchone(self) -> tuple[Any, ...]:
        return self.row


class FakeConnection:
    """Answers server_info's one query with a fixed row."""

    def __init__(self, wal_level: str, max_replication_slots: int = 10) -> None:
        self.cur = FakeCursor(("testdb", "7312345678901234567", 150004, wal_level, max_replication_slots))

    def cursor(self) -> FakeCursor:
        return self.cur


class FakePgError(Exception):
    """What psycopg2 raises for a server error: a message and its SQLSTATE in `pgcode`."""

    def __init__(self, pgcode: str, message: str) -> None:
        super().__init__(message)
        self.pgcode = pgcode


def test_server_info_of_a_logical_server() -> None:
    assert server_info(FakeConnection("logical")) == ServerInfo(
        "testdb", "7312345678901234567", 150004, "logical", 10
    )


@pytest.mark.parametrize("level", ["replica", "minimal"])
def test_wal_level_not_logical_is_refused_with_the_fix(level: str) -> None:
    with pytest.raises(SourceError) as caught:
        server_info(FakeConnection(level))
    message = str(caught.value)
    assert f"wal_level = {level}" in message
    assert "wal_level = logical" in message and "restart" in message
    assert "\n" not in message


def test_no_replication_slots_is_refused_with_the_fix() -> None:
    with pytest.raises(SourceError, match=r"max_replication_slots = 0.*restart"):
        server_info(FakeConnection("logical", max_replication_slots=0))


@pytest.mark.parametrize(
    ("code", "reason", "fragments"),
    [
        (
            "58P01",
            'could not access file "wal2json": No such file or directory',
            ["wal2json output plugin is not installed", "postgresql-15-wal2json"],
        ),
        (
            "53400",
            "all replication slots are in use",
            ["no free replication slot", "all replication slots are in use", "max_replication_slots"],
        ),
        (
            "55006",
            'replication slot "s1" is active for PID 4242',
            ["replication slot s1 is in use by another process", "PID 4242", "--slot"],
        ),
        (
            "42501",
            'library "wal2json" may not be used as an output plugin HINT: If it is safe for all REPLICATION '
            'users to use this library as an output plugin, add it to "output_plugin_libraries" and reload',
            [
                "refuses wal2json",
                "output_plugin_libraries = 'pgoutput, test_decoding, wal2json'",
                "SELECT pg_reload_conf()",
                "parameter group",
            ],
        ),
        (
            "42501",
            "permission denied to start WAL sender DETAIL: Only roles with the REPLICATION attribute may start "
            "a WAL sender process.",
            ["may not replicate", "ALTER ROLE <role> REPLICATION"],
        ),
    ],
    ids=["plugin-missing", "no-free-slot", "slot-busy", "plugin-not-allowed", "role-without-replication"],
)
def test_replication_errors_name_the_cause_and_the_fix(code: str, reason: str, fragments: list[str]) -> None:
    error = replication_error(FakePgError(code, f"ERROR:  {reason}\n"), "s1")
    assert isinstance(error, SourceError)
    message = str(error)
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message and "ERROR:" not in message


def test_the_allow_list_refusal_gives_no_replication_advice() -> None:
    error = replication_error(FakePgError("42501", 'library "wal2json" may not be used as an output plugin'), "s")
    assert error is not None and "REPLICATION" not in str(error) and "ALTER ROLE" not in str(error)


def test_missing_plugin_is_recognised_by_its_message_too() -> None:
    error = replication_error(FakePgError("XX000", 'could not access file "wal2json": No such file'), "s1")
    assert isinstance(error, CdcError) and "wal2json output plugin is not installed" in str(error)


def test_unknown_replication_error_is_left_to_the_caller() -> None:
    assert replication_error(FakePgError("XX000", "something else broke"), "s1") is None
    assert replication_error(RuntimeError("no pgcode at all"), "s1") is None
