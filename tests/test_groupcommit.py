"""The group-commit writer on its own, over a real SQLite file and real flocks of other processes.

Every test forces the interleaving it needs (a change waits inside its transaction until the
next one is queued), so none depends on timing.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from functools import partial
from pathlib import Path

import pytest

from exporter.legs import TallyLayout
from exporter.store import SqliteCallStore, StoreUnavailable, flockwait
from exporter.store.groupcommit import MAX_BATCH, GroupCommit, ProcessLock
from tests.conftest import ACCOUNT, SECRET, Exporter

LOCK_TIMEOUT = 0.5
# A deferred foreign key is checked by COMMIT: a change with a dangling one makes it fail.
SCHEMA = """
CREATE TABLE calls (id TEXT PRIMARY KEY);
CREATE TABLE notes (call TEXT REFERENCES calls (id) DEFERRABLE INITIALLY DEFERRED);
"""


class CountingJournal:
    """A SQLite connection as the writer's Journal, counting what the writer asks of it."""

    def __init__(self, path: Path) -> None:
        self.connection = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self.connection.execute("PRAGMA foreign_keys=ON")
        self.lock = ProcessLock(Path(f"{path}.lock"), LOCK_TIMEOUT)
        self.begins = self.commits = self.kept_changes = 0
        self.settled_with: list[BaseException | None] = []

    def begin(self) -> None:
        self.lock.acquire()
        self.connection.execute("BEGIN IMMEDIATE")
        self.begins += 1

    def savepoint(self) -> None:
        self.connection.execute("SAVEPOINT change")

    def kept(self) -> None:
        self.kept_changes += 1

    def undo(self) -> bool:
        self.connection.execute("ROLLBACK TO change")
        self.connection.execute("RELEASE change")
        return self.connection.in_transaction

    def commit(self) -> None:
        self.commits += 1
        self.connection.execute("COMMIT")

    def rollback(self) -> None:
        if self.connection.in_transaction:
            self.connection.execute("ROLLBACK")

    def finish(self) -> None:
        self.lock.release()

    def settled(self, error: BaseException | None) -> None:
        self.settled_with.append(error)

    def calls(self) -> set[str]:
        return {row[0] for row in self.connection.execute("SELECT id FROM calls")}


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[CountingJournal]:
    path = tmp_path / "writes.sqlite3"
    with closing(sqlite3.connect(path)) as connection:
        connection.executescript(SCHEMA)
    journal = CountingJournal(path)
    yield journal
    journal.connection.close()
    journal.lock.close()


@pytest.fixture
def writes(journal: CountingJournal) -> GroupCommit:
    return GroupCommit(journal, LOCK_TIMEOUT * 20)


def add_call(writes: GroupCommit, journal: CountingJournal, call: str) -> None:
    with writes.change():
        journal.connection.execute("INSERT INTO calls VALUES (?)", (call,))


def add_dangling_note(writes: GroupCommit, journal: CountingJournal) -> None:
    with writes.change():
        journal.connection.execute("INSERT INTO notes VALUES ('no such call')")


class Outcomes:
    """What each change of a thread ended with: None, or the exception it raised."""

    def __init__(self) -> None:
        self.of: dict[str, BaseException | None] = {}
        self.threads: list[threading.Thread] = []

    def start(self, name: str, action: Callable[[], None]) -> None:
        def run() -> None:
            try:
                action()
            except BaseException as exc:
                self.of[name] = exc
            else:
                self.of[name] = None

        thread = threading.Thread(target=run, name=name)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in self.threads)


def queue_behind_first(
    writes: GroupCommit, journal: CountingJournal, later: Sequence[Callable[[], None]]
) -> Outcomes:
    """Changes that join the first one's batch: it ends only once all of them are queued."""
    outcomes = Outcomes()

    def first() -> None:
        with writes.change():
            journal.connection.execute("INSERT INTO calls VALUES ('first')")
            deadline = time.monotonic() + 60
            while writes.waiting < len(later):
                assert time.monotonic() < deadline, "the other changes never queued"
                time.sleep(0.001)

    outcomes.start("first", first)
    while not writes.locked:
        time.sleep(0.001)
    for n, action in enumerate(later):
        outcomes.start(f"later-{n}", action)
    outcomes.join()
    return outcomes


def test_changes_queued_together_share_one_commit(
    writes: GroupCommit, journal: CountingJournal
) -> None:
    outcomes = queue_behind_first(
        writes, journal, [partial(add_call, writes, journal, f"c{n}") for n in range(3)]
    )
    assert outcomes.of == {"first": None, "later-0": None, "later-1": None, "later-2": None}
    assert (journal.begins, journal.commits) == (1, 1)
    assert journal.kept_changes == 4
    assert journal.calls() == {"first", "c0", "c1", "c2"}
    assert journal.settled_with == [None]


def test_a_batch_is_committed_at_max_batch_changes(
    writes: GroupCommit, journal: CountingJournal
) -> None:
    later = [partial(add_call, writes, journal, f"c{n}") for n in range(MAX_BATCH)]
    outcomes = queue_behind_first(writes, journal, later)
    assert set(outcomes.of.values()) == {None}
    assert journal.commits == 2  # MAX_BATCH changes, then the one left over
    assert len(journal.calls()) == MAX_BATCH + 1


def test_a_failing_change_is_taken_back_alone(
    writes: GroupCommit, journal: CountingJournal
) -> None:
    def failing() -> None:
        with writes.change():
            journal.connection.execute("INSERT INTO calls VALUES ('failing')")
            raise RuntimeError("this change fails after writing")

    outcomes = queue_behind_first(
        writes, journal, [failing, lambda: add_call(writes, journal, "kept")]
    )
    assert outcomes.of["first"] is None
    assert isinstance(outcomes.of["later-0"], RuntimeError)
    assert outcomes.of["later-1"] is None
    assert journal.commits == 1
    assert journal.kept_changes == 2  # what the failing one left for the COMMIT is not the batch's
    assert journal.calls() == {"first", "kept"}


def test_a_failing_commit_fails_every_change_of_its_batch_and_keeps_none(
    writes: GroupCommit, journal: CountingJournal
) -> None:
    outcomes = queue_behind_first(
        writes,
        journal,
        [lambda: add_call(writes, journal, "second"), lambda: add_dangling_note(writes, journal)],
    )
    assert journal.commits == 1
    for name in ("first", "later-0", "later-1"):
        assert isinstance(outcomes.of[name], StoreUnavailable), outcomes.of
        assert "FOREIGN KEY" in str(outcomes.of[name])
    assert journal.calls() == set()
    assert not journal.connection.in_transaction
    assert isinstance(journal.settled_with[-1], sqlite3.IntegrityError)

    add_call(writes, journal, "after")  # the writer goes on
    assert journal.calls() == {"after"}


def test_a_stalled_turn_in_the_process_fails_the_change_instead_of_hanging(
    journal: CountingJournal,
) -> None:
    writes = GroupCommit(journal, LOCK_TIMEOUT)
    stalled, release = threading.Event(), threading.Event()

    def stall() -> None:
        with writes.exclusive():
            stalled.set()
            release.wait(timeout=60)

    outcomes = Outcomes()
    outcomes.start("stalled", stall)
    assert stalled.wait(timeout=60)
    with pytest.raises(StoreUnavailable, match=r"no turn to write within 0\.5 s"):
        add_call(writes, journal, "refused")
    release.set()
    outcomes.join()
    add_call(writes, journal, "after")
    assert journal.calls() == {"after"}


# -- the flock among processes ----------------------------------------------------------------

HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(params=["in the kernel", "in a helper"])
def flock_wait(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each flock test runs both ways a ProcessLock waits: in flock itself, interrupted at the
    deadline (a store opened in the main thread), and through a helper thread (elsewhere)."""
    assert flockwait.enable()  # pytest runs tests in the main thread
    if request.param == "in a helper":
        monkeypatch.setattr(flockwait, "available", lambda: False)
    return str(request.param)


def waiters_for(path: Path) -> int:
    """How many flock requests for `path` the kernel has queued (the `->` lines of /proc/locks)."""
    inode = f":{path.stat().st_ino} "
    lines = Path("/proc/locks").read_text(encoding="ascii").splitlines()
    return sum(1 for line in lines if "->" in line and inode in line)


@pytest.fixture
def stalled_peer(flock_wait: str) -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    """Another process that takes a lock file's flock and keeps it (a stopped worker)."""
    peers: list[subprocess.Popen[str]] = []

    def hold(path: Path) -> subprocess.Popen[str]:
        peer = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True
        )
        peers.append(peer)
        assert peer.stdout is not None
        assert peer.stdout.readline() == "held\n"
        return peer

    yield hold
    for peer in peers:
        peer.kill()
        peer.wait(timeout=30)


def test_a_flock_held_by_a_stalled_peer_is_given_up_at_the_deadline(
    tmp_path: Path, stalled_peer: Callable[[Path], subprocess.Popen[str]]
) -> None:
    path = tmp_path / "store.lock"
    peer = stalled_peer(path)
    lock = ProcessLock(path, LOCK_TIMEOUT)
    with pytest.raises(StoreUnavailable, match=r"held by another process for 0\.5 s"):
        lock.acquire()
    peer.kill()
    peer.wait(timeout=30)
    lock.acquire()  # the kernel released the dead peer's lock
    lock.release()
    lock.close()


def queued_waiter(lock: ProcessLock) -> Outcomes:
    """A thread waiting for `lock`, once the kernel has queued its request for it."""
    waiter = Outcomes()
    waiter.start("waiter", lock.acquire)
    while not waiters_for(lock.path):
        time.sleep(0.001)
    return waiter


def the_peer_leaves(peer: subprocess.Popen[str], waiter: Outcomes) -> None:
    """The peer holding the lock dies: the kernel hands the lock to the queued waiter."""
    peer.kill()
    peer.wait(timeout=30)
    waiter.join()
    assert waiter.of == {"waiter": None}


def test_a_flock_released_by_the_peer_before_the_deadline_is_handed_over(
    tmp_path: Path, stalled_peer: Callable[[Path], subprocess.Popen[str]]
) -> None:
    path = tmp_path / "store.lock"
    peer = stalled_peer(path)
    lock = ProcessLock(path, 600.0)
    waiter = queued_waiter(lock)
    the_peer_leaves(peer, waiter)
    other = ProcessLock(path, 0.1)
    with pytest.raises(StoreUnavailable):  # this lock holds it now
        other.acquire()
    other.close()
    lock.release()
    lock.close()


def test_a_thread_waiting_for_a_stalled_peer_is_given_up_at_the_deadline(
    tmp_path: Path, stalled_peer: Callable[[Path], subprocess.Popen[str]], flock_wait: str
) -> None:
    path = tmp_path / "store.lock"
    stalled_peer(path)
    lock = ProcessLock(path, LOCK_TIMEOUT)
    outcomes = Outcomes()
    outcomes.start("waiter", lock.acquire)  # a request's thread, as in the server
    outcomes.join()
    assert isinstance(outcomes.of["waiter"], StoreUnavailable)
    # A helper stays queued for the next wait to take over; a wait in the kernel leaves nothing.
    assert waiters_for(path) == (1 if flock_wait == "in a helper" else 0)
    lock.close()


def test_a_signal_before_the_deadline_does_not_end_the_wait(
    tmp_path: Path, stalled_peer: Callable[[Path], subprocess.Popen[str]]
) -> None:
    path = tmp_path / "store.lock"
    peer = stalled_peer(path)
    lock = ProcessLock(path, 600.0)
    waiter = queued_waiter(lock)
    thread = waiter.threads[0].ident
    assert thread is not None
    signal.pthread_kill(thread, flockwait.INTERRUPT)  # its flock returns EINTR: not a deadline
    time.sleep(0.2)
    assert "waiter" not in waiter.of
    the_peer_leaves(peer, waiter)
    lock.release()
    lock.close()


@pytest.mark.parametrize("flock_wait", ["in the kernel"], indirect=True)
def test_the_deadline_watchdog_sleeps_while_no_wait_is_near_its_deadline(
    tmp_path: Path, stalled_peer: Callable[[Path], subprocess.Popen[str]]
) -> None:
    path = tmp_path / "store.lock"
    peer = stalled_peer(path)
    lock = ProcessLock(path, 600.0)
    waiter = queued_waiter(lock)  # in the kernel: the watchdog watches its deadline
    looks = flockwait._watchdog.looks
    time.sleep(20 * flockwait.WATCH_PERIOD)
    assert flockwait._watchdog.looks - looks <= 1  # none before the deadline, ten minutes away
    the_peer_leaves(peer, waiter)
    lock.release()
    lock.close()
    looks = flockwait._watchdog.looks
    time.sleep(20 * flockwait.WATCH_PERIOD)
    assert flockwait._watchdog.looks - looks <= 1  # and none while nothing waits


def test_a_change_waiting_for_a_stalled_peer_fails_and_the_writer_goes_on(
    writes: GroupCommit,
    journal: CountingJournal,
    stalled_peer: Callable[[Path], subprocess.Popen[str]],
) -> None:
    peer = stalled_peer(journal.lock.path)
    with pytest.raises(StoreUnavailable, match="held by another process"):
        add_call(writes, journal, "refused")
    assert (journal.begins, journal.commits) == (0, 0)
    peer.kill()
    peer.wait(timeout=30)
    add_call(writes, journal, "after")
    assert journal.calls() == {"after"}


def test_the_sqlite_store_answers_unavailable_while_a_peer_holds_its_lock(
    tmp_path: Path, stalled_peer: Callable[[Path], subprocess.Popen[str]]
) -> None:
    path = tmp_path / "calls.sqlite3"
    store = SqliteCallStore(path, TallyLayout((5.0,), (60.0,)), lock_timeout=LOCK_TIMEOUT)
    peer = stalled_peer(Path(f"{path}.lock"))
    with (
        pytest.raises(StoreUnavailable, match="held by another process"),
        store.transaction() as tx,
    ):
        tx.record([])
    with pytest.raises(StoreUnavailable):
        store.ping()
    peer.kill()
    peer.wait(timeout=30)
    with store.transaction() as tx:
        tx.record([])
    store.close()


def test_a_webhook_gets_503_while_a_peer_holds_the_store_and_200_after(
    make_exporter: Callable[..., Exporter],
    tmp_path: Path,
    stalled_peer: Callable[[Path], subprocess.Popen[str]],
) -> None:
    exporter = make_exporter(server={"timeout": "2s"})  # a write waits 0.5 s for its turn
    peer = stalled_peer(tmp_path / "calls.sqlite3.lock")
    body = {"event_type": "onInCallingStart", "abon": "108", "call_id": "c1"}
    refused = exporter.post({**body, "secret": SECRET, "account_id": ACCOUNT})
    assert refused.status_code == 503, refused.text
    assert refused.json["reason"] == "store_unavailable"
    assert exporter.client.simulate_get("/readyz").status_code == 503
    peer.kill()
    peer.wait(timeout=30)
    exporter.event("onInCallingStart", abon="108", call_id="c1")
