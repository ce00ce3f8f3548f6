"""bench/results/latency.png: end-to-end latency of each probe over time, and its histogram."""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from bench import report
from bench.config import RESULTS_DIR


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


# A bar: the system's label, its events/s, and what measured it (bars of one measurement share a colour).
Bar = tuple[str, float, str]


def throughput_png(panels: list[tuple[str, list[Bar]]], title: str, path: Path) -> Path:
    """One horizontal bar chart per panel (reading the WAL, applying to the target), events/s per system."""
    kinds = sorted({kind for _, bars in panels for _, _, kind in bars})
    colours = {kind: f"C{i}" for i, kind in enumerate(kinds)}
    heights = [max(1, len(bars)) for _, bars in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(10, 1.2 + 0.5 * sum(heights)),
        constrained_layout=True,
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, (name, bars) in zip(axes[:, 0], panels, strict=True):
        labels = [b[0] for b in bars][::-1]
        values = [b[1] for b in bars][::-1]
        positions = list(range(len(bars)))  # by position: one system can have a bar in two measurements
        ax.barh(positions, values, color=[colours[b[2]] for b in bars][::-1])
        ax.set_yticks(positions, labels)
        for y, value in enumerate(values):
            ax.annotate(f" {value:,.0f}", (value, y), va="center", fontsize=8)
        ax.set_title(name, fontsize=10, loc="left")
        ax.set_xlabel("events/s")
        ax.set_xlim(0, max(values, default=1) * 1.18)
        ax.grid(True, axis="x", alpha=0.3)
    handles = [Rectangle((0, 0), 1, 1, color=colours[k]) for k in kinds]
    fig.legend(handles, kinds, loc="outside lower center", ncols=max(1, len(kinds)), fontsize=8)
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_of(results: dict[str, Any]) -> Path | None:
    """bench/results/throughput.png of these results (None when they measured no events/s)."""
    panels = report.throughput_panels(results)
    if not panels:
        return None
    title = f"events/s per system, {results['mode']} run of {results['date'][:10]}, commit {results['commit']}"
    return throughput_png(panels, title, RESULTS_DIR / "throughput.png")
