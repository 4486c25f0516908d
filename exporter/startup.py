"""How `mcn-exporter serve` starts, in one place and in this order:

1. config: read and checked (`exporter.config.load_config`) before anything else runs.
2. metrics dir: `prepare_metrics_dir`, a directory for prometheus_client's per-worker files,
   named in the environment before prometheus_client is first imported (it picks its
   multiprocess mode at import, so the modules that import it are imported after this step).
3. store: `initialise_store`, in the master: the schema, the zero series and the reserved
   extensions, created once before any worker exists, so that workers never race to make them.
4. fork: gunicorn forks the workers (`exporter.server`); each is tied to its master's life.
5. per-worker deps: `build_deps`, in each worker after the fork, since SQLite connections and
   prometheus_client's files belong to one process.
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
from exporter.config import Config
from exporter.events import WebhookParser
from exporter.legs import TallyLayout
from exporter.store import SqliteCallStore, StoreIncompatible, StoreSeed, StoreUnavailable

if TYPE_CHECKING:
    from exporter.app import Deps

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
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
    files: counts left by a previous run would be summed into this one's.
    """
    if "prometheus_client" in sys.modules:
        raise RuntimeError(
            "prometheus_client was imported before its multiprocess directory was set"
        )
    given = os.environ.get(MULTIPROC_ENV)
    if not given:
        created = tempfile.mkdtemp(prefix="mcn-exporter-metrics-")
        os.environ[MULTIPROC_ENV] = created
        return MetricsDir(created, owner_pid=os.getpid())
    try:
        os.makedirs(given, exist_ok=True)
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


def initialise_store(config: Config) -> None:
    """The schema and the zero series, once, in the master, before workers fork.

    A store that cannot be opened is a StartupError naming the file and what to do.
    """
    from exporter.metrics import initial_rows

    layout = tally_layout(config)
    path = Path(config.store.path)
    try:
        store = SqliteCallStore(
            path, layout, store_seed(config, layout), lock_timeout=store_lock_timeout(config)
        )
        try:
            store.ensure_rows(initial_rows(config, layout))
            for account, extensions in config.extensions.items():
                store.reserve_extensions(account, extensions)
        finally:
            store.close()
    except (StoreUnavailable, sqlite3.DatabaseError, OSError) as exc:
        raise StartupError(_store_error(path, exc)) from exc


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
    config: Config, clock: Clock = time.time, multiprocess_dir: str | None = None
) -> Deps:
    """One worker's parts: its own store connections, metrics and call tracker."""
    from exporter.app import Deps
    from exporter.metrics import build_metrics

    layout = tally_layout(config)
    store = SqliteCallStore(
        Path(config.store.path),
        layout,
        store_seed(config, layout),
        lock_timeout=store_lock_timeout(config),
    )
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
