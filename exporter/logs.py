"""Logging set-up: plain lines or one JSON object per line, on standard error."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gunicorn import glogging

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


def gunicorn_log_config(config: LoggingConfig) -> dict[str, Any]:
    """gunicorn's own lines: in our JSON shape when asked, and its invalid requests throttled."""
    level = "WARNING" if config.level == "info" else config.level.upper()
    handler = {"handlers": ["stderr"], "level": level, "propagate": False}
    formatter = (
        {"()": "exporter.logs.JsonFormatter"}
        if config.json
        else {"format": GUNICORN_FORMAT, "datefmt": GUNICORN_DATE_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"gunicorn": formatter},
        "filters": {"invalid_requests": {"()": "exporter.logs.InvalidRequestFilter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "gunicorn",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
        "loggers": {
            "gunicorn.error": {**handler, "filters": ["invalid_requests"]},
            "gunicorn.access": handler,
        },
    }


class GunicornLogger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's logger with no access log: the exporter writes none (the reverse proxy has
    one). gunicorn takes any logging config as a wish for access lines, and would build a line
    for every request only for its level to drop it."""

    @property
    def access_log_enabled(self) -> bool:
        return False

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        return None


GUNICORN_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"  # gunicorn's own
GUNICORN_DATE_FORMAT = "[%Y-%m-%d %H:%M:%S %z]"
LINE_INTERVAL = 60.0  # seconds between two lines of the same kind of refused request


@dataclass(frozen=True)
class Passage:
    """A line let through: `count` occurrences of its key since the previous line, itself
    included, over `seconds` (0 for the first line of the key)."""

    count: int
    seconds: float


class Throttle:
    """Lets the first occurrence of a key through, then at most one per `interval`.

    The occurrences in between are only counted, and the next one let through carries their
    number. So a burst that stops shows its count with the next line of its key.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()  # the threads of a gthread worker share it
        self._keys: dict[str, _KeyState] = {}

    def admit(self, key: str) -> Passage | None:
        with self._lock:
            now = self._clock()
            state = self._keys.get(key)
            if state is not None and now - state.passed < self._interval:
                state.held += 1
                return None
            self._keys[key] = _KeyState(passed=now)
        if state is None:
            return Passage(count=1, seconds=0.0)
        return Passage(count=state.held + 1, seconds=now - state.passed)


@dataclass
class _KeyState:
    passed: float  # when the key was last let through
    held: int = 0  # occurrences since then that were not


class ThrottledLog:
    """At most one line per key per interval, so that a flood of bad requests cannot flood the log.

    "webhook rejected: unauthorized from 1.2.3.4: secret does not match" at once, then, an
    interval later at the earliest, "webhook rejected: unauthorized x 1532 in the last 60 s, last
    from 1.2.3.4: secret does not match". The exact counts are in the metrics.
    """

    def __init__(
        self, logger: logging.Logger, interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._logger = logger
        self._throttle = Throttle(interval, clock)

    def log(self, level: int, key: str, detail: str) -> None:
        """One occurrence of `key`; `detail` is that of this occurrence (never a secret)."""
        passage = self._throttle.admit(key)
        if passage is None:
            return
        if passage.count == 1:
            self._logger.log(level, "%s %s", key, detail)
        else:
            self._logger.log(
                level,
                "%s x %d in the last %.0f s, last %s",
                key,
                passage.count,
                passage.seconds,
                detail,
            )


class InvalidRequestFilter(logging.Filter):
    """gunicorn's line for each request it cannot parse, throttled by kind of error.

    gunicorn writes "Invalid request from ip=1.2.3.4: Invalid HTTP request line: '...'" at
    WARNING for every one: anyone could flood the log with them.
    """

    LINE = re.compile(r"Invalid request from ip=[^ ]*: (?P<kind>[^:]{1,60})")

    def __init__(
        self, interval: float = LINE_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._throttle = Throttle(interval, clock)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        line = self.LINE.match(message)
        if line is None:
            return True
        passage = self._throttle.admit(line["kind"])
        if passage is None:
            return False
        if passage.count > 1:
            record.msg = f"{message} (x {passage.count} in the last {passage.seconds:.0f} s)"
            record.args = ()
        return True
