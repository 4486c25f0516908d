"""The SQLite call store: WAL mode, restarts, concurrent writers, no phone numbers on disk."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from exporter.calls import CallTracker, TrackerSettings
from exporter.config import parse_config
from exporter.events import EVENT_KINDS, CallEvent, Direction, Service
from exporter.legs import (
    EventTaken,
    Leg,
    LegEnded,
    LegLabels,
    LegStarted,
    Outcome,
    TallyKind,
    TallyLayout,
)
from exporter.startup import StartupError, initialise_store
from exporter.store import SqliteCallStore, StoreUnavailable
from tests.conftest import ACCOUNT, FakeClock, base_config

LAYOUT = TallyLayout(ring_buckets=(5.0, 20.0), talk_buckets=(60.0,))
CALLER = "+421905123456"


def start(call_id: str | None, abon: str = "108", did: str | None = CALLER) -> CallEvent:
    kind = EVENT_KINDS["onInCallingStart"]
    return CallEvent("onInCallingStart", kind, ACCOUNT, Service.VPBX, abon, did, call_id)


def event(event_type: str, call_id: str) -> CallEvent:
    kind = EVENT_KINDS[event_type]
    return CallEvent(event_type, kind, ACCOUNT, Service.VPBX, "108", CALLER, call_id)


def start_threads(target: Callable[[int], None], count: int = 8) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    return threads


def stored_call_ids(path: Path) -> set[str]:
    with sqlite3.connect(path) as connection:
        return {row[0] for row in connection.execute("SELECT call_id FROM legs")}


def test_uses_write_ahead_logging(tmp_path: Path) -> None:
    store = SqliteCallStore(tmp_path / "calls.sqlite3", LAYOUT)
    store.close()
    with sqlite3.connect(tmp_path / "calls.sqlite3") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_creates_the_directory_of_its_file(tmp_path: Path) -> None:
    SqliteCallStore(tmp_path / "data" / "deeper" / "calls.sqlite3", LAYOUT).close()
    assert (tmp_path / "data" / "deeper" / "calls.sqlite3").exists()


def test_phone_numbers_are_not_written_to_disk(tmp_path: Path, clock: FakeClock) -> None:
    store = SqliteCallStore(tmp_path / "calls.sqlite3", LAYOUT)
    tracker = CallTracker(store, TrackerSettings(), clock)
    tracker.on_event(start(None, did=CALLER))
    store.close()
    for path in tmp_path.iterdir():
        assert CALLER.encode() not in path.read_bytes(), path.name
        assert b"421905123456" not in path.read_bytes(), path.name


def test_concurrent_writers_from_many_threads_and_two_stores_lose_nothing(
    tmp_path: Path, clock: FakeClock
) -> None:
    stores = [SqliteCallStore(tmp_path / "calls.sqlite3", LAYOUT) for _ in range(2)]
    trackers = [CallTracker(store, TrackerSettings(), clock) for store in stores]

    def open_legs(worker: int) -> None:
        tracker = trackers[worker % 2]
        for n in range(100):
            tracker.on_event(start(f"w{worker}-{n}", abon=str(worker)))

    for thread in start_threads(open_legs):
        thread.join()

    snapshot = stores[0].snapshot()
    assert sum(snapshot.active.values()) == 800
    assert sum(snapshot.counters[TallyKind.STARTED].values()) == 800
    for store in stores:
        store.close()


def test_unreadable_file_raises_store_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "calls.sqlite3"
    path.write_bytes(b"garbage" * 1000)
    with pytest.raises(StoreUnavailable):
        SqliteCallStore(path, LAYOUT)


def test_a_store_of_a_newer_schema_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    path = tmp_path / "calls.sqlite3"
    SqliteCallStore(path, LAYOUT).close()
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
        connection.execute("DROP TABLE counters")
        connection.execute("PRAGMA journal_mode=DELETE")
    connection.close()
    before = path.read_bytes()

    with pytest.raises(StoreUnavailable, match="schema version 3, this exporter reads version 2"):
        SqliteCallStore(path, LAYOUT)

    assert path.read_bytes() == before  # not even switched to WAL mode
    with sqlite3.connect(path) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    connection.close()
    assert "counters" not in tables  # not recreated


# The schema of version 1, as the exporter before the caller level created it.
SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE legs (
    id INTEGER PRIMARY KEY, account INTEGER NOT NULL, service TEXT NOT NULL,
    direction TEXT NOT NULL, abon TEXT NOT NULL, extension TEXT NOT NULL, party TEXT,
    call_id TEXT, opened_at REAL NOT NULL, started_at REAL, answered_at REAL, closed_at REAL,
    outcome TEXT
);
CREATE UNIQUE INDEX legs_by_call_id ON legs (account, call_id, abon) WHERE call_id IS NOT NULL;
CREATE INDEX legs_by_party
    ON legs (account, service, direction, abon, party, opened_at) WHERE call_id IS NULL;
CREATE INDEX legs_open ON legs (opened_at) WHERE closed_at IS NULL;
CREATE INDEX legs_closed ON legs (closed_at) WHERE closed_at IS NOT NULL;
CREATE TABLE active_legs (
    account INTEGER, service TEXT, direction TEXT, extension TEXT, count INTEGER NOT NULL,
    PRIMARY KEY (account, service, direction, extension)
) WITHOUT ROWID;
CREATE TABLE counters (
    kind TEXT, labels TEXT, value REAL NOT NULL, PRIMARY KEY (kind, labels)
) WITHOUT ROWID;
CREATE TABLE timings (
    kind TEXT, labels TEXT, bucket REAL, count INTEGER NOT NULL, total REAL NOT NULL,
    PRIMARY KEY (kind, labels, bucket)
) WITHOUT ROWID;
CREATE TABLE extensions (account INTEGER, extension TEXT, PRIMARY KEY (account, extension))
    WITHOUT ROWID;
CREATE TABLE last_events (
    account INTEGER, service TEXT, at REAL NOT NULL, PRIMARY KEY (account, service)
) WITHOUT ROWID;
INSERT INTO meta VALUES ('schema_version', '1'), ('party_key', '00112233445566778899aabbccddeeff');
"""


def test_a_store_of_the_previous_schema_is_upgraded_and_keeps_its_legs_and_totals(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "calls.sqlite3"
    connection = sqlite3.connect(path)
    connection.executescript(SCHEMA_V1)
    opened = clock.now - 5
    connection.execute(
        "INSERT INTO legs (account, service, direction, abon, extension, call_id, opened_at,"
        " started_at) VALUES (?, 'vpbx', 'inbound', '108', '108', 'old-call', ?, ?)",
        (ACCOUNT, opened, opened),
    )
    connection.execute(
        "INSERT INTO active_legs VALUES (?, 'vpbx', 'inbound', '108', 1)", (ACCOUNT,)
    )
    connection.execute(
        "INSERT INTO counters VALUES ('started', ?, 1)", (f'["{ACCOUNT}","vpbx","inbound","108"]',)
    )
    connection.commit()
    connection.close()

    store = SqliteCallStore(path, TallyLayout((5.0,), (60.0,), caller_period=True))
    tracker = CallTracker(store, TrackerSettings(), clock)
    # The leg from before the upgrade closes as it would have; it belongs to no caller's call.
    tracker.on_event(event("onInCallingMissed", "old-call"))
    tracker.on_event(event("onInCallingStart", "new-call"))
    tracker.on_event(event("onInCallingMissed", "new-call"))
    clock.advance(31)
    tracker.expire_stale()
    snapshot = store.snapshot()
    store.close()

    leg = (str(ACCOUNT), "vpbx", "inbound", "108")
    assert snapshot.counters[TallyKind.STARTED] == {leg: 2}
    assert snapshot.counters[TallyKind.ENDED] == {(*leg, "missed"): 2}
    assert snapshot.counters[TallyKind.INBOUND_CALLS] == {(str(ACCOUNT), "", "missed", "open"): 1}
    assert snapshot.waiting_callers == {(ACCOUNT, ""): 1}
    with sqlite3.connect(path) as connection:
        version = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'")
        assert version.fetchone() == ("2",)
    connection.close()


def test_the_exporter_refuses_to_start_on_a_store_of_a_newer_schema(tmp_path: Path) -> None:
    config = parse_config(base_config(tmp_path))
    initialise_store(config)
    with sqlite3.connect(config.store.path) as connection:
        connection.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    connection.close()
    with pytest.raises(StartupError) as refused:
        initialise_store(config)
    assert str(refused.value) == (
        f"call store {config.store.path} holds schema version 3, this exporter reads version 2:"
        " it was written by a newer exporter; run that one, or move the file away to start with"
        " an empty store"
    )


def test_a_failing_change_in_a_shared_commit_takes_only_itself_back(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Threads that queue for the writer share one commit; each change stays its own."""
    store = SqliteCallStore(tmp_path / "calls.sqlite3", LAYOUT)
    labels = LegLabels(ACCOUNT, Service.VPBX, Direction.INBOUND, "108")
    taken: list[str] = []
    taken_lock = threading.Lock()

    def change(name: str, fail: bool) -> None:
        with store.transaction() as tx:
            tx.insert_leg(Leg(labels, "108", name, clock.now, clock.now), did=None)
            if fail:
                raise RuntimeError("this change fails after writing")
        with taken_lock:
            taken.append(name)

    def worker(thread: int) -> None:
        for n in range(200):
            name = f"t{thread}-{n}"
            with suppress(RuntimeError):
                change(name, fail=n % 7 == 3)

    for thread in start_threads(worker):
        thread.join()

    assert stored_call_ids(tmp_path / "calls.sqlite3") == set(taken)
    assert len(taken) == 8 * (200 - 29)
    assert sum(store.snapshot().active.values()) == len(taken)
    store.close()


def test_closing_commits_the_open_batch_and_refuses_later_changes(
    tmp_path: Path, clock: FakeClock
) -> None:
    store = SqliteCallStore(tmp_path / "calls.sqlite3", LAYOUT)
    labels = LegLabels(ACCOUNT, Service.VPBX, Direction.INBOUND, "108")
    taken: list[str] = []
    refused = threading.Event()

    def worker(thread: int) -> None:
        for n in range(10_000):
            try:
                with store.transaction() as tx:
                    tx.insert_leg(Leg(labels, "108", f"t{thread}-{n}", clock.now, None), did=None)
            except StoreUnavailable:
                refused.set()
                return
            taken.append(f"t{thread}-{n}")

    threads = start_threads(worker)
    deadline = time.monotonic() + 60
    while len(taken) < 200 and time.monotonic() < deadline:
        threading.Event().wait(0.001)
    assert len(taken) >= 200, "the writers stalled"
    store.close()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)

    assert refused.is_set()
    assert stored_call_ids(tmp_path / "calls.sqlite3") == set(taken)
    with pytest.raises(StoreUnavailable, match="closed"):
        store.snapshot()


def test_a_forked_child_cannot_write_through_its_parents_store(tmp_path: Path) -> None:
    store = SqliteCallStore(tmp_path / "calls.sqlite3", LAYOUT)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the store refuses it
        try:
            with store.transaction():
                pass
        except StoreUnavailable:
            os._exit(0)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.ping()
    store.close()


# -- totals written once per batch ------------------------------------------------------------

LABELS = LegLabels(ACCOUNT, Service.VPBX, Direction.INBOUND, "108")
Change = Callable[[Any], None]  # what a test does inside one store transaction


def in_one_batch(store: SqliteCallStore, changes: list[Change]) -> list[BaseException | None]:
    """Runs the changes in threads, forced into one batch: each keeps its turn until the next
    is queued behind it. Returns what each raised, or None."""
    outcomes: list[BaseException | None] = [None] * len(changes)
    inside = [threading.Event() for _ in changes]

    def run(index: int) -> None:
        try:
            with store.transaction() as tx:
                inside[index].set()
                try:
                    changes[index](tx)
                finally:  # a failing change too keeps the batch open for the next
                    deadline = time.monotonic() + 60
                    while index + 1 < len(changes) and not store._writes.waiting:
                        assert time.monotonic() < deadline, "the next change never queued"
                        time.sleep(0.001)
        except BaseException as exc:
            outcomes[index] = exc
        finally:
            inside[index].set()

    threads = []
    for index in range(len(changes)):
        thread = threading.Thread(target=run, args=(index,))
        thread.start()
        threads.append(thread)
        assert inside[index].wait(timeout=60)  # in its turn before the next one queues
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    return outcomes


def call(call_id: str, at: float, labels: LegLabels = LABELS, fail: bool = False) -> Change:
    """A change as an answered call's end leaves it: a leg, its tallies, the event's time."""

    def run(tx: Any) -> None:
        tx.insert_leg(Leg(labels, labels.extension, call_id, at, at), did=None)
        tx.record(
            [
                EventTaken(Service.VPBX, "onInCallingStart"),
                LegStarted(labels),
                LegEnded(labels, Outcome.ANSWERED, ring_seconds=at / 100, talk_seconds=None),
            ]
        )
        tx.touch(ACCOUNT, Service.VPBX, at)
        if fail:
            raise RuntimeError("this change fails after writing")

    return run


@contextmanager
def statements_of(store: SqliteCallStore) -> Iterator[list[str]]:
    """The statements the store's writer runs meanwhile, as SQLite traces them."""
    statements: list[str] = []
    connection = store._write_connection()
    connection.set_trace_callback(statements.append)
    try:
        yield statements
    finally:
        connection.set_trace_callback(None)


def test_the_totals_of_a_batch_are_summed_and_written_once_before_its_commit(
    tmp_path: Path,
) -> None:
    store = SqliteCallStore(tmp_path / "calls.sqlite3", LAYOUT)
    with statements_of(store) as statements:
        outcomes = in_one_batch(store, [call("c1", 300.0), call("c2", 400.0)])

    assert outcomes == [None, None]
    assert [s.split(" (")[0] for s in statements if s.startswith(("BEGIN", "COMMIT"))] == [
        "BEGIN IMMEDIATE",
        "COMMIT",
    ]
    written = [s.split()[2] for s in statements if s.startswith("INSERT INTO")]
    # The legs with each change; each table of totals in one statement, for both.
    assert sorted(written) == ["active_legs", "counters", "last_events", "legs", "legs", "timings"]
    assert statements[-1] == "COMMIT"
    snapshot = store.snapshot()
    leg_values = (str(ACCOUNT), "vpbx", "inbound", "108")
    assert snapshot.counters == {
        TallyKind.EVENTS: {("vpbx", "onInCallingStart"): 2.0},
        TallyKind.STARTED: {leg_values: 2.0},
        TallyKind.ENDED: {(*leg_values, "answered"): 2.0},
    }
    (ring,) = snapshot.timings[TallyKind.RING]
    assert (ring.buckets, ring.total) == ({5.0: 2}, 7.0)
    assert snapshot.active == {LABELS: 2}
    assert snapshot.last_events == {(ACCOUNT, Service.VPBX): 400.0}
    store.close()


@pytest.mark.parametrize("failing", [0, 1], ids=["the first", "the second"])
def test_a_failing_change_leaves_nothing_in_its_batchs_totals(tmp_path: Path, failing: int) -> None:
    """The first change of a batch has no savepoint: its failure ends the batch, and the
    changes behind it start another one."""
    store = SqliteCallStore(tmp_path / "calls.sqlite3", LAYOUT)
    elsewhere = LegLabels(ACCOUNT, Service.VPBX, Direction.INBOUND, "109")
    changes = [call("c1", 300.0), call("c2", 400.0), call("c3", 200.0)]
    changes[failing] = call("failing", 900.0, elsewhere, fail=True)

    outcomes = in_one_batch(store, changes)

    assert isinstance(outcomes[failing], RuntimeError)
    assert [outcome for n, outcome in enumerate(outcomes) if n != failing] == [None, None]
    kept = {"c1", "c2", "c3"} - {("c1", "c2")[failing]}
    assert stored_call_ids(tmp_path / "calls.sqlite3") == kept
    snapshot = store.snapshot()
    assert snapshot.counters[TallyKind.STARTED] == {(str(ACCOUNT), "vpbx", "inbound", "108"): 2.0}
    assert snapshot.counters[TallyKind.EVENTS] == {("vpbx", "onInCallingStart"): 2.0}
    assert snapshot.active == {LABELS: 2}
    assert snapshot.last_events == {(ACCOUNT, Service.VPBX): 400.0 if failing == 0 else 300.0}
    (ring,) = snapshot.timings[TallyKind.RING]
    assert sum(ring.buckets.values()) == 2
    store.close()


REFUSE_LATE_TOTALS = """
CREATE TRIGGER refuse_late_totals BEFORE INSERT ON last_events WHEN NEW.at >= 1000
BEGIN SELECT RAISE(ABORT, 'totals refused'); END
"""


def refuse_late_totals(path: Path) -> None:
    """Totals dated 1000 or later cannot be written: the batch holding them fails at its end."""
    with sqlite3.connect(path) as connection:
        connection.execute(REFUSE_LATE_TOTALS)
    connection.close()


@pytest.mark.parametrize("refuse", [refuse_late_totals, Path.unlink], ids=["totals", "file"])
def test_a_batch_refused_at_its_commit_keeps_none_of_its_totals(
    tmp_path: Path, refuse: Callable[[Path], None]
) -> None:
    """Its totals fail to be written, or its COMMIT goes to a file deleted meanwhile: every
    change of the batch is refused, and the next batch writes only its own totals."""
    path = tmp_path / "calls.sqlite3"
    store = SqliteCallStore(path, LAYOUT)
    if refuse is refuse_late_totals:
        refuse(path)
        last = call("c2", 1000.0)
    else:

        def last(tx: Any) -> None:
            call("c2", 1000.0)(tx)
            refuse(path)

    outcomes = in_one_batch(store, [call("c1", 300.0), last])

    assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes), outcomes
    empty = store.snapshot()  # first: it recreates a deleted file
    assert stored_call_ids(path) == set()
    assert (empty.counters, empty.timings, empty.active, empty.last_events) == ({}, {}, {}, {})
    with store.transaction() as tx:
        call("after", 500.0)(tx)
    snapshot = store.snapshot()
    assert stored_call_ids(path) == {"after"}
    assert snapshot.counters[TallyKind.STARTED] == {(str(ACCOUNT), "vpbx", "inbound", "108"): 1.0}
    assert snapshot.active == {LABELS: 1}
    assert snapshot.last_events == {(ACCOUNT, Service.VPBX): 500.0}
    store.close()
