"""python -m bench.readme: the latest results as a markdown section, put between
`<!-- bench:start -->` and `<!-- bench:end -->` in README.md; printed instead when README.md does not
exist or has no markers (README.md is never created)."""

import sys
from typing import Any

from bench import plot, report
from bench.config import REPO

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"
README = REPO / "README.md"


def section(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "### Benchmark",
        "",
        f"Measured {results['date']} at commit `{results['commit']}` "
        f"(`python -m bench.run --{results['mode']}`, {results['duration_s']:.0f} s).",
        "",
        f"Machine: {report.machine_line(results)}.",
        "",
        *report.main_table(results),
        "",
        *report.workload_lines(results),
    ]
    if results.get("growth"):
        lines += ["", "Events/s as transactions and rows grow (`--full`):", "", *report.growth_table(results)]
    if report.dig(results, "scenarios", "debezium"):
        lines += [
            "",
            "Against Debezium, measured in the same run (scenario 7):",
            "",
            *report.debezium_table(results),
        ]
    if report.dig(results, "scenarios", "transactions"):
        lines += [
            "",
            "Source transactions applied whole (`--consistency transaction`) against row by row, on "
            "pgbench's TPC-B-like transactions, measured in the same run (scenario 8):",
            "",
            *report.transactions_table(results),
        ]
    if results.get("latency_plot"):
        lines += ["", f"![end-to-end latency over time and its histogram]({results['latency_plot']})"]
    if report.throughput_panels(results):
        lines += ["", "![events/s of every system measured in the run](bench/results/throughput.png)"]
    lines += [
        "",
        f"Baselines are measured in the same run on the same machine ({m['cores_logical']} cores); "
        "ratios, not absolute figures, are what the targets judge.",
    ]
    return "\n".join(lines)


def replace_between_markers(text: str, body: str) -> str | None:
    """`text` with the part between the markers replaced by `body`, or None without both markers."""
    start = text.find(START)
    end = text.find(END, start + len(START)) if start >= 0 else -1
    if start < 0 or end < 0:
        return None
    return text[: start + len(START)] + "\n" + body + "\n" + text[end:]


def main() -> int:
    try:
        results = report.load_latest()
    except FileNotFoundError:
        print("no results yet: run `python -m bench.run --quick` first", file=sys.stderr)
        return 1
    plot.throughput_of(results)  # drawn from the figures, so results of older runs get it too
    body = section(results)
    if README.exists():
        updated = replace_between_markers(README.read_text(encoding="utf-8"), body)
        if updated is not None:
            README.write_text(updated, encoding="utf-8")
            print(f"updated the benchmark section of {README.name}")
            return 0
        print(f"{README.name} has no {START} ... {END} markers; the section:\n", file=sys.stderr)
    else:
        print(f"{README.name} does not exist; the section:\n", file=sys.stderr)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
