"""The demo's live view: rows on both sides, events per second, lag and end-to-end latency, read
from the connectors' /metrics and the two databases."""

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, list[tuple[dict[str, str], float]]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    """Metric samples by name from a connector's /metrics (empty while it is starting)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: Samples, name: str) -> float:
    return sum(v for _, v in samples.get(name, []))


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """A quantile (upper bound of its bucket) from cumulative histogram buckets."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    wanted = q * buckets[-1][1]
    for bound, count in buckets:
        if count >= wanted:
            return bound
    return None


def latency_buckets(samples: Samples) -> list[tuple[float, float]]:
    rows = samples.get("cdc_sink_end_to_end_latency_seconds_bucket", [])
    return sorted((float(labels["le"]), v) for labels, v in rows)


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return "∞" if seconds == float("inf") else f"{seconds * 1000:.0f} ms"
