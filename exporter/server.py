"""`mcn-exporter serve`: the Falcon app under gunicorn, started from Python.

prometheus_client picks its multiprocess mode when it is first imported, so the metrics
directory is prepared, and the environment variable set, before anything imports it.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import sys
import tempfile
from typing import Any

from gunicorn.app.base import BaseApplication

from exporter.config import Config
from exporter.logs import configure_logging, gunicorn_log_config
from exporter.worker import worker_class

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
log = logging.getLogger("exporter.server")


def run(config: Config, bind: str | None = None, workers: int | None = None) -> int:
    configure_logging(config.logging)
    metrics_dir, owned = prepare_metrics_dir()
    try:
        initialise_store(config)
        options = gunicorn_options(config, bind, workers)
        log.info(
            "serving on %s with %d worker(s); call store %s",
            options["bind"],
            options["workers"],
            config.store.path,
        )
        _warn_on_example_secret(config)
        ExporterApplication(config, metrics_dir, options).run()
    finally:
        if owned:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def prepare_metrics_dir() -> tuple[str, bool]:
    """A dedicated, empty directory for prometheus_client's per-worker files.

    Returns the directory and whether we created it (and so remove it at exit). A directory the
    user named in PROMETHEUS_MULTIPROC_DIR is kept, but emptied of metric files: counts left by a
    previous run would be summed into this one's.
    """
    if "prometheus_client" in sys.modules:
        raise RuntimeError(
            "prometheus_client was imported before its multiprocess directory was set"
        )
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        os.makedirs(given, exist_ok=True)
        for stale in glob.glob(os.path.join(given, "*.db")):
            os.remove(stale)
        return given, False
    created = tempfile.mkdtemp(prefix="mcn-exporter-metrics-")
    os.environ[MULTIPROC_ENV] = created
    return created, True


def initialise_store(config: Config) -> None:
    """Create the schema and the zero series once, in the master, before workers fork."""
    from exporter.app import tally_layout
    from exporter.metrics import initial_rows
    from exporter.store import SqliteCallStore

    layout = tally_layout(config)
    store = SqliteCallStore(config.store.path, layout)
    try:
        store.ensure_rows(initial_rows(config, layout))
        for account, extensions in config.extensions.items():
            store.reserve_extensions(account, extensions)
    finally:
        store.close()


def gunicorn_options(config: Config, bind: str | None, workers: int | None) -> dict[str, Any]:
    return {
        "bind": bind or config.server.bind,
        "workers": workers or config.server.workers,
        # gthread keeps connections alive for a provider that posts directly, with no proxy; this
        # one gives its threads only whole requests, so slow or silent clients hold none.
        "worker_class": worker_class(config.server),
        "threads": config.server.threads,
        "timeout": int(config.server.timeout),
        "graceful_timeout": 30,
        "keepalive": 5,
        # Each restarted worker leaves a metrics file behind that every scrape merges: no churn.
        "max_requests": 0,
        "preload_app": False,
        "accesslog": None,
        "errorlog": "-",
        # gunicorn's info lines (workers booting) are noise at our info level.
        "loglevel": "warning" if config.logging.level == "info" else config.logging.level,
        "logconfig_dict": gunicorn_log_config(config.logging) or {},
        "proc_name": "mcn-exporter",
        "worker_tmp_dir": "/dev/shm" if os.path.isdir("/dev/shm") else None,
    }


class ExporterApplication(BaseApplication):  # type: ignore[misc]
    def __init__(self, config: Config, metrics_dir: str, options: dict[str, Any]) -> None:
        self._config = config
        self._metrics_dir = metrics_dir
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # Runs in each worker after the fork: every worker opens its own store connections.
        from exporter.app import build_deps, create_app

        configure_logging(self._config.logging)
        return create_app(build_deps(self._config, multiprocess_dir=self._metrics_dir))


def _warn_on_example_secret(config: Config) -> None:
    for account in config.accounts.values():
        if account.secret == "SecretToken":
            log.warning(
                "account %d uses the example secret from the provider's documentation; "
                "set your own in the portal and in the config",
                account.id,
            )
