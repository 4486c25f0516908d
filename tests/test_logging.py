"""Logs: secrets and phone numbers stay out of them at info level."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from exporter.logs import InvalidRequestFilter, ThrottledLog
from tests.conftest import ACCOUNT, SECRET, Exporter, FakeClock, ServerProcess, all_webhooks

PHONE_NUMBERS = ("0222202999", "74951059995", "421222202999", "421233005500", "421905123456")
WRONG_SECRET = "wrong-secret-7731"
REFUSED_BODY = {
    "event_type": "onInCallingStart",
    "abon": "1",
    "did": "+421905123456",
    "secret": WRONG_SECRET,
    "account_id": ACCOUNT,
}


@pytest.mark.server
def test_log_of_a_run_with_secrets_and_phone_numbers_contains_neither(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server(workers=2, logging={"level": "info"})
    for path in all_webhooks():
        assert server.post(path.read_bytes())[0] == 200
    for body in (
        {
            "event_type": "onInCallingStart",
            "abon": "1",
            "did": "+421905123456",
            "secret": WRONG_SECRET,
            "account_id": ACCOUNT,
        },
        {
            "event_type": "onInCallingStart",
            "abon": "1",
            "did": "+421905123456",
            "secret": SECRET,
            "account_id": 4242,
        },
        {
            "event_type": "onInCallingStart",
            "abon": "1 2",
            "did": "+421905123456",
            "secret": SECRET,
            "account_id": ACCOUNT,
            "x": "y" * 40,
        },
        {
            "event_type": "onInCallingStart",
            "abon": "1",
            "did": 421222202999,
            "secret": SECRET,
            "account_id": ACCOUNT,
        },
    ):
        assert server.post(json.dumps(body).encode())[0] in (401, 403, 422)
    assert (
        server.post(b'{"secret": "' + WRONG_SECRET.encode() + b'", "did": "0222202999"')[0] == 400
    )
    server.get("/metrics")
    server.stop()

    log = server.log()
    assert "webhook rejected" in log  # the rejections were logged, without their contents
    for secret in (SECRET, WRONG_SECRET):
        assert secret not in log
    digits_in_log = re.sub(r"\D", "", log)
    for number in PHONE_NUMBERS:
        assert number not in log
        assert number not in digits_in_log


@pytest.mark.server
def test_json_logs_hold_gunicorn_lines_too(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(workers=2, logging={"level": "info", "json": True})
    assert server.post(b"{}")[0] == 422
    os.kill(server.worker_pids()[0], signal.SIGKILL)  # gunicorn itself reports this one
    deadline = time.monotonic() + 30
    while "SIGKILL" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    server.stop()

    entries = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    loggers = {entry["logger"] for entry in entries}
    assert {"exporter.http", "exporter.server", "gunicorn.error"} <= loggers
    assert all({"time", "level", "message"} <= entry.keys() for entry in entries)


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


@pytest.fixture
def written() -> Iterator[list[str]]:
    logger = logging.getLogger("tests.throttled")
    handler = ListHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.lines
    logger.removeHandler(handler)


def throttled(clock: FakeClock) -> ThrottledLog:
    return ThrottledLog(logging.getLogger("tests.throttled"), interval=60, clock=clock)


def test_first_line_of_a_key_is_written_at_once_and_the_next_within_the_interval_held(
    written: list[str], clock: FakeClock
) -> None:
    lines = throttled(clock)
    lines.log(logging.WARNING, "webhook rejected: unauthorized", "from 1.2.3.4: no")
    clock.advance(59.9)
    lines.log(logging.WARNING, "webhook rejected: unauthorized", "from 1.2.3.5: no")
    assert written == ["WARNING webhook rejected: unauthorized from 1.2.3.4: no"]


def test_after_the_interval_one_line_counts_those_held_and_shows_the_last(
    written: list[str], clock: FakeClock
) -> None:
    lines = throttled(clock)
    first = clock.now
    lines.log(logging.WARNING, "webhook rejected: unauthorized", "from 1.2.3.4: first")
    for n in range(1532):
        clock.advance(0.01)
        lines.log(logging.WARNING, "webhook rejected: unauthorized", f"from 1.2.3.4: {n}")
    clock.now = first + 60
    lines.log(logging.WARNING, "webhook rejected: unauthorized", "from 5.6.7.8: last")
    assert written[1:] == [
        "WARNING webhook rejected: unauthorized x 1533 in the last 60 s, last from 5.6.7.8: last"
    ]


def test_each_key_has_its_own_interval(written: list[str], clock: FakeClock) -> None:
    lines = throttled(clock)
    for _ in range(3):
        lines.log(logging.WARNING, "webhook rejected: unauthorized", "u")
        lines.log(logging.ERROR, "call store unavailable", "s")
    assert written == ["WARNING webhook rejected: unauthorized u", "ERROR call store unavailable s"]


def test_a_key_quiet_for_an_interval_gets_a_plain_line_again(
    written: list[str], clock: FakeClock
) -> None:
    lines = throttled(clock)
    lines.log(logging.WARNING, "k", "one")
    clock.advance(600)
    lines.log(logging.WARNING, "k", "two")
    clock.advance(1)
    lines.log(logging.WARNING, "k", "three")  # held
    clock.advance(60)
    lines.log(logging.WARNING, "k", "four")
    assert written == [
        "WARNING k one",
        "WARNING k two",
        "WARNING k x 2 in the last 61 s, last four",
    ]


def test_a_flood_of_refusals_writes_one_line_per_reason_without_secrets_or_numbers(
    exporter: Exporter,
) -> None:
    logger = logging.getLogger("exporter.http")
    handler = ListHandler()
    logger.addHandler(handler)
    try:
        for n in range(50):
            wrong = {**REFUSED_BODY, "secret": f"{WRONG_SECRET}{n}"}
            assert exporter.post(wrong).status_code == 401
            assert exporter.post(b"not json").status_code == 400
            assert exporter.client.simulate_get("/webhook").status_code == 405
    finally:
        logger.removeHandler(handler)
    assert sorted(handler.lines) == [
        "WARNING webhook rejected: malformed from 127.0.0.1: body is not valid JSON",
        "WARNING webhook rejected: method_not_allowed from 127.0.0.1: "
        "method not allowed here; allowed: POST",
        "WARNING webhook rejected: unauthorized from 127.0.0.1: secret does not match",
    ]
    assert exporter.samples()["mcn_webhook_rejected_total"][(("reason", "unauthorized"),)] == 50


def test_an_unavailable_store_writes_one_error_line_not_one_per_request(
    exporter: Exporter, tmp_path: Path
) -> None:
    exporter.deps.store.close()
    for name in ("calls.sqlite3", "calls.sqlite3-wal", "calls.sqlite3-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    (tmp_path / "calls.sqlite3").write_bytes(b"this is not a database" * 100)
    logger = logging.getLogger("exporter.http")
    handler = ListHandler()
    logger.addHandler(handler)
    try:
        for _ in range(20):
            assert exporter.post(REFUSED_BODY | {"secret": SECRET}).status_code == 503
            assert exporter.client.simulate_get("/readyz").status_code == 503
    finally:
        logger.removeHandler(handler)
    assert len(handler.lines) == 1
    assert handler.lines[0].startswith("ERROR call store unavailable on POST /webhook: ")
    for number in PHONE_NUMBERS:
        assert number not in handler.lines[0]


def gunicorn_record(message: str) -> logging.LogRecord:
    return logging.LogRecord("gunicorn.error", logging.WARNING, "", 0, message, (), None)


def test_gunicorn_invalid_request_lines_are_throttled_by_kind_of_error(clock: FakeClock) -> None:
    only = InvalidRequestFilter(interval=60, clock=clock)
    bad_line = "Invalid request from ip=203.0.113.7: Invalid HTTP request line: 'GET ?x HTTP/1.1'"
    bad_method = "Invalid request from ip=::1: Invalid HTTP method: 'get'"
    assert only.filter(gunicorn_record(bad_line))
    assert only.filter(gunicorn_record(bad_method))
    assert only.filter(gunicorn_record("Worker (pid:7) was sent SIGKILL! Perhaps out of memory?"))
    for _ in range(1532):
        clock.advance(0.01)
        assert not only.filter(gunicorn_record(bad_line))
    assert not only.filter(gunicorn_record(bad_method))
    clock.now += 60
    last = gunicorn_record(bad_line)
    assert only.filter(last)
    assert last.getMessage() == f"{bad_line} (x 1533 in the last 75 s)"


@pytest.mark.server
def test_a_flood_of_requests_gunicorn_cannot_parse_writes_one_line(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server(workers=1, logging={"level": "info"})
    for _ in range(30):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"GET ?x HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
    server.stop()
    lines = [line for line in server.log().splitlines() if "Invalid request from" in line]
    assert len(lines) == 1, lines
    assert "[WARNING] Invalid request from ip=127.0.0.1: Invalid HTTP request line" in lines[0]
