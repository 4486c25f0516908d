"""Logs: secrets and phone numbers stay out of them at info level."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable

import pytest

from tests.conftest import ACCOUNT, SECRET, ServerProcess, all_webhooks

PHONE_NUMBERS = ("0222202999", "74951059995", "421222202999", "421233005500", "421905123456")
WRONG_SECRET = "wrong-secret-7731"


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
