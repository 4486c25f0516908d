"""A throwaway PostgreSQL cluster for the tests: Debian's binaries, one cluster per test session.

`initdb` into a temporary directory, `pg_ctl` on a free port of 127.0.0.1 (and a Unix socket in
that directory), trust authentication, fsync on as in production. Each test gets a database of
its own. PostgreSQL refuses to run as root, so as root the cluster belongs to `postgres`.

Loaded as a pytest plugin (`pytest_plugins = ["tests.pgcluster"]`) by the modules that need it.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import psycopg
import pytest

from tests.conftest import free_port

SUPERUSER = "postgres"
START_TIMEOUT = 60  # seconds pg_ctl waits for the server to accept connections


def postgres_bin() -> Path:
    """The newest PostgreSQL installed under /usr/lib/postgresql/<version>/bin."""
    installed = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name),
    )
    if not installed:
        raise RuntimeError("PostgreSQL is not installed: run scripts/install-system-deps")
    return installed[-1].parent


class PgCluster:
    """One PostgreSQL server in a directory of its own, owned by whoever may run it."""

    def __init__(self, root: Path) -> None:
        self.bin = postgres_bin()
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.port = free_port()
        self._databases = itertools.count(1)

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.root, SUPERUSER, SUPERUSER)
        self._run(
            "initdb",
            "--pgdata",
            str(self.data),
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-sync",  # initdb's own sync only; the server runs with fsync on
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "fsync": "on",
            "max_connections": "100",
            "shared_buffers": "16MB",
            "log_min_messages": "warning",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def start(self) -> None:
        self._run(
            "pg_ctl",
            "--pgdata",
            str(self.data),
            "--log",
            str(self.log),
            "--wait",
            f"--timeout={START_TIMEOUT}",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "--pgdata", str(self.data), "--mode", mode, "--wait", "stop")

    def url(self, database: str = SUPERUSER) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its libpq URL."""
        name = f"test_{next(self._databases)}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SUPERUSER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, cwd=self.root, check=False)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{program} failed: {result.stderr}{result.stdout}\n{log}")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PgCluster]:
    root = Path(tempfile.mkdtemp(prefix="mcn-pg-"))
    cluster = PgCluster(root)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        with suppress(RuntimeError):  # not running: it failed to start, or a test stopped it
            cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_cluster: PgCluster) -> str:
    """A fresh database of the session's cluster, for one test."""
    return postgres_cluster.create_database()
