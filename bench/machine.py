"""The machine and software a run measured: recorded with every result."""

import datetime as dt
import os
import platform
import re
import subprocess
from typing import Any

import confluent_kafka
import psutil

from bench.config import REPO, Endpoints
from bench.pg import server_version


def _run(args: list[str]) -> str | None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=20, check=False, cwd=REPO)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def cpu_info(field: str) -> str | None:
    """A field of the first CPU in /proc/cpuinfo ("model name", "cpu MHz", "cache size")."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return cpu_info("model name") or platform.processor() or "unknown"


def wal2json_version(pg_version: str) -> str | None:
    """The installed package's version (postgresql-<major>-wal2json), as the package manager reports it."""
    major = pg_version.split(".", maxsplit=1)[0].split(maxsplit=1)[0]
    return _run(["dpkg-query", "-W", "-f", "${Version}", f"postgresql-{major}-wal2json"])


def kafka_version() -> str | None:
    """The broker's version: the local stack runs it from versioned jars (KAFKA_VERSION otherwise)."""
    for jar in sorted((REPO / ".stack" / "kafka").glob("libs-*/kafka-clients-*.jar")):
        match = re.search(r"kafka-clients-(.+)\.jar$", jar.name)
        if match:
            return match[1]
    return os.environ.get("KAFKA_VERSION")


class Steal:
    """How much of the CPU time the machine's programs wanted its host gave to others (a virtual
    machine's `steal`), between `start` and `share`: a run measured while the host was busy is
    slower, and its latency tails longer, for reasons outside the programs measured."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.times = psutil.cpu_times()

    def share(self) -> float | None:
        """Percent of the non-idle CPU time since `start` (None where the system reports no steal)."""
        now, then = psutil.cpu_times(), self.times
        if not hasattr(now, "steal"):
            return None
        wanted = (sum(now) - now.idle - now.iowait) - (sum(then) - then.idle - then.iowait)
        return round(100 * (now.steal - then.steal) / wanted, 1) if wanted > 0 else 0.0


def git_info() -> dict[str, Any]:
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"]) or ""
    modified = [line[3:] for line in status.splitlines() if line[3:] and not line[3:].startswith("bench/")]
    return {
        "commit": _run(["git", "rev-parse", "HEAD"]),
        "short": _run(["git", "rev-parse", "--short", "HEAD"]) or "nogit",
        "modified_files": modified,  # the working tree measured differs from the commit in these
    }


def describe(endpoints: Endpoints) -> dict[str, Any]:
    source_version = server_version(endpoints.source("postgres"))
    memory = psutil.virtual_memory()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "os": platform.platform(),
        "cpu_model": cpu_model(),
        # a virtual machine's model name can hide its host's CPU: clock and cache tell two apart
        "cpu_mhz": cpu_info("cpu MHz"),
        "cpu_cache": cpu_info("cache size"),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "ram_gb": round(memory.total / 1024**3, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "postgresql_source": source_version,
        "postgresql_target": server_version(endpoints.target("postgres")),
        "wal2json": wal2json_version(source_version),
        "kafka": kafka_version(),
        "python": platform.python_version(),
        "confluent_kafka": confluent_kafka.__version__,
        "librdkafka": confluent_kafka.libversion()[0],
        "git": git_info(),
    }
