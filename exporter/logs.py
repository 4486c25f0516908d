"""Logging set-up: plain lines or one JSON object per line, on standard error."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exporter.config import LoggingConfig

LOGGER_NAME = "exporter"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(config: LoggingConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
        )
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers[:] = [handler]
    logger.setLevel(config.level.upper())
    logger.propagate = False


def gunicorn_log_config(config: LoggingConfig) -> dict[str, Any] | None:
    """gunicorn's own lines in the same JSON shape as ours, when JSON logs are asked for."""
    if not config.json:
        return None
    level = "WARNING" if config.level == "info" else config.level.upper()
    handler = {"handlers": ["stderr"], "level": level, "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "exporter.logs.JsonFormatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
        "loggers": {"gunicorn.error": handler, "gunicorn.access": handler},
    }


class ThrottledLog:
    """At most one line per key per interval, so that a flood of bad requests cannot flood the log.

    The first line of a key is written at once. Lines of the same key within `interval` after it
    are only counted; the next one after that is written with how many there were since the last
    line written, itself included ("webhook rejected: unauthorized x 1532 in the last 60 s, last
    from 1.2.3.4: secret does not match"). So a burst that stops shows its count with the next
    line of its key; the exact counts are in the metrics.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, _KeyState] = {}

    def log(self, level: int, key: str, detail: str) -> None:
        """One occurrence of `key`; `detail` is that of this occurrence (never a secret)."""
        with self._lock:
            now = self._clock()
            state = self._keys.get(key)
            if state is not None and now - state.written < self._interval:
                state.held += 1
                return
            self._keys[key] = _KeyState(written=now)
        if state is None or state.held == 0:
            self._logger.log(level, "%s %s", key, detail)
        else:
            count, seconds = state.held + 1, now - state.written
            self._logger.log(
                level, "%s x %d in the last %.0f s, last %s", key, count, seconds, detail
            )


@dataclass
class _KeyState:
    written: float  # when the last line of the key was written
    held: int = 0  # occurrences since then that wrote no line
