"""`mcn-exporter serve`: the Falcon app under gunicorn, started from Python.

The order of start-up is `exporter.startup`'s; this module runs it and holds what is gunicorn's:
its settings, the master's stop lines, and the hooks that tie each worker to its master.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

from exporter.config import Config, example_secret_accounts
from exporter.logs import configure_logging, gunicorn_log_config
from exporter.startup import (
    StartupError,
    build_deps,
    initialise_store,
    prepare_metrics_dir,
)
from exporter.worker import worker_class

if TYPE_CHECKING:
    from exporter.app import Deps

EXIT_STARTUP_ERROR = 2
GRACEFUL_TIMEOUT = 30
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
log = logging.getLogger("exporter.server")


def run(config: Config, bind: str | None = None, workers: int | None = None) -> int:
    configure_logging(config.logging)
    try:
        metrics_dir = prepare_metrics_dir()
    except StartupError as exc:
        log.error("%s", exc)
        return EXIT_STARTUP_ERROR
    master_pid = os.getpid()
    try:
        store_prepared = initialise_store(config)
        options = gunicorn_options(config, bind, workers)
        log.info(
            "serving on %s with %d worker(s); call store %s",
            options["bind"],
            options["workers"],
            config.store.describe(),
        )
        _warn_on_example_secret(config)
        ExporterApplication(config, metrics_dir.path, options, store_prepared).run()
    except StartupError as exc:
        log.error("%s", exc)
        return EXIT_STARTUP_ERROR
    except SystemExit as exc:
        if os.getpid() != master_pid:
            raise  # a worker leaving: the master's exit is not its to report
        return _stopped(exc.code)
    finally:
        metrics_dir.remove()
    return _stopped(0)


def _stopped(code: object) -> int:
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if status == 0:
        log.info("stopped")
    else:
        log.error("stopped with exit status %d", status)
    return status


def gunicorn_options(config: Config, bind: str | None, workers: int | None) -> dict[str, Any]:
    return {
        "bind": bind or config.server.bind,
        "workers": workers or config.server.workers,
        # gthread keeps connections alive for a provider that posts directly, with no proxy; this
        # one gives its threads only whole requests, so slow or silent clients hold none.
        "worker_class": worker_class(config.server),
        "threads": config.server.threads,
        "timeout": int(config.server.timeout),
        "graceful_timeout": GRACEFUL_TIMEOUT,
        "keepalive": 5,
        # The worker sends an answer's writes at once (exporter/worker.py): nothing beside them.
        "sendfile": False,
        # Each restarted worker leaves a metrics file behind that every scrape merges: no churn.
        "max_requests": 0,
        "preload_app": False,
        "accesslog": None,
        "logger_class": "exporter.logs.GunicornLogger",
        "errorlog": "-",
        # gunicorn's info lines (workers booting) are noise at our info level.
        "loglevel": "warning" if config.logging.level == "info" else config.logging.level,
        "logconfig_dict": gunicorn_log_config(config.logging) or {},
        "proc_name": "mcn-exporter",
        "worker_tmp_dir": "/dev/shm" if os.path.isdir("/dev/shm") else None,
        # gunicorn's control socket is one path per user by default, taken over by whichever
        # server started last; the signals do all the exporter needs.
        "control_socket_disable": True,
    }


class ExporterApplication(BaseApplication):  # type: ignore[misc]
    def __init__(
        self,
        config: Config,
        metrics_dir: str,
        options: dict[str, Any],
        store_prepared: bool = False,
    ) -> None:
        self._config = config
        self._metrics_dir = metrics_dir
        self._options = options
        self._store_prepared = store_prepared
        self._deps: Deps | None = None
        super().__init__()

    def load_config(self) -> None:
        # Also run again by the master on SIGHUP, before it replaces the workers: the same
        # settings, so a reload restarts the workers on the config read at start.
        for key, value in self._options.items():
            self.cfg.set(key, value)
        self.cfg.set("on_reload", _log_reload)
        self.cfg.set("post_fork", tie_to_master)
        self.cfg.set("worker_exit", self._close_store)

    def load(self) -> Any:
        # Runs in each worker after the fork: every worker opens its own store connections.
        from exporter.app import create_app

        configure_logging(self._config.logging)
        self._deps = build_deps(
            self._config,
            multiprocess_dir=self._metrics_dir,
            store_prepared=self._store_prepared,
            in_worker=True,
        )
        return create_app(self._deps)

    def run(self) -> None:
        StopLoggingArbiter(self).run()

    def _close_store(self, server: Any, worker: Any) -> None:
        """gunicorn's worker_exit hook: the store commits the changes it still holds."""
        if self._deps is not None:
            self._deps.store.close()


class StopLoggingArbiter(Arbiter):  # type: ignore[misc]
    """gunicorn's master, saying when it starts to drain (SIGTERM, SIGINT, SIGQUIT), and able
    to re-execute itself for an upgrade on the fly (USR2) when started as `python -m exporter`."""

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.START_CTX["args"] = reexec_args(sys.argv, sys.modules["__main__"])

    def stop(self, graceful: bool = True) -> None:
        if self.WORKERS and self.LISTENERS:  # the first call: the listeners close below
            if graceful:
                log.info(
                    "draining: no new connections; requests in flight get up to %d s",
                    self.cfg.graceful_timeout,
                )
            else:
                log.info("stopping now: workers quit without draining")
        super().stop(graceful)


def reexec_args(argv: list[str], main: Any) -> list[str]:
    """The command that starts this master again. gunicorn runs `python argv[0] ...`, which for
    `python -m exporter` is the package's __main__.py as a script: its directory first on the
    path, where `exporter/numbers.py` hides the standard library's `numbers`."""
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name == "exporter.__main__":
        return [sys.executable, "-m", "exporter", *argv[1:]]
    return [sys.executable, *argv]


def _log_reload(server: Any) -> None:
    log.info("reloading: replacing the workers, on the config read at start")


def tie_to_master(server: Any, worker: Any) -> None:
    """gunicorn's post_fork hook, in the new worker: it dies with its master.

    A worker outliving a killed master keeps serving and holds the port, so the restart that
    follows cannot bind it. The kernel kills the worker instead, like a killed worker, which
    loses nothing acknowledged (a change is committed before it is answered). The kernel's
    signal follows the thread that forked: gunicorn forks its workers from its main thread
    only, so the signal means the master is gone.
    """
    if not _kill_on_parent_death():
        threading.Thread(target=_watch_parent, args=(worker.ppid,), daemon=True).start()
    if os.getppid() != worker.ppid:  # the master died before the kernel was told
        os.kill(os.getpid(), signal.SIGKILL)


def _kill_on_parent_death() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(master_pid: int) -> None:
    """Where the kernel cannot do it: checks for the master, twice a second."""
    while os.getppid() == master_pid:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def _warn_on_example_secret(config: Config) -> None:
    for account_id in example_secret_accounts(config):
        log.warning(
            "account %d uses the example secret from the provider's documentation; "
            "set your own in the portal and in the config",
            account_id,
        )
