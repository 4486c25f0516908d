"""The call store when its file is deleted, replaced, corrupt or unwritable, and its file modes."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

import exporter.store.sqlite
from exporter.events import Direction, Service
from exporter.legs import CounterRow, Leg, LegLabels, TallyKind, TallyLayout
from exporter.store import SqliteCallStore, StoreSeed, StoreUnavailable
from tests.conftest import ACCOUNT
from tests.test_store import stored_call_ids

LAYOUT = TallyLayout(ring_buckets=(5.0, 20.0), talk_buckets=(60.0,))
LABELS = LegLabels(ACCOUNT, Service.VPBX, Direction.INBOUND, "108")
SEED = StoreSeed(
    rows=(CounterRow(TallyKind.OVERFLOW, (str(ACCOUNT),)),),
    extensions=((ACCOUNT, ("108", "109")),),
)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "calls.sqlite3"


@pytest.fixture
def store(path: Path) -> Iterator[SqliteCallStore]:
    store = SqliteCallStore(path, LAYOUT, SEED)
    yield store
    store.close()


def add_leg(
    store: SqliteCallStore, call_id: str, during: Callable[[], None] = lambda: None
) -> None:
    with store.transaction() as tx:
        tx.insert_leg(Leg(LABELS, "108", call_id, 1.0, 1.0), did=None)
        during()


def delete_store(path: Path) -> None:
    path.unlink()


def delete_store_and_journals(path: Path) -> None:
    for name in path.parent.glob(f"{path.name}*"):
        name.unlink()


def replace_store(path: Path) -> None:
    """What restoring a backup does: another store moved over the path."""
    other = path.with_name("restored.sqlite3")
    SqliteCallStore(other, LAYOUT).close()
    with closing(sqlite3.connect(other)) as connection, connection:
        connection.execute(
            "INSERT INTO legs (account, service, direction, abon, extension, call_id, opened_at)"
            " VALUES (1, 'vpbx', 'inbound', '1', '1', 'from-backup', 0)"
        )
    os.replace(other, path)


MOVES = [delete_store, delete_store_and_journals, replace_store]


@pytest.mark.parametrize("move", MOVES)
def test_a_change_written_as_the_file_moves_is_refused_and_the_next_is_kept(
    store: SqliteCallStore, path: Path, move: Callable[[Path], None]
) -> None:
    add_leg(store, "before")
    with pytest.raises(StoreUnavailable, match="deleted or replaced"):
        add_leg(store, "lost", during=lambda: move(path))
    add_leg(store, "after")

    kept = stored_call_ids(path)
    assert "lost" not in kept
    assert "after" in kept
    assert ("from-backup" in kept) == (move is replace_store)
    assert sum(store.snapshot().active.values()) == 1  # "after": the backup was written by hand


@pytest.mark.parametrize("move", [delete_store, delete_store_and_journals])
def test_a_deleted_store_is_recreated_with_its_seed_and_mode(
    store: SqliteCallStore, path: Path, move: Callable[[Path], None]
) -> None:
    add_leg(store, "before")
    move(path)
    store.ping()  # readiness alone recovers it: a worker with no traffic recreates it too

    assert stored_call_ids(path) == set()
    assert store.snapshot().counters[TallyKind.OVERFLOW] == {(str(ACCOUNT),): 0}
    with closing(sqlite3.connect(path)) as connection:
        assert set(connection.execute("SELECT account, extension FROM extensions")) == {
            (ACCOUNT, "108"),
            (ACCOUNT, "109"),
        }
    for name in path.parent.glob(f"{path.name}*"):
        assert stat.S_IMODE(name.stat().st_mode) == 0o600, name


def test_a_removed_directory_is_recreated(store: SqliteCallStore, path: Path) -> None:
    shutil.rmtree(path.parent)
    add_leg(store, "after")
    assert stored_call_ids(path) == {"after"}
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_every_change_of_a_shared_commit_is_refused_when_the_file_moves(
    store: SqliteCallStore, path: Path
) -> None:
    """The changes queued behind the first share its COMMIT, so they share its fate."""
    first_inside = threading.Event()
    release_first = threading.Event()
    refused: list[str] = []

    def change(name: str) -> None:
        def hold() -> None:
            if name == "c0":
                first_inside.set()
                release_first.wait(timeout=30)

        try:
            add_leg(store, name, during=hold)
        except StoreUnavailable:
            refused.append(name)

    first = threading.Thread(target=change, args=("c0",))
    first.start()
    assert first_inside.wait(timeout=30)
    queued = [threading.Thread(target=change, args=(f"c{n}",)) for n in range(1, 6)]
    for thread in queued:
        thread.start()
    while store._writes.waiting < len(queued):
        threading.Event().wait(0.001)
    path.unlink()
    release_first.set()
    for thread in [first, *queued]:
        thread.join(timeout=30)

    assert sorted(refused) == [f"c{n}" for n in range(6)]
    add_leg(store, "after")
    assert stored_call_ids(path) == {"after"}


def test_only_changes_in_the_file_at_its_path_are_acknowledged(
    store: SqliteCallStore, path: Path
) -> None:
    """Writers keep going while the file is deleted twice and replaced once."""
    acknowledged: list[tuple[int, str]] = []  # (moves done when the change began, call_id)
    moves_done = [0]
    stop = threading.Event()

    def writer(thread: int) -> None:
        n = 0
        while not stop.is_set():
            began = moves_done[0]
            try:
                add_leg(store, f"w{thread}-{n}")
                acknowledged.append((began, f"w{thread}-{n}"))
            except StoreUnavailable:
                pass
            n += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for move in (delete_store, replace_store, delete_store_and_journals):
        threading.Event().wait(0.2)
        move(path)
        moves_done[0] += 1
    threading.Event().wait(0.3)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)

    kept = stored_call_ids(path)
    after_last_move = {name for began, name in acknowledged if began == 3}
    assert after_last_move, "no change was acknowledged after the last move"
    assert after_last_move <= kept
    # Every change acknowledged by now is in the file or was written before its last move.
    assert {name for began, name in acknowledged if name not in kept} <= {
        name for began, name in acknowledged if began < 3
    }


def test_a_file_replaced_by_something_else_is_refused_until_a_store_is_back(
    store: SqliteCallStore, path: Path
) -> None:
    path.unlink()
    path.write_bytes(b"not a database at all" * 200)
    for attempt in range(2):
        with pytest.raises(StoreUnavailable, match="not a SQLite database or is corrupt"):
            add_leg(store, f"refused-{attempt}")
        with pytest.raises(StoreUnavailable):
            store.ping()
    path.unlink()
    add_leg(store, "after")
    assert stored_call_ids(path) == {"after"}


# -- several workers -------------------------------------------------------------------------


def serve_store(path: Path, orders: Connection) -> None:
    """A worker of its own: opens a store at `path`, then adds a leg per call id it is sent.

    Run in a process of its own: SQLite's locks, and its -shm, are per process."""
    try:
        store = SqliteCallStore(path, LAYOUT, SEED)
    except StoreUnavailable as exc:
        orders.send(f"unavailable: {exc}")
        return
    orders.send("open")
    while (call_id := orders.recv()) is not None:
        try:
            add_leg(store, call_id)
            orders.send("stored")
        except StoreUnavailable as exc:
            orders.send(f"unavailable: {exc}")
    store.close()
    orders.send("closed")


class Worker:
    """A process writing to the store at `path`, as a gunicorn worker does."""

    def __init__(self, path: Path) -> None:
        context = multiprocessing.get_context("spawn")
        self._orders, theirs = context.Pipe()
        self.process = context.Process(target=serve_store, args=(path, theirs), daemon=True)
        self.process.start()
        self.opening = self._answer()

    def add(self, call_id: str) -> str:
        self._orders.send(call_id)
        return self._answer()

    def stop(self) -> None:
        if self.process.is_alive():
            self._orders.send(None)
            self._answer()
        self.process.join(timeout=30)

    def _answer(self) -> str:
        assert self._orders.poll(60), "the worker did not answer"
        answer: str = self._orders.recv()
        return answer


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.process.kill()
        worker.process.join(timeout=30)


def read_call_ids(path: Path) -> set[str]:
    """What anyone opening the file at `path` reads (in this process, which has no
    connection to it)."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
        return {row[0] for row in connection.execute("SELECT call_id FROM legs")}


def add_in_turns(workers: list[Worker], rounds: int) -> list[str]:
    """Each worker adds a leg in turn; the call ids acknowledged."""
    acknowledged = []
    for n in range(rounds):
        for index, worker in enumerate(workers):
            call_id = f"w{index}-{n}"
            if worker.add(call_id) == "stored":
                acknowledged.append(call_id)
    return acknowledged


def test_a_worker_starting_after_the_file_was_deleted_shares_no_journal_with_the_old_file(
    path: Path, workers: list[Worker]
) -> None:
    """A worker started (or restarted) while another still has the deleted file open creates
    a new store: the old file's -wal and -shm, still at their paths and in use, are not its."""
    workers.append(Worker(path))
    assert workers[0].add("before") == "stored"
    path.unlink()  # its -wal and -shm stay, open in the first worker
    workers.append(Worker(path))
    assert workers[1].opening == "open"

    acknowledged = add_in_turns([workers[1], workers[0]], rounds=5)  # the new one first

    assert acknowledged[-2:] == ["w0-4", "w1-4"]  # both write to the new file by then
    assert set(acknowledged) <= read_call_ids(path)
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_a_worker_starting_after_the_file_was_replaced_shares_no_journal_with_the_old_file(
    path: Path, workers: list[Worker]
) -> None:
    """The same with another store moved over the path: not empty, so its first reader would
    take the old file's -wal, still at its path, for its own."""
    workers.append(Worker(path))
    assert workers[0].add("before") == "stored"
    replace_store(path)
    workers.append(Worker(path))
    assert workers[1].opening == "open"

    acknowledged = add_in_turns([workers[1], workers[0]], rounds=5)  # the new one first

    assert acknowledged[-2:] == ["w0-4", "w1-4"]
    assert {"from-backup", *acknowledged} <= read_call_ids(path)
    assert "before" not in read_call_ids(path)
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def replace_with_an_empty_file(name: str) -> None:
    os.unlink(name)
    Path(name).touch(0o600)


@pytest.mark.parametrize("journal", ["-wal", "-shm"])
def test_a_change_is_refused_when_its_journal_is_replaced_as_it_is_written(
    store: SqliteCallStore, path: Path, journal: str
) -> None:
    """The writer's -wal or -shm is then no longer the one anyone opening the path uses."""
    add_leg(store, "before")
    with pytest.raises(StoreUnavailable, match="deleted or replaced: the change was not kept"):
        add_leg(store, "lost", during=lambda: replace_with_an_empty_file(f"{path}{journal}"))
    add_leg(store, "after")
    assert {"before", "after"} <= stored_call_ids(path)


@pytest.mark.parametrize("journal", ["-wal", "-shm"])
def test_workers_follow_a_journal_replaced_at_its_path(
    path: Path, workers: list[Worker], journal: str
) -> None:
    """After a -wal or -shm is deleted or replaced by hand, the worker sees it before its next
    write and writes through the ones at the paths, as a new worker does: nothing
    acknowledged is lost."""
    workers.append(Worker(path))
    assert workers[0].add("before") == "stored"
    replace_with_an_empty_file(f"{path}{journal}")
    assert workers[0].add("after") == "stored"
    workers.append(Worker(path))
    assert workers[1].opening == "open"

    acknowledged = add_in_turns(workers, rounds=3)

    assert acknowledged == [f"w{w}-{n}" for n in range(3) for w in range(2)]
    assert {"after", *acknowledged} <= read_call_ids(path)
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


@pytest.mark.parametrize("by_hand", [os.unlink, replace_with_an_empty_file])
def test_a_worker_starting_after_the_wal_was_deleted_waits_for_the_one_using_it(
    path: Path, workers: list[Worker], by_hand: Callable[[str], None]
) -> None:
    """The -wal deleted by hand while a worker uses it: its -shm still indexes it. A worker
    starting then is refused rather than read that index against the -wal now there (or
    created); the worker using it copies it into the file at its next write: nothing is lost."""
    workers.append(Worker(path))
    assert workers[0].add("before") == "stored"
    by_hand(f"{path}-wal")

    assert "-wal was deleted or replaced" in Worker(path).opening
    assert workers[0].add("after") == "stored"
    workers.append(Worker(path))
    assert workers[1].opening == "open"
    acknowledged = add_in_turns([workers[1], workers[0]], rounds=3)

    assert acknowledged == [f"w{w}-{n}" for n in range(3) for w in range(2)]
    assert {"before", "after", *acknowledged} <= read_call_ids(path)


def test_a_worker_reading_as_its_shm_is_replaced_then_writes_through_the_new_one(
    store: SqliteCallStore, path: Path, workers: list[Worker]
) -> None:
    """SQLite keeps one -shm per file and process: the readers of the store close with its
    writer, or the new writer would share their old -shm."""
    add_leg(store, "before")
    store.snapshot()  # this thread's reader has the -shm open
    replace_with_an_empty_file(f"{path}-shm")
    add_leg(store, "after")
    workers.append(Worker(path))
    assert workers[0].opening == "open"

    assert workers[0].add("from-another-worker") == "stored"
    add_leg(store, "last")

    assert {"before", "after", "from-another-worker", "last"} <= read_call_ids(path)
    assert sum(store.snapshot().active.values()) == 4


def test_readers_open_only_the_file_the_writer_has_open(store: SqliteCallStore, path: Path) -> None:
    """Readers open the path without the process lock: not a file being created there."""
    add_leg(store, "before")
    path.unlink()
    path.touch(0o600)  # as a worker creating a new store leaves it, for a moment
    with pytest.raises(StoreUnavailable, match="being reopened"), store._reading():
        pass
    assert store.snapshot().active == {}  # a snapshot first follows the path
    add_leg(store, "after")
    assert stored_call_ids(path) == {"after"}


# -- readiness -------------------------------------------------------------------------------


def index_page(path: Path, index: str) -> tuple[int, int]:
    """The offset and size of an index's root page, with the WAL copied into the file."""
    with closing(sqlite3.connect(path)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (root,) = connection.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (index,)
        ).fetchone()
        (size,) = connection.execute("PRAGMA page_size").fetchone()
    return (root - 1) * size, size


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(data)
    # A commit from elsewhere makes every connection drop the pages it has cached.
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("INSERT OR REPLACE INTO meta VALUES ('touched', hex(randomblob(8)))")


@pytest.fixture
def no_failure_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exporter.store.sqlite, "FAILURE_HOLD", 0.0)


def test_ping_probes_the_indexes_events_write(
    store: SqliteCallStore, path: Path, no_failure_hold: None
) -> None:
    add_leg(store, "before")
    store.ping()
    offset, size = index_page(path, "legs_by_call_id")
    original = path.read_bytes()[offset : offset + size]

    overwrite(path, offset, b"\xff" * size)
    with pytest.raises(StoreUnavailable):
        add_leg(store, "refused")
    with pytest.raises(StoreUnavailable, match="malformed"):
        store.ping()  # its own probe fails: no event needed to see it

    overwrite(path, offset, original)
    store.ping()
    add_leg(store, "after")
    assert stored_call_ids(path) == {"before", "after"}


def test_ping_fails_while_the_last_write_failed_until_one_succeeds(
    store: SqliteCallStore, path: Path
) -> None:
    add_leg(store, "before")
    offset, size = index_page(path, "legs_by_call_id")
    original = path.read_bytes()[offset : offset + size]
    overwrite(path, offset, b"\xff" * size)
    with pytest.raises(StoreUnavailable):
        add_leg(store, "refused")
    overwrite(path, offset, original)

    with pytest.raises(StoreUnavailable, match="the last write failed"):
        store.ping()  # within FAILURE_HOLD, without a write since: not ready yet
    add_leg(store, "after")
    store.ping()


def test_ping_is_ready_again_after_the_hold_without_traffic(
    store: SqliteCallStore, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance taken out of rotation gets no events: its probe must bring it back."""
    add_leg(store, "before")
    offset, size = index_page(path, "legs_by_call_id")
    original = path.read_bytes()[offset : offset + size]
    overwrite(path, offset, b"\xff" * size)
    with pytest.raises(StoreUnavailable):
        add_leg(store, "refused")
    overwrite(path, offset, original)
    monkeypatch.setattr(exporter.store.sqlite, "FAILURE_HOLD", 0.0)
    store.ping()


# -- file modes ------------------------------------------------------------------------------


def test_the_store_and_its_directory_are_for_the_service_user_only(
    store: SqliteCallStore, path: Path
) -> None:
    add_leg(store, "one")
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == [f"{path.name}{suffix}" for suffix in ("", "-shm", "-wal", ".lock")]
    for name in path.parent.iterdir():
        assert stat.S_IMODE(name.stat().st_mode) == 0o600, name


def test_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    SqliteCallStore(tmp_path / "calls.sqlite3", LAYOUT).close()
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "calls.sqlite3").stat().st_mode) == 0o600


def test_an_existing_file_readable_by_others_is_warned_about_and_left_alone(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    SqliteCallStore(path, LAYOUT).close()
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="exporter.store"):
        SqliteCallStore(path, LAYOUT).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert any(
        "mode 644" in r.getMessage() and "chmod 600" in r.getMessage() for r in caplog.records
    )


# -- a corrupt file at start -----------------------------------------------------------------


def test_a_file_that_is_not_a_database_is_refused_with_what_to_do(path: Path) -> None:
    path.parent.mkdir()
    path.write_bytes(b"definitely not SQLite\n" * 500)
    with pytest.raises(StoreUnavailable) as refused:
        SqliteCallStore(path, LAYOUT)
    message = str(refused.value)
    assert str(path) in message
    assert "not a SQLite database or is corrupt" in message
    assert "restore it from a backup, or move it away to start with an empty store" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("offset", "data"),
    [(0, b"\0" * 100), (100, b"\xff" * 3996)],
    ids=["header", "schema"],
)
def test_a_store_with_a_corrupt_header_or_schema_is_refused_with_what_to_do(
    path: Path, offset: int, data: bytes
) -> None:
    SqliteCallStore(path, LAYOUT).close()
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(data)
    with pytest.raises(StoreUnavailable, match="not a SQLite database or is corrupt"):
        SqliteCallStore(path, LAYOUT)


FILE_SIZE_LIMIT_SCRIPT = """
import resource, signal, sys
from exporter.legs import TallyLayout
from exporter.store import SqliteCallStore, StoreUnavailable
from tests.test_store_failures import LAYOUT, add_leg
import exporter.store.sqlite

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
store = SqliteCallStore(sys.argv[1], LAYOUT)
add_leg(store, "before")
store.ping()
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
refused = 0
for n in range(20):
    try:
        add_leg(store, f"full-{n}")
    except StoreUnavailable:
        refused += 1
assert refused == 20, refused
try:
    store.ping()
except StoreUnavailable as exc:
    assert "the last write failed" in str(exc), exc
else:
    raise AssertionError("ready while every write fails")
exporter.store.sqlite.FAILURE_HOLD = 0.0
try:
    store.ping()  # the probe write fails too
except StoreUnavailable:
    pass
else:
    raise AssertionError("the probe wrote past the limit")
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
store.ping()
add_leg(store, "after")
store.close()
print("ok")
"""


def test_ping_fails_while_writes_fail_for_lack_of_space_and_recovers(path: Path) -> None:
    """RLIMIT_FSIZE makes every write to the store's files fail, as a full disk does."""
    completed = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT_SCRIPT, str(path)],
        capture_output=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert completed.returncode == 0, completed.stderr.decode()
    assert completed.stdout.strip() == b"ok"
    kept = stored_call_ids(path)
    assert {"before", "after"} <= kept
    assert not any(name.startswith("full-") for name in kept)
