"""bench/results/latency.png: end-to-end latency of each probe over time, and its histogram."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt


def latency_png(samples: list[list[float]], p50: float, p99: float, title: str, path: Path) -> Path:
    """`samples` are [seconds since the start, latency in ms] pairs."""
    times = [s[0] for s in samples]
    millis = [s[1] for s in samples]
    fig, (over_time, histogram) = plt.subplots(2, 1, figsize=(10, 7), constrained_layout=True)
    over_time.plot(times, millis, linewidth=0.8, marker=".", markersize=2)
    for value, label, style in ((p50, "p50", "--"), (p99, "p99", ":")):
        over_time.axhline(value, linestyle=style, color="grey", linewidth=1)
        over_time.annotate(
            f"{label} {value:.1f} ms", (times[-1] if times else 0, value), fontsize=8, ha="right", va="bottom"
        )
    over_time.set_xlabel("seconds since the first probe")
    over_time.set_ylabel("latency (ms)")
    over_time.set_title(title)
    over_time.grid(True, alpha=0.3)
    histogram.hist(millis, bins=60)
    histogram.set_xlabel("latency (ms)")
    histogram.set_ylabel("probes")
    histogram.set_yscale("log")
    histogram.grid(True, alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
