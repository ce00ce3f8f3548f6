"""A private PostgreSQL cluster, for the tests that stop, restart or crash a database server or need
settings the shared stack does not have; the shared stack's clusters are never touched.

    cluster = PgCluster("source").init().start()
    dsn = cluster.create_database("faults")
    cluster.restart()                 # pg_ctl stop -m fast, then start
    cluster.kill()                    # SIGKILL the postmaster (a crash; start() recovers)
    cluster.remove()                  # stop (immediate) and delete the data folder

The data folder is under /var/lib/postgresql (the postgres user owns it; initdb refuses to run as
root), the server listens on a free port of 127.0.0.1 with password authentication, wal_level is
logical, and wal2json (the stack's installed plugin) is in the output-plugin allow-list on servers
that have one (`allow_wal2json=False` leaves the server's default list, which refuses it).
"""

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import make_dsn

from source_connector.plugin_allowlist import SETTING, line_for_server
from tests.kafka_broker import free_port

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
PASSWORD = "postgres"
ROOT = Path(os.environ.get("PRIVATE_PG_ROOT", "/var/lib/postgresql"))

_live: list["PgCluster"] = []
_described: list[str] = []


def _describe_config() -> str:
    """`postgres --describe-config` of the installed server (read once)."""
    if not _described:
        result = subprocess.run(
            _as_postgres([str(PG_BIN / "postgres"), "--describe-config"]),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        _described.append(result.stdout)
    return _described[0]


def allowlist_settings() -> dict[str, str]:
    """The setting that lets wal2json load, for a server that has the allow-list; none otherwise."""
    line = line_for_server(_describe_config())
    return {} if line is None else {SETTING: line.split(" = ", 1)[1]}


def _as_postgres(args: list[str]) -> list[str]:
    """Run as the postgres user (initdb and pg_ctl refuse root)."""
    if os.geteuid() != 0:
        return args
    return ["runuser", "-u", "postgres", "--", *args]


class PgCluster:
    def __init__(
        self,
        name: str,
        settings: dict[str, str] | None = None,
        password: str = PASSWORD,
        allow_wal2json: bool = True,
    ) -> None:
        self.name = name
        self.allow_wal2json = allow_wal2json
        self.password = password
        self.dir = ROOT / f"private-pg-{name}-{uuid.uuid4().hex[:8]}"
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = free_port()
        self.settings = settings or {}
        self.admin_dsn = self.dsn("postgres")
        self.restarts = 0

    def dsn(self, database: str, **extra: str) -> str:
        return make_dsn(
            host="127.0.0.1",
            port=str(self.port),
            user="postgres",
            password=self.password,
            dbname=database,
            **extra,
        )

    def _run(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(_as_postgres(args), capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result

    def init(self) -> "PgCluster":
        _sweep()
        self.dir.mkdir(parents=True)
        if os.geteuid() == 0:
            postgres = pwd.getpwnam("postgres")
            os.chown(self.dir, postgres.pw_uid, postgres.pw_gid)
        _live.append(self)
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
        self._run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
                "--no-sync",
            ]
        )
        pwfile.unlink()
        config = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.dir}'",
            "max_connections": "60",
            "shared_buffers": "64MB",
            "wal_level": "logical",
            "max_replication_slots": "8",
            "max_wal_senders": "8",
            "wal_sender_timeout": "60s",
            "log_min_messages": "warning",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
            **(allowlist_settings() if self.allow_wal2json else {}),
            **self.settings,
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("".join(f"{k} = {v}\n" for k, v in config.items()))
        return self

    def start(self, timeout: float = 60) -> "PgCluster":
        self._run(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ],
            timeout=timeout + 10,
        )
        return self

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        self._run(
            [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", str(int(timeout)), "stop"],
            timeout=timeout + 10,
        )

    def restart(self, mode: str = "fast", down_for: float = 0.0) -> None:
        """Stop with `mode`, stay down `down_for` seconds, start again."""
        self.stop(mode)
        if down_for > 0:
            time.sleep(down_for)
        self.start()
        self.restarts += 1

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists() and self.postmaster_pid() is not None

    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def kill(self) -> None:
        """SIGKILL the postmaster and its children: a crash (start() runs crash recovery)."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
        for child in [pid, *map(int, children.split())]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self.postmaster_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.1)

    def create_database(self, name: str) -> str:
        conn = psycopg2.connect(self.admin_dsn, connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()
        return self.dsn(name)

    def remove(self) -> None:
        """Stop at once (the data is thrown away) and delete the folder."""
        if self in _live:
            _live.remove(self)
        if self.postmaster_pid() is not None:
            try:
                self.stop("immediate", timeout=30)
            except (AssertionError, subprocess.TimeoutExpired):
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _sweep(older_than: float = 3600) -> None:
    """Delete the folders of clusters left behind by runs that were killed (no live postmaster, an
    hour old): atexit does not run when the test process itself is killed."""
    for folder in ROOT.glob("private-pg-*"):
        pid_file = folder / "data" / "postmaster.pid"
        try:
            if time.time() - folder.stat().st_mtime < older_than:
                continue
            if pid_file.exists():
                pid = int(pid_file.read_text().split("\n", 1)[0])
                try:
                    os.kill(pid, 0)
                    continue  # still running: someone's cluster
                except ProcessLookupError:
                    pass
        except (OSError, ValueError):
            continue
        shutil.rmtree(folder, ignore_errors=True)


@atexit.register
def _remove_leftovers() -> None:
    for cluster in list(_live):
        cluster.remove()
