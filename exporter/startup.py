"""How `mcn-exporter serve` starts, in one place and in this order:

1. config: read and checked (`exporter.config.load_config`) before anything else runs.
2. metrics dir: `prepare_metrics_dir`, a directory for prometheus_client's per-worker files,
   named in the environment before prometheus_client is first imported (it picks its
   multiprocess mode at import, so the modules that import it are imported after this step).
3. store: `initialise_store`, in the master: the schema, the zero series and the reserved
   extensions, created once before any worker exists, so that workers never race to make them.
   A PostgreSQL store that cannot be reached is logged and left to the workers, which open it
   (and create these) as soon as it answers; until then they answer 503 and `/readyz` 503.
4. fork: gunicorn forks the workers (`exporter.server`); each is tied to its master's life.
5. per-worker deps: `build_deps`, in each worker after the fork, since SQLite connections,
   PostgreSQL connection pools and prometheus_client's files belong to one process.
6. app: `exporter.app.create_app(deps)`.

At a worker's exit its store is closed (`exporter.server`), committing the changes it holds;
at the master's exit the metrics directory is removed, if the master created it.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from exporter.callers import CallerSettings
from exporter.calls import CallTracker, Clock, TrackerSettings
from exporter.config import Config, StoreConfig, mask_password
from exporter.events import WebhookParser
from exporter.legs import TallyLayout
from exporter.store import (
    CallStore,
    SqliteCallStore,
    StoreIncompatible,
    StoreSeed,
    StoreUnavailable,
)
from exporter.store.deferred import DeferredStore

if TYPE_CHECKING:
    from exporter.app import Deps
    from exporter.store.postgresql import PostgresCallStore

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set beside it when the master made the directory itself: a master that inherits both (gunicorn
# re-executes the master on USR2, with the environment it started with) did not make it.
PRIVATE_ENV = "MCN_EXPORTER_PRIVATE_METRICS_DIR"
UPGRADE_ENV = "GUNICORN_PID"  # set by gunicorn in a master it re-executed: the old master's pid
POSTGRESQL_EXTRA = "pip install 'mcn-exporter[postgresql]'"
log = logging.getLogger("exporter.startup")


class StartupError(Exception):
    """What stops the exporter from starting, in one line for the operator."""


@dataclass(frozen=True)
class MetricsDir:
    path: str
    owner_pid: int | None  # the process that created it, and alone removes it; None: the user's

    def remove(self) -> None:
        # Forked workers unwind through the same code as the master when they exit (a HUP, a
        # TTOU, a TERM sent to one worker): removing the directory there would take away the
        # files of the workers still running and stop the exporter.
        if self.owner_pid == os.getpid():
            shutil.rmtree(self.path, ignore_errors=True)


def prepare_metrics_dir() -> MetricsDir:
    """A dedicated, empty directory for prometheus_client's per-worker files.

    A directory the user named in PROMETHEUS_MULTIPROC_DIR is kept, but emptied of metric
    files: counts left by a previous run would be summed into this one's. Two cases differ in
    a master started by an upgrade on the fly (USR2), while the old master and its workers still
    run: the old master's private directory is left to it (it removes it when it leaves) and this
    master makes its own; a directory of the user's keeps the old workers' files, which are live.
    """
    if "prometheus_client" in sys.modules:
        raise RuntimeError(
            "prometheus_client was imported before its multiprocess directory was set"
        )
    given = os.environ.get(MULTIPROC_ENV)
    if not given or given == os.environ.get(PRIVATE_ENV):
        created = tempfile.mkdtemp(prefix="mcn-exporter-metrics-")
        os.environ[MULTIPROC_ENV] = os.environ[PRIVATE_ENV] = created
        return MetricsDir(created, owner_pid=os.getpid())
    try:
        os.makedirs(given, exist_ok=True)
        if UPGRADE_ENV not in os.environ:
            for stale in glob.glob(os.path.join(given, "*.db")):
                _remove_metrics_file(stale, given)
    except OSError as exc:
        raise StartupError(
            f"{MULTIPROC_ENV}={given}: {exc.strerror}: it must be a directory the exporter "
            "can write to, or unset for a private one"
        ) from exc
    return MetricsDir(given, owner_pid=None)


def _remove_metrics_file(path: str, directory: str) -> None:
    if os.path.isfile(path) and not os.path.islink(path):
        os.remove(path)
        return
    log.warning(
        "%s is not a metrics file (prometheus_client's are plain files): left in place and "
        "skipped; keep other things out of %s=%s",
        path,
        MULTIPROC_ENV,
        directory,
    )


def tally_layout(config: Config) -> TallyLayout:
    return TallyLayout(
        ring_buckets=config.metrics.ring_buckets,
        talk_buckets=config.metrics.talk_buckets,
        timings_by_extension=config.metrics.histogram_extension_label,
        # Always, with or without hours: "open" when the account has none, so that rules and
        # dashboards read one set of series whatever the configuration.
        caller_period=True,
    )


def store_seed(config: Config, layout: TallyLayout) -> StoreSeed:
    """What the store starts a new file with, should its file be deleted while serving."""
    from exporter.metrics import initial_rows

    return StoreSeed(
        rows=tuple(initial_rows(config, layout)),
        extensions=tuple(
            (account, tuple(extensions)) for account, extensions in config.extensions.items()
        ),
    )


def store_lock_timeout(config: Config) -> float:
    """How long a write waits for its turn, in its process and then among processes.

    A quarter of server.timeout each: a stalled writer gives 503s well before the request
    would have timed out, never a request hanging.
    """
    return config.server.timeout / 4


@dataclass(frozen=True)
class PostgresTimeouts:
    """How long a request may wait for a PostgreSQL connection, and for each statement.

    Shares of server.timeout, so that no request outlasts it: a webhook is about five round
    trips, of which one or two at most wait on a lock, and a connection is waited for once
    (a replica that is still opening its store waits for that once more).
    """

    connect: float
    statement: float

    @classmethod
    def within(cls, server_timeout: float) -> PostgresTimeouts:
        return cls(
            connect=min(5.0, max(1.0, server_timeout / 10)),
            statement=max(0.5, server_timeout / 6),
        )


def open_store(
    config: Config, layout: TallyLayout, prepared: bool = False, in_worker: bool = False
) -> CallStore:
    """The configured call store, for this process alone: SQLite's file, or a PostgreSQL
    connection pool, which never crosses a fork (each worker opens its own).

    A PostgreSQL store is opened at its first use that finds the database up, and prepared
    then (`prepare_store`) unless `prepared` says the master did it: a worker starts, and
    answers 503, while the database is down. A SQLite file that cannot be opened is an error,
    but `in_worker` (a server's worker, which must not fail to boot) opens it later.
    """
    if config.store.url is None:
        return _open_sqlite_store(config, layout, in_worker)
    backend = _postgresql_backend()
    conninfo = postgresql_conninfo(config.store)
    timeouts = PostgresTimeouts.within(config.server.timeout)

    def connect() -> CallStore:
        return backend(
            conninfo,
            layout,
            connect_timeout=timeouts.connect,
            statement_timeout=timeouts.statement,
            # One connection per request thread: a request never waits for another's.
            max_connections=config.server.threads,
        )

    def prepare(store: CallStore) -> None:
        if not prepared:
            prepare_store(config, store)

    return DeferredStore(connect, layout, prepare, wait=timeouts.connect)


def _open_sqlite_store(config: Config, layout: TallyLayout, in_worker: bool) -> CallStore:
    """The SQLite store; in a worker, opened later if it cannot be now.

    gunicorn stops the whole server when a worker fails to start: a worker started (or
    replaced) while the file cannot be opened (being replaced, a -wal deleted by hand, a full
    disk) answers 503 instead, and opens it at the first use that can. The master, which
    checked the store before starting, stops on it.
    """

    def open_file() -> CallStore:
        return SqliteCallStore(
            Path(config.store.path),
            layout,
            store_seed(config, layout),
            lock_timeout=store_lock_timeout(config),
        )

    if not in_worker:
        return open_file()
    try:
        return open_file()
    except StoreIncompatible:
        raise
    except StoreUnavailable as exc:
        log.error("call store unavailable: %s; answering 503 until it can be opened", exc)
        return DeferredStore(
            open_file, layout, prepare=lambda store: None, wait=store_lock_timeout(config)
        )


def _postgresql_backend() -> type[PostgresCallStore]:
    try:
        from exporter.store.postgresql import PostgresCallStore
    except ImportError as exc:
        raise StartupError(
            f"store.url names a PostgreSQL store, which needs psycopg ({exc}): "
            f"install the exporter with its PostgreSQL extra: {POSTGRESQL_EXTRA}"
        ) from exc
    return PostgresCallStore


def postgresql_conninfo(store: StoreConfig) -> str:
    """store.url with the password of store.password_file added, checked as libpq reads it."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import make_conninfo

    assert store.url is not None
    extra = {} if store.password is None else {"password": store.password}
    try:
        return make_conninfo(store.url, **extra)
    except ProgrammingError as exc:
        reason = mask_password(" ".join(str(exc).split()))
        if store.password:
            reason = reason.replace(store.password, "****")
        raise StartupError(f"store.url: libpq cannot read {store.describe()!r}: {reason}") from exc


def prepare_store(config: Config, store: CallStore) -> None:
    """The zero series and the reserved extensions: each created unless it exists."""
    from exporter.metrics import initial_rows

    store.ensure_rows(initial_rows(config, store.layout))
    for account, extensions in config.extensions.items():
        store.reserve_extensions(account, extensions)


def initialise_store(config: Config) -> bool:
    """The schema and the zero series, once, in the master, before workers fork.

    A store that cannot be used is a StartupError naming it and what to do. A PostgreSQL store
    that cannot be reached is logged, and False returned: the workers prepare it once it can be.
    """
    layout = tally_layout(config)
    if config.store.url is not None:
        return _initialise_postgresql(config, layout)
    path = Path(config.store.path)
    try:
        store = open_store(config, layout)
        try:
            prepare_store(config, store)
        finally:
            store.close()
    except (StoreUnavailable, sqlite3.DatabaseError, OSError) as exc:
        raise StartupError(_store_error(path, exc)) from exc
    return True


def _initialise_postgresql(config: Config, layout: TallyLayout) -> bool:
    """Opening the store creates or checks the schema, then prepares it.

    Not reaching the server (down, restarting, refusing this user or database) does not stop
    the exporter: replicas come up not ready and recover on their own, as after an outage
    later on. A schema this exporter cannot read does stop it: no waiting mends that.
    """
    store = open_store(config, layout)
    try:
        store.ping()
        return True
    except StoreUnavailable as exc:
        reason = " ".join(str(exc).split())
        if not _server_not_reached(exc):
            raise StartupError(
                f"call store {config.store.describe()} cannot be used: {reason}"
            ) from exc
        log.error(
            "call store %s cannot be reached: %s; starting anyway: webhooks and /readyz answer "
            "503 until it can be",
            config.store.describe(),
            reason,
        )
        return False
    finally:
        store.close()


def _server_not_reached(exc: BaseException) -> bool:
    """The error came from connecting or talking to PostgreSQL, not from what it holds."""
    import psycopg  # its pool's PoolTimeout is one of psycopg's errors too

    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, psycopg.Error):
            return True
        cause = cause.__cause__
    return False


def _store_error(path: Path, exc: Exception) -> str:
    if isinstance(exc, StoreIncompatible):
        return f"call store {exc}"  # names the file and what to do
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if _is_damaged_file(exc):
        advice = "restore it from a backup, or move it aside to start on an empty store"
    else:
        advice = "check the path, its permissions and free space (store.path in the config)"
    return f"call store {path} cannot be used: {reason}; {advice}"


def _is_damaged_file(exc: BaseException | None) -> bool:
    """SQLite read the file and found no database in it (OperationalError: could not read)."""
    while exc is not None:
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            return True
        exc = exc.__cause__
    return False


def tracker_settings(config: Config) -> TrackerSettings:
    return TrackerSettings(
        max_duration=config.calls.max_duration,
        duplicate_window=config.calls.duplicate_window,
        max_extensions=config.limits.max_extensions,
        callers=CallerSettings(
            group_window=config.callers.group_window,
            settle=config.callers.settle,
            give_up_after=config.callbacks.give_up_after,
            match_digits=config.callbacks.match_digits,
        ),
        lines=config.lines(),
        calendar=config.calendar,
    )


def build_deps(
    config: Config,
    clock: Clock = time.time,
    multiprocess_dir: str | None = None,
    store_prepared: bool = False,
    in_worker: bool = False,
) -> Deps:
    """One worker's parts: its own store connections, metrics and call tracker.

    `store_prepared`: initialise_store made the zero series, so the worker need not.
    `in_worker`: built in a server's worker (see open_store).
    """
    from exporter.app import Deps
    from exporter.metrics import build_metrics

    store = open_store(config, tally_layout(config), prepared=store_prepared, in_worker=in_worker)
    rejections, scrape = build_metrics(store, config, multiprocess_dir, clock)
    settings = tracker_settings(config)
    return Deps(
        config=config,
        parser=WebhookParser(config.secrets()),
        tracker=CallTracker(store, settings, clock),
        store=store,
        rejections=rejections,
        scrape=scrape,
    )
