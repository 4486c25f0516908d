"""The call store under a running server: its file deleted, replaced or corrupted meanwhile."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from exporter.store.sqlite import FAILURE_HOLD, PROBE_FRESH
from tests.conftest import ACCOUNT, SECRET, ServerProcess
from tests.test_store_failures import index_page, overwrite

pytestmark = pytest.mark.server

StartServer = Callable[..., ServerProcess]
STARTED = "mcn_calls_started_total"


def has_open(pid: int, path: Path) -> bool:
    """Whether process `pid` has the file at `path` open."""
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def start(call_id: str) -> bytes:
    body = {
        "event_type": "onInCallingStart",
        "abon": 108,
        "did": "+421222202999",
        "call_id": call_id,
        "secret": SECRET,
        "account_id": ACCOUNT,
    }
    return json.dumps(body).encode()


def store_path(server: ServerProcess) -> Path:
    return server.config_path.parent / "calls.sqlite3"


def stored_call_ids(path: Path) -> set[str]:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
        return {row[0] for row in connection.execute("SELECT call_id FROM legs")}


def started_total(server: ServerProcess) -> float:
    series = server.samples()[STARTED]
    return sum(value for labels, value in series.items() if ("extension", "108") in labels)


def post_starts(server: ServerProcess, prefix: str, count: int) -> dict[str, int]:
    """Posts `count` starts one after another, each retried on 503 as the provider would."""
    statuses: dict[str, int] = {}
    for n in range(count):
        call_id = f"{prefix}-{n}"
        deadline = time.monotonic() + 60
        while True:
            status, body = server.post(start(call_id))
            if status != 503 or time.monotonic() > deadline:
                break
            assert json.loads(body)["reason"] == "store_unavailable"
            time.sleep(0.05)
        statuses[call_id] = status
    return statuses


def replace_with_a_fresh_store(path: Path) -> None:
    """Another store moved over the path, as restoring a backup does."""
    other = path.with_name("restored.sqlite3")
    with closing(sqlite3.connect(other)) as connection, connection:
        connection.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    os.replace(other, path)


def delete(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("move", [delete, replace_with_a_fresh_store])
def test_a_store_file_moved_under_a_running_server_loses_no_acknowledged_event(
    start_server: StartServer, move: Callable[[Path], None]
) -> None:
    server = start_server(workers=2)
    path = store_path(server)
    assert set(post_starts(server, "before", 20).values()) == {200}

    move(path)
    statuses = post_starts(server, "after", 40)

    # Every start acknowledged after the move is in the file at the path, and counted.
    assert set(statuses.values()) == {200}
    assert set(statuses) <= stored_call_ids(path)
    assert not any(call_id.startswith("before") for call_id in stored_call_ids(path))
    assert started_total(server) == 40
    assert server.get("/readyz")[0] == 200
    # The configured series are back at zero: the recreated file has the master's seed.
    unmatched = server.samples()["mcn_call_events_unmatched_total"]
    assert unmatched
    assert set(unmatched.values()) == {0.0}
    assert server.process is not None
    assert server.process.poll() is None


def test_readyz_follows_whether_events_can_be_stored(start_server: StartServer) -> None:
    server = start_server(workers=2)
    path = store_path(server)
    assert set(post_starts(server, "before", 5).values()) == {200}
    assert server.get("/readyz")[0] == 200

    offset, size = index_page(path, "legs_by_call_id")
    original = path.read_bytes()[offset : offset + size]
    overwrite(path, offset, b"\xff" * size)
    status, _ = server.post(start("refused"))
    assert status == 503
    time.sleep(PROBE_FRESH + 0.5)  # a write that succeeded just before stands for that long
    for _ in range(10):  # whichever worker answers
        assert server.get("/readyz")[0] == 503

    overwrite(path, offset, original)
    deadline = time.monotonic() + 60
    while server.get("/readyz")[0] != 200:
        assert time.monotonic() < deadline, "readyz did not come back"
        time.sleep(0.2)
    assert set(post_starts(server, "after", 5).values()) == {200}
    # Then ready whichever worker answers: the one whose last failure is within FAILURE_HOLD
    # and that took none of the events may say 503 until its hold ends, then never again.
    deadline = time.monotonic() + FAILURE_HOLD + 30
    ready_in_a_row = 0
    while ready_in_a_row < 10:
        assert time.monotonic() < deadline, "readyz did not stay at 200"
        ready_in_a_row = ready_in_a_row + 1 if server.get("/readyz")[0] == 200 else 0


def test_a_store_file_deleted_under_concurrent_webhooks_keeps_every_later_acknowledgement(
    start_server: StartServer,
) -> None:
    server = start_server(workers=2)
    path = store_path(server)
    deleted = threading.Event()
    acknowledged_after: list[set[str]] = []

    def client(n: int) -> None:
        statuses = post_starts(server, f"c{n}-early", 30)
        assert set(statuses.values()) == {200}
        deleted.wait(timeout=60)
        later = post_starts(server, f"c{n}-late", 30)
        assert set(later.values()) == {200}
        acknowledged_after.append(set(later))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # while the early starts are being posted
    path.unlink()
    deleted.set()
    for thread in threads:
        thread.join(timeout=120)

    assert len(acknowledged_after) == 4
    kept = stored_call_ids(path)
    for later in acknowledged_after:
        assert later <= kept
    assert started_total(server) == len(kept)


def test_a_worker_replaced_while_the_store_cannot_be_opened_keeps_the_exporter_up(
    start_server: StartServer,
) -> None:
    """gunicorn stops the whole server when a worker fails to start: a worker started while
    the store cannot be opened (its -wal deleted by hand here, which SQLite then fails to
    read) answers 503 until it can be opened."""
    server = start_server(workers=2)
    path = store_path(server)
    assert set(post_starts(server, "before", 10).values()) == {200}
    wal = Path(f"{path}-wal")
    deadline = time.monotonic() + 60
    while not all(has_open(pid, wal) for pid in server.worker_pids()):
        assert time.monotonic() < deadline, "the workers did not open the store"
        time.sleep(0.1)
    wal.unlink()
    wal.touch(0o600)
    killed = server.worker_pids()[0]
    os.kill(killed, signal.SIGKILL)
    server.wait_for_workers(2, excluding=[killed])
    deadline = time.monotonic() + 60
    while "answering 503 until it can be opened" not in server.log():
        assert server.process is not None
        assert server.process.poll() is None, f"the server stopped:\n{server.log()}"
        assert time.monotonic() < deadline, "the new worker did not start"
        time.sleep(0.1)

    statuses = post_starts(server, "after", 20)

    assert set(statuses.values()) == {200}
    assert set(statuses) <= stored_call_ids(path)
    deadline = time.monotonic() + 60
    while server.get("/readyz")[0] != 200:
        assert time.monotonic() < deadline, "readyz did not come back"
        time.sleep(0.2)
    assert server.process is not None
    assert server.process.poll() is None
