"""The operations port of a connector: Prometheus metrics on /metrics and a health check on
/healthz (200 when the process can make progress, 503 with the reason when it cannot).

The connectors count in plain integers on their hot paths; the collectors below read those counts
only when Prometheus scrapes, so metrics cost nothing per event.
"""

import bisect
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("service")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
SIZE_BUCKETS = (1, 10, 50, 100, 500, 1000, 2000, 5000, 10000)

Health = Callable[[], tuple[bool, str]]


class FastHistogram:
    """A histogram fed from the hot path: a bisect and two additions per observation."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.total += value * times
        self.count += times

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cumulative, running = [], 0
        for bound, n in zip([*self.bounds, float("inf")], self.counts, strict=True):
            running += n
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=self.total)


def counter(name: str, doc: str, labels: Sequence[str], values: Iterable[tuple[Sequence[str], float]]) -> Any:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    for label_values, value in values:
        family.add_metric(list(label_values), value)
    return family


def single_counter(name: str, doc: str, value: float) -> Any:
    """A counter without labels."""
    return counter(name, doc, [], [((), value)])


def samples(counts: Mapping[Any, float]) -> list[tuple[tuple[str, ...], float]]:
    """A counter's entries (keyed by one label value, or a tuple of them) as metric samples. A copy,
    as the connector's thread may add an entry during the scrape."""
    return [(key if isinstance(key, tuple) else (key,), n) for key, n in list(counts.items())]


def gauge(
    name: str,
    doc: str,
    value: float | None = None,
    labels: Sequence[str] = (),
    values: Iterable[tuple[Sequence[str], float]] = (),
) -> Any:
    family = GaugeMetricFamily(name, doc, value=value if not labels else None, labels=list(labels) or None)
    for label_values, v in values:
        family.add_metric(list(label_values), v)
    return family


class CallbackCollector(Collector):
    """Collects by calling a function at scrape time."""

    def __init__(self, collect: Callable[[], Iterator[Any]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Any]:
        return self._collect()


class OpsServer:
    """/metrics and /healthz on one port, in a daemon thread."""

    def __init__(
        self, port: int, collect: Callable[[], Iterator[Any]], health: Health, host: str = "0.0.0.0"
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(CallbackCollector(collect))
        registry, check = self.registry, health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    try:
                        body, status = generate_latest(registry), 200
                    except Exception as exc:  # a broken collector must not take the process down
                        body, status = f"metrics failed: {exc}\n".encode(), 500
                    content_type = "text/plain; version=0.0.4; charset=utf-8"
                elif path == "/healthz":
                    ok, detail = check()
                    body, status, content_type = (detail + "\n").encode(), 200 if ok else 503, "text/plain"
                else:
                    body, status, content_type = b"not found: try /metrics or /healthz\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="ops-server", daemon=True)

    def start(self) -> "OpsServer":
        self.thread.start()
        log.info("metrics on :%d/metrics, health on :%d/healthz", self.port, self.port)
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def serving(port: int, collect: Callable[[], Iterator[Any]], health: Health) -> Iterator[None]:
    """/metrics and /healthz on `port` while the block runs (nothing when `port` is 0)."""
    server = OpsServer(port, collect, health).start() if port else None
    try:
        yield
    finally:
        if server is not None:
            server.stop()
