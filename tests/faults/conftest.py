"""Fixtures of the fault-injection suite: `--long` (more faults, longer), private Kafka brokers,
private PostgreSQL clusters, TCP proxies, and a per-scenario report printed at the end of the run."""

import json
import os
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from tests.faults.broker import FaultBroker
from tests.faults.harness import ScenarioReport
from tests.faults.proxy import TcpProxy
from tests.helpers import reap_started
from tests.pg_cluster import PgCluster

_REPORTS: list[ScenarioReport] = []
_FAILED = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="fault scenarios: more faults and longer runs (make faults)",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    found = yield
    if found.when == "call":
        item.stash[_FAILED] = found.failed or hasattr(found, "wasxfail")
    return found


@pytest.fixture(autouse=True)
def _reap_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """A failed scenario (or an expected failure) leaves its programs running: kill them here, so
    the failure is reported once rather than again as programs left running."""
    yield
    if request.node.stash.get(_FAILED, False):
        reap_started()


@pytest.fixture(scope="session")
def long_run(request: pytest.FixtureRequest) -> bool:
    """True under --long."""
    return bool(request.config.getoption("--long", default=False))


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Iterator[ScenarioReport]:
    """The scenario's figures, printed in the run's summary (and written to $FAULTS_REPORT)."""
    found = ScenarioReport(request.node.name)
    started = time.monotonic()
    yield found
    found.seconds = time.monotonic() - started
    _REPORTS.append(found)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _REPORTS:
        return
    terminalreporter.section("fault scenarios")
    for found in _REPORTS:
        terminalreporter.write_line(found.summary())
        for fault in found.faults:
            recovery = "" if fault.recovery_seconds is None else f", recovered in {fault.recovery_seconds:.1f} s"
            down = f" for {fault.down_seconds:.1f} s" if fault.down_seconds else ""
            terminalreporter.write_line(f"    {fault.kind}{down}{recovery} {fault.detail}".rstrip())
    destination = os.environ.get("FAULTS_REPORT")
    if destination:
        Path(destination).write_text(json.dumps([asdict(r) for r in _REPORTS], indent=2))


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[Callable[..., FaultBroker]]:
    """Start a private broker (the arguments of tests.kafka_broker.PrivateBroker, without the
    folder); killed after the test (resumed first if a test left it SIGSTOPped)."""
    brokers: list[FaultBroker] = []

    def start(**kwargs: Any) -> FaultBroker:
        broker = FaultBroker(tmp_path / f"kafka{len(brokers)}", **kwargs)
        brokers.append(broker)
        return broker.start()

    yield start
    for broker in brokers:
        if broker.running():
            broker.resume()
        broker.kill()


@pytest.fixture
def pg_cluster() -> Iterator[Callable[..., PgCluster]]:
    """Create and start a private PostgreSQL cluster: pg_cluster("source"); removed after the test."""
    clusters: list[PgCluster] = []

    def create(name: str, settings: dict[str, str] | None = None) -> PgCluster:
        cluster = PgCluster(name, settings)
        clusters.append(cluster)
        return cluster.init().start()

    yield create
    for cluster in clusters:
        cluster.remove()


@pytest.fixture
def proxies() -> Iterator[Callable[..., TcpProxy]]:
    """Open a TCP proxy to an upstream port: proxies(port, name=...); closed after the test."""
    opened: list[TcpProxy] = []

    def open_proxy(upstream_port: int, name: str = "") -> TcpProxy:
        proxy = TcpProxy(upstream_port, name=name)
        opened.append(proxy)
        return proxy

    yield open_proxy
    for proxy in opened:
        proxy.close()
