"""One contract for every call store: the same tests over SQLite and PostgreSQL.

Several store instances on one storage stand for several worker processes or, with PostgreSQL,
several replicas on several hosts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from exporter.calls import CallTracker, Disposition, TrackerSettings
from exporter.events import EVENT_KINDS, CallEvent, Direction, Service
from exporter.legs import (
    CounterRow,
    EventTaken,
    Leg,
    LegEnded,
    LegLabels,
    LegStarted,
    Outcome,
    TallyKind,
    TallyLayout,
    TimingRow,
)
from exporter.store import (
    CallStore,
    LegQuery,
    SqliteCallStore,
    StoreSnapshot,
    StoreUnavailable,
)
from exporter.store.postgresql import (
    EXTENSION_LOCKS,
    LEG_LOCKS,
    PostgresCallStore,
    _call_lock,
    _hash32,
)
from tests.conftest import ACCOUNT, FakeClock, free_port

if TYPE_CHECKING:
    from tests.pgcluster import PgCluster

pytest_plugins = ["tests.pgcluster"]

CALLER_KINDS = {
    TallyKind.INBOUND_CALLS,
    TallyKind.INBOUND_WAIT,
    TallyKind.CALLERS_RESOLVED,
    TallyKind.CALLBACK,
    TallyKind.REPEAT_MISSED,
    TallyKind.CALLBACK_ATTEMPTS,
}
LAYOUT = TallyLayout(ring_buckets=(5.0, 20.0), talk_buckets=(60.0,))
CALLER = "+421905123456"
LABELS = LegLabels(ACCOUNT, Service.VPBX, Direction.INBOUND, "108")
OpenStore = Callable[[], CallStore]


def event(
    event_type: str,
    call_id: str | None,
    abon: str = "108",
    did: str | None = CALLER,
    billsec: int | None = None,
) -> CallEvent:
    kind = EVENT_KINDS[event_type]
    return CallEvent(event_type, kind, ACCOUNT, kind.service, abon, did, call_id, billsec)


def query(
    call_id: str | None, did: str | None = CALLER, closed_since: float = 0.0, account: int = ACCOUNT
) -> LegQuery:
    """The legs an inbound vPBX event at extension 108 may belong to."""
    return LegQuery(account, Service.VPBX, Direction.INBOUND, "108", call_id, did, closed_since)


def leg(call_id: str | None, opened_at: float, labels: LegLabels = LABELS) -> Leg:
    return Leg(labels, labels.extension, call_id, opened_at=opened_at, started_at=opened_at)


def open_sqlite(path: Path) -> OpenStore:
    return lambda: SqliteCallStore(path, LAYOUT)


def open_postgres(url: str) -> OpenStore:
    return lambda: PostgresCallStore(url, LAYOUT, connect_timeout=5.0, statement_timeout=30.0)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """Opens one more store on the same storage, closed at the end of the test."""
    if request.param == "sqlite":
        opener = open_sqlite(tmp_path / "calls.sqlite3")
    else:
        opener = open_postgres(request.getfixturevalue("postgres_url"))
    opened: list[CallStore] = []

    def open_one() -> CallStore:
        store = opener()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: OpenStore) -> CallStore:
    return open_store()


def in_parallel(actions: list[Callable[[], None]]) -> None:
    """Runs the actions in threads released together; re-raises the first failure."""
    barrier = threading.Barrier(len(actions))
    failures: list[BaseException] = []

    def run(action: Callable[[], None]) -> None:
        try:
            barrier.wait()
            action()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(action,)) for action in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    if failures:
        raise failures[0]


def normalised(snapshot: StoreSnapshot) -> StoreSnapshot:
    """The timing series in label order: the backends list them in their own order."""
    timings = {
        kind: sorted(series, key=lambda one: one.labels)
        for kind, series in snapshot.timings.items()
    }
    return StoreSnapshot(snapshot.counters, timings, snapshot.active, snapshot.last_events)


def legs_only(snapshot: StoreSnapshot) -> StoreSnapshot:
    """The leg totals alone: which legs ring at the same time, and so which callers' calls
    they make, depends on how the calls interleave."""
    kept = normalised(snapshot)
    return StoreSnapshot(
        {kind: rows for kind, rows in kept.counters.items() if kind not in CALLER_KINDS},
        {kind: rows for kind, rows in kept.timings.items() if kind not in CALLER_KINDS},
        kept.active,
        kept.last_events,
    )


# -- legs ------------------------------------------------------------------------------------


def test_a_leg_with_a_call_id_is_found_saved_closed_and_forgotten(store: CallStore) -> None:
    with store.transaction() as tx:
        opened = leg("call-1", opened_at=100.0)
        tx.insert_leg(opened, CALLER)
        tx.insert_leg(leg("call-2", opened_at=100.0), CALLER)
    assert opened.id is not None

    with store.transaction() as tx:
        (found,) = tx.legs_matching(query("call-1", closed_since=0.0))
        assert found == opened
        found.answered_at = 110.0
        tx.save_leg(found)
    with store.transaction() as tx:
        (found,) = tx.legs_matching(query("call-1", closed_since=0.0))
        assert found.answered_at == 110.0
        found.closed_at, found.outcome = 150.0, Outcome.ANSWERED
        tx.save_leg(found)
    with store.transaction() as tx:
        # Closed legs with a call_id still match, whatever closed_since says: they absorb copies.
        (closed,) = tx.legs_matching(query("call-1", closed_since=1e12))
        assert (closed.closed_at, closed.outcome) == (150.0, Outcome.ANSWERED)
        assert tx.open_legs_before(1e12) == [leg_of(tx, "call-2")]
        tx.forget_closed_legs(with_call_id_before=151.0, without_call_id_before=151.0)
    with store.transaction() as tx:
        assert tx.legs_matching(query("call-1", closed_since=0.0)) == []
        assert leg_of(tx, "call-2").is_open
    assert store.snapshot().active == {LABELS: 1}


def leg_of(tx: object, call_id: str) -> Leg:
    assert hasattr(tx, "legs_matching")
    (found,) = tx.legs_matching(query(call_id, closed_since=0.0))
    assert isinstance(found, Leg)
    return found


def test_legs_without_a_call_id_match_by_extension_and_party_oldest_first(
    store: CallStore,
) -> None:
    with store.transaction() as tx:
        withheld, same, other = leg(None, 30.0), leg(None, 20.0), leg(None, 10.0)
        tx.insert_leg(withheld, None)
        tx.insert_leg(same, CALLER)
        tx.insert_leg(other, "+420111222333")
        tx.insert_leg(
            leg(None, 5.0, LegLabels(ACCOUNT, Service.VPBX, Direction.INBOUND, "109")), None
        )
    with store.transaction() as tx:
        found = tx.legs_matching(query(None))
        assert found == [same, withheld]
        # Only a leg of the same known number is the same party; a withheld one may be anyone.
        assert [one.same_party for one in found] == [True, False]
        found = tx.legs_matching(query(None, did=None))
        assert found == [other, same, withheld]
        assert not any(one.same_party for one in found)


def test_closed_legs_without_a_call_id_match_only_within_the_window_or_when_expired(
    store: CallStore,
) -> None:
    with store.transaction() as tx:
        recent, old, expired = leg(None, 10.0), leg(None, 11.0), leg(None, 12.0)
        for one, closed_at, outcome in (
            (recent, 100.0, Outcome.MISSED),
            (old, 50.0, Outcome.MISSED),
            (expired, 50.0, Outcome.EXPIRED),
        ):
            one.closed_at, one.outcome = closed_at, outcome
            tx.insert_leg(one, CALLER)
    with store.transaction() as tx:
        assert tx.legs_matching(query(None, closed_since=90.0)) == [
            recent,
            expired,
        ]
        tx.forget_closed_legs(with_call_id_before=0.0, without_call_id_before=90.0)
    with store.transaction() as tx:
        assert tx.legs_matching(query(None, closed_since=0.0)) == [
            recent,
            expired,
        ]
    assert store.snapshot().active == {}


def test_open_legs_and_totals_survive_a_reopen(open_store: OpenStore, clock: FakeClock) -> None:
    store = open_store()
    CallTracker(store, TrackerSettings(), clock).on_event(event("onInCallingStart", "keep"))
    before = store.snapshot()
    store.close()

    reopened = open_store()
    assert normalised(reopened.snapshot()) == normalised(before)
    assert before.active == {LABELS: 1}
    with reopened.transaction() as tx:
        (kept,) = tx.legs_matching(query("keep"))
    assert (kept.call_id, kept.is_open, kept.started_at) == ("keep", True, clock.now)


def test_a_late_start_is_written_to_a_closed_leg(store: CallStore) -> None:
    with store.transaction() as tx:
        closed = leg("call-1", 100.0)
        closed.started_at, closed.closed_at, closed.outcome = None, 100.0, Outcome.ANSWERED
        tx.insert_leg(closed, CALLER)
    with store.transaction() as tx:
        closed.started_at = 105.0
        tx.save_leg(closed)
    with store.transaction() as tx:
        assert leg_of(tx, "call-1") == closed


def fail_midway(store: CallStore) -> None:
    with store.transaction() as tx:
        tx.insert_leg(leg("call-1", 100.0), CALLER)
        tx.record([LegStarted(LABELS)])
        tx.touch(ACCOUNT, Service.VPBX, 100.0)
        raise RuntimeError("the tracker failed")


def test_a_failed_transaction_leaves_nothing(store: CallStore) -> None:
    with pytest.raises(RuntimeError, match="the tracker failed"):
        fail_midway(store)
    with store.transaction() as tx:
        assert tx.legs_matching(query("call-1", closed_since=0.0)) == []
    assert store.snapshot() == StoreSnapshot()


# -- tallies ---------------------------------------------------------------------------------


def test_tallies_are_read_back_by_the_snapshot(store: CallStore) -> None:
    with store.transaction() as tx:
        tx.touch(ACCOUNT, Service.VPBX, 200.0)
        tx.touch(ACCOUNT, Service.VPBX, 150.0)  # an older time never moves it back
        tx.record([EventTaken(Service.VPBX, "onInCallingStart"), LegStarted(LABELS)])
        tx.record([LegEnded(LABELS, Outcome.ANSWERED, ring_seconds=3.0, talk_seconds=61.0)])
    with store.transaction() as tx:
        tx.record([LegEnded(LABELS, Outcome.ANSWERED, ring_seconds=4.0, talk_seconds=None)])
        tx.touch(ACCOUNT, Service.TELEPHONY, 120.0)

    snapshot = normalised(store.snapshot())
    leg_values = (str(ACCOUNT), "vpbx", "inbound", "108")
    assert snapshot.counters == {
        TallyKind.EVENTS: {("vpbx", "onInCallingStart"): 1.0},
        TallyKind.STARTED: {leg_values: 1.0},
        TallyKind.ENDED: {(*leg_values, "answered"): 2.0},
    }
    (ring,) = snapshot.timings[TallyKind.RING]
    assert (ring.labels, ring.buckets, ring.total) == (
        (*leg_values[:3], "answered"),
        {5.0: 2},
        7.0,
    )
    (talk,) = snapshot.timings[TallyKind.TALK]
    assert (talk.buckets, talk.total) == ({float("inf"): 1}, 61.0)
    assert snapshot.last_events == {
        (ACCOUNT, Service.VPBX): 200.0,
        (ACCOUNT, Service.TELEPHONY): 120.0,
    }


def test_ensure_rows_creates_zeros_once_and_keeps_counts(store: CallStore) -> None:
    rows: list[CounterRow | TimingRow] = [
        CounterRow(TallyKind.STARTED, (str(ACCOUNT), "vpbx", "inbound", "108")),
        TimingRow(TallyKind.TALK, (str(ACCOUNT), "vpbx", "inbound"), 60.0, 0.0),
    ]
    store.ensure_rows(rows)
    with store.transaction() as tx:
        tx.record([LegStarted(LABELS)])
    store.ensure_rows(rows)
    snapshot = store.snapshot()
    assert snapshot.counters == {TallyKind.STARTED: {(str(ACCOUNT), "vpbx", "inbound", "108"): 1.0}}
    (talk,) = snapshot.timings[TallyKind.TALK]
    assert (talk.buckets, talk.total) == ({60.0: 0}, 0.0)


def test_extensions_are_admitted_up_to_the_limit(store: CallStore) -> None:
    with store.transaction() as tx:
        assert tx.admit_extension(ACCOUNT, "101", limit=2)
        assert tx.admit_extension(ACCOUNT, "102", limit=2)
        assert not tx.admit_extension(ACCOUNT, "103", limit=2)
        assert tx.admit_extension(ACCOUNT, "101", limit=2)
        assert tx.admit_extension(ACCOUNT + 1, "103", limit=2)  # another account's places
    store.reserve_extensions(ACCOUNT, ["104", "101"])
    with store.transaction() as tx:
        assert tx.admit_extension(ACCOUNT, "104", limit=2)
        assert not tx.admit_extension(ACCOUNT, "105", limit=3)  # 101, 102 and the reserved 104


def test_a_closed_store_is_unavailable(store: CallStore) -> None:
    store.close()
    with pytest.raises(StoreUnavailable):
        store.snapshot()
    with pytest.raises(StoreUnavailable), store.transaction():
        pass


# -- concurrency: workers of one host, or replicas on several ----------------------------------


def test_copies_of_one_start_arriving_at_once_open_one_leg(
    open_store: OpenStore, clock: FakeClock
) -> None:
    stores = [open_store(), open_store()]
    trackers = [CallTracker(store, TrackerSettings(), clock) for store in stores]
    dispositions: list[Disposition] = []
    copies = [
        event("onInCallingStart", "call-1"),
        event("onInCallingStart", None, abon="109"),  # no call_id: matched by the caller
    ]

    def deliver(tracker: CallTracker, copy: CallEvent) -> Callable[[], None]:
        return lambda: dispositions.append(tracker.on_event(copy))

    in_parallel([deliver(trackers[n % 2], copy) for n in range(8) for copy in copies])

    assert sorted(dispositions).count(Disposition.OPENED) == 2
    snapshot = stores[0].snapshot()
    assert sum(snapshot.counters[TallyKind.STARTED].values()) == 2
    assert sum(snapshot.active.values()) == 2


def test_ends_arriving_at_once_take_each_leg_without_call_id_once(
    open_store: OpenStore, clock: FakeClock
) -> None:
    stores = [open_store(), open_store()]
    trackers = [CallTracker(store, TrackerSettings(), clock) for store in stores]
    legs = 6
    for _ in range(legs):  # withheld numbers: each start is a call of its own
        assert trackers[0].on_event(event("onInCallingStart", None, did=None)) is Disposition.OPENED
    dispositions: list[Disposition] = []

    def end(tracker: CallTracker) -> Callable[[], None]:
        return lambda: dispositions.append(tracker.on_event(event("onInCallingEnd", None)))

    in_parallel([end(trackers[n % 2]) for n in range(legs)])

    assert dispositions == [Disposition.CLOSED] * legs
    snapshot = stores[1].snapshot()
    assert snapshot.active == {LABELS: 0}
    assert snapshot.counters[TallyKind.ENDED] == {
        (str(ACCOUNT), "vpbx", "inbound", "108", "answered"): legs
    }


def test_expiry_run_at_once_by_several_stores_expires_each_leg_once(
    open_store: OpenStore, clock: FakeClock
) -> None:
    stores = [open_store(), open_store()]
    settings = TrackerSettings(max_duration=600.0)
    trackers = [CallTracker(store, settings, clock) for store in stores for _ in range(2)]
    for n in range(10):
        trackers[0].on_event(event("onInCallingStart", f"call-{n}", abon=str(100 + n % 3)))
    clock.advance(601.0)
    expired: list[int] = []

    def expire(tracker: CallTracker) -> Callable[[], None]:
        return lambda: expired.append(tracker.expire_stale())

    in_parallel([expire(tracker) for tracker in trackers])

    assert sum(expired) == 10
    snapshot = stores[1].snapshot()
    assert sum(snapshot.counters[TallyKind.ENDED].values()) == 10
    assert set(snapshot.active.values()) == {0}


def test_extension_limit_holds_across_stores_admitting_at_once(open_store: OpenStore) -> None:
    stores = [open_store(), open_store()]
    admitted: list[str] = []

    def admit(store: CallStore, extension: str) -> Callable[[], None]:
        def run() -> None:
            with store.transaction() as tx:
                if tx.admit_extension(ACCOUNT, extension, limit=3):
                    admitted.append(extension)

        return run

    in_parallel([admit(stores[n % 2], str(100 + n)) for n in range(8)])
    assert len(admitted) == 3


def call_lives(count: int) -> list[list[CallEvent]]:
    """Calls that touch no leg of another: their own call_id, or an extension of their own."""
    lives = []
    for n in range(count):
        call_id, abon = f"call-{n}", str(200 + n)
        lives.append(
            [
                [
                    event("onInCallingStart", call_id),
                    event("onInCallingAnswered", call_id),
                    event("onInCallingEnd", call_id, billsec=20),
                ],
                [event("onInCallingStart", call_id), event("onInCallingMissed", call_id)],
                [
                    event("onInCallingStart", None, abon=abon),
                    event("onInCallingEnd", None, abon=abon, billsec=0),
                ],
                [event("onOutCallingEnd", call_id, abon=abon, billsec=5)],  # its start was lost
            ][n % 4]
        )
    return lives


def test_calls_handled_at_once_by_several_stores_leave_the_totals_of_one_after_another(
    open_store: OpenStore, clock: FakeClock, tmp_path: Path
) -> None:
    # Each event once or twice (a retry), to either store, each call's events in order.
    lives = [
        [copy for one in life for copy in [one] * (1 + (n + len(one.event_type)) % 2)]
        for n, life in enumerate(call_lives(24))
    ]
    stores = [open_store(), open_store()]
    trackers = [CallTracker(store, TrackerSettings(), clock) for store in stores]

    def live(n: int, life: list[CallEvent]) -> Callable[[], None]:
        def run() -> None:
            for step, one in enumerate(life):
                trackers[(n + step) % 2].on_event(one)

        return run

    in_parallel([live(n, life) for n, life in enumerate(lives)])

    reference = SqliteCallStore(tmp_path / "reference.sqlite3", LAYOUT)
    one_after_another = CallTracker(reference, TrackerSettings(), clock)
    for life in lives:
        for one in life:
            one_after_another.on_event(one)
    expected = reference.snapshot()
    reference.close()
    assert legs_only(stores[0].snapshot()) == legs_only(expected)
    assert sum(expected.counters[TallyKind.STARTED].values()) == 18
    assert sum(expected.counters[TallyKind.UNMATCHED].values()) == 6
    assert set(expected.active.values()) == {0}


# -- PostgreSQL only -------------------------------------------------------------------------

SEQUENCE = [
    event("onInCallingStart", "a"),
    event("onInCallingAnswered", "a"),
    event("onInCallingStart", "a"),  # a copy
    event("onInCallingEnd", "a", billsec=30),
    event("onInCallingStart", None, abon="109"),
    event("onInCallingMissed", None, abon="109"),
    event("onInCallingEnd", None, abon="110"),  # its start was lost
    event("onOutCallingStart", "b", abon="111"),
    event("onOutCallingEnd", "c", abon="112", billsec=0),  # unmatched
]


@pytest.mark.postgresql
def test_the_tracker_leaves_the_same_totals_in_both_stores(
    tmp_path: Path, postgres_url: str
) -> None:
    snapshots = []
    for opener in (open_sqlite(tmp_path / "calls.sqlite3"), open_postgres(postgres_url)):
        store = opener()
        clock = FakeClock()
        tracker = CallTracker(store, TrackerSettings(max_duration=600.0), clock)
        dispositions = []
        for one in SEQUENCE:
            clock.advance(2.0)
            dispositions.append(tracker.on_event(one))
        clock.advance(3600.0)
        tracker.expire_stale()  # the outbound leg "b"
        snapshots.append((dispositions, normalised(store.snapshot())))
        store.close()
    sqlite, postgres = snapshots
    assert postgres == sqlite
    assert sqlite[1].counters[TallyKind.ENDED]  # the sequence did close legs


def test_only_a_leg_of_the_same_number_makes_a_start_a_copy(
    store: CallStore, clock: FakeClock
) -> None:
    tracker = CallTracker(store, TrackerSettings(), clock)
    assert tracker.on_event(event("onInCallingStart", None, did=None)) is Disposition.OPENED
    clock.advance(5.0)
    assert tracker.on_event(event("onInCallingStart", None)) is Disposition.OPENED
    clock.advance(5.0)
    assert tracker.on_event(event("onInCallingStart", None)) is Disposition.DUPLICATE
    assert store.snapshot().active == {LABELS: 2}


@pytest.mark.postgresql
def test_a_restarted_server_is_unavailable_then_used_again_by_the_same_store(
    postgres_cluster: PgCluster, postgres_url: str
) -> None:
    store = PostgresCallStore(postgres_url, LAYOUT, connect_timeout=2.0, statement_timeout=5.0)
    with store.transaction() as tx:
        tx.record([LegStarted(LABELS)])
    postgres_cluster.stop("fast")
    try:
        for _ in range(2):
            began = time.monotonic()
            with pytest.raises(StoreUnavailable), store.transaction() as tx:
                tx.record([LegStarted(LABELS)])
            assert time.monotonic() - began < 15  # promptly: the pool waits connect_timeout
        with pytest.raises(StoreUnavailable):
            store.snapshot()
        with pytest.raises(StoreUnavailable):
            store.ping()
    finally:
        postgres_cluster.start()

    deadline = time.monotonic() + 60
    while True:
        try:
            with store.transaction() as tx:
                tx.record([LegStarted(LABELS)])
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline, "the store did not reconnect"
            time.sleep(0.2)
    store.ping()
    assert store.snapshot().counters[TallyKind.STARTED] == {
        (str(ACCOUNT), "vpbx", "inbound", "108"): 2.0
    }
    store.close()


@pytest.mark.postgresql
def test_a_lock_held_by_a_stalled_replica_fails_the_transaction_instead_of_hanging(
    postgres_url: str, clock: FakeClock
) -> None:
    store = PostgresCallStore(postgres_url, LAYOUT, connect_timeout=2.0, statement_timeout=1.0)
    tracker = CallTracker(store, TrackerSettings(), clock)
    tracker.on_event(event("onInCallingStart", "call-1"))
    with psycopg.connect(postgres_url) as stalled:
        # A replica stopped in the middle of its transaction on the same call.
        stalled.execute("SELECT * FROM legs FOR UPDATE")
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match="statement timeout"):
            tracker.on_event(event("onInCallingEnd", "call-1"))
        assert time.monotonic() - began < 15
        stalled.rollback()
    assert tracker.on_event(event("onInCallingEnd", "call-1")) is Disposition.CLOSED
    store.close()


@pytest.mark.postgresql
def test_a_newer_schema_is_refused_before_anything_is_written(postgres_url: str) -> None:
    open_postgres(postgres_url)().close()
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
        connection.execute("DROP TABLE counters")

    with pytest.raises(StoreUnavailable, match="schema version 3, this exporter reads version 2"):
        open_postgres(postgres_url)()

    with psycopg.connect(postgres_url, autocommit=True) as connection:
        row = connection.execute("SELECT to_regclass('counters')").fetchone()
        assert row == (None,)  # not recreated


@pytest.mark.postgresql
def test_a_missing_database_is_named(postgres_cluster: PgCluster) -> None:
    with pytest.raises(StoreUnavailable, match='database "nowhere" does not exist'):
        open_postgres(postgres_cluster.url("nowhere"))()


@pytest.mark.postgresql
def test_an_unreachable_server_is_refused_promptly() -> None:
    began = time.monotonic()
    with pytest.raises(StoreUnavailable):
        PostgresCallStore(
            f"postgresql://postgres@127.0.0.1:{free_port()}/none", LAYOUT, connect_timeout=2.0
        )
    assert time.monotonic() - began < 15


# -- group commit (PostgreSQL) -----------------------------------------------------------------

Change = Callable[[Any], None]  # what a test does inside one store transaction


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def in_one_batch(store: PostgresCallStore, changes: list[Change]) -> list[BaseException | None]:
    """Runs the changes in threads, forced into one batch: each stays in its turn until the
    next is queued behind it. Returns what each raised, or None."""
    outcomes: list[BaseException | None] = [None] * len(changes)
    inside = [threading.Event() for _ in changes]

    def run(index: int) -> None:
        try:
            with store.transaction() as tx:
                inside[index].set()
                try:
                    changes[index](tx)
                finally:  # a failing change too keeps the batch open for the next
                    if index + 1 < len(changes):
                        wait_until(lambda: store.writer.waiting > 0, "the next change is queued")
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


def open_pg(url: str) -> PostgresCallStore:
    return PostgresCallStore(url, LAYOUT, connect_timeout=5.0, statement_timeout=30.0)


@pytest.mark.postgresql
def test_changes_queued_together_share_one_commit(postgres_url: str) -> None:
    store = open_pg(postgres_url)
    commits = store.writer.commits

    def open_call(call_id: str) -> Change:
        return lambda tx: tx.insert_leg(leg(call_id, opened_at=100.0), CALLER)

    outcomes = in_one_batch(store, [open_call("call-1"), open_call("call-2"), open_call("call-3")])

    assert outcomes == [None, None, None]
    assert store.writer.commits == commits + 1
    assert store.snapshot().active == {LABELS: 3}
    store.close()


@pytest.mark.postgresql
def test_a_failing_change_rolls_back_alone_and_the_batch_commits(postgres_url: str) -> None:
    store = open_pg(postgres_url)
    commits = store.writer.commits

    def fails(tx: Any) -> None:
        tx.insert_leg(leg("call-2", opened_at=100.0), CALLER)
        tx.record([LegStarted(LABELS)])
        tx.connection.execute("SELECT 1 / 0").fetchone()

    outcomes = in_one_batch(
        store,
        [
            lambda tx: tx.insert_leg(leg("call-1", opened_at=100.0), CALLER),
            fails,
            lambda tx: tx.insert_leg(leg("call-3", opened_at=100.0), CALLER),
        ],
    )

    assert outcomes[0] is None
    assert isinstance(outcomes[1], StoreUnavailable)
    assert "division by zero" in str(outcomes[1])
    assert outcomes[2] is None
    assert store.writer.commits == commits + 1
    snapshot = store.snapshot()
    assert snapshot.active == {LABELS: 2}
    assert TallyKind.STARTED not in snapshot.counters  # the failed change's tallies are gone
    with store.transaction() as tx:
        assert tx.legs_matching(query("call-2", closed_since=0.0)) == []
    store.close()


@pytest.mark.postgresql
def test_a_failing_commit_fails_every_change_of_the_batch(postgres_url: str) -> None:
    store = open_pg(postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        # Checked at COMMIT only: two changes that each pass, together fail the batch's COMMIT.
        connection.execute("CREATE TABLE once (n int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    commits = store.writer.commits

    def change(call_id: str) -> Change:
        def run(tx: Any) -> None:
            tx.insert_leg(leg(call_id, opened_at=100.0), CALLER)
            tx.connection.execute("INSERT INTO once VALUES (1)")

        return run

    outcomes = in_one_batch(store, [change("call-1"), change("call-2")])

    assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes), outcomes
    assert "duplicate key" in str(outcomes[0])
    assert store.writer.commits == commits
    assert store.snapshot().active == {}
    with store.transaction() as tx:  # the writer goes on with a new transaction
        tx.insert_leg(leg("call-3", opened_at=100.0), CALLER)
    assert store.snapshot().active == {LABELS: 1}
    store.close()


@pytest.mark.postgresql
def test_batches_of_two_stores_locking_in_opposite_orders_do_not_deadlock(
    postgres_url: str,
) -> None:
    """Store A's batch holds call-1 and its next change wants call-2, which store B's batch
    holds while its next change wants call-1. Neither waits holding the other's want: a change
    that would wait has its batch's earlier changes committed first. The calls are of two
    accounts: their callers' locks, taken with the legs', are wanted in opposite orders too."""
    stores = [open_pg(postgres_url), open_pg(postgres_url)]
    both_hold = threading.Barrier(2, timeout=60)
    accounts = {"call-1": ACCOUNT, "call-2": ACCOUNT + 1}

    def take(call_id: str) -> Change:
        return lambda tx: tx.legs_matching(query(call_id, account=accounts[call_id]))

    def then_take(call_id: str) -> Change:
        def run(tx: Any) -> None:
            both_hold.wait()  # both batches hold their first call
            tx.legs_matching(query(call_id, account=accounts[call_id]))
            labels = LegLabels(accounts[call_id], Service.VPBX, Direction.INBOUND, "108")
            tx.insert_leg(leg(call_id, opened_at=100.0, labels=labels), CALLER)

        return run

    def batch_of(store: PostgresCallStore, first: str, second: str) -> Callable[[], None]:
        def run() -> None:
            outcomes = in_one_batch(store, [take(first), then_take(second)])
            assert outcomes == [None, None]

        return run

    commits = [store.writer.commits for store in stores]
    in_parallel([batch_of(stores[0], "call-1", "call-2"), batch_of(stores[1], "call-2", "call-1")])

    # The store whose second change found its call taken (one or both, as the threads ran)
    # committed its first change alone, ahead of it.
    made = [store.writer.commits - before for store, before in zip(stores, commits, strict=True)]
    assert sorted(made) in ([1, 2], [2, 2])
    with stores[0].transaction() as tx:
        for call_id, account in accounts.items():
            assert len(tx.legs_matching(query(call_id, account=account))) == 1
    for store in stores:
        store.close()


@pytest.mark.postgresql
def test_a_change_waiting_for_its_account_keeps_the_call_it_read(postgres_url: str) -> None:
    """A change past its first lock waits for the next one holding it: committing the batch's
    other changes then would give up the call it has read too."""
    store = open_pg(postgres_url)
    account_lock = (EXTENSION_LOCKS, _hash32(("account", ACCOUNT)))
    call_lock = (LEG_LOCKS, _call_lock(ACCOUNT, "call-1", "108"))
    call_free_meanwhile: list[bool] = []
    with (
        psycopg.connect(postgres_url, autocommit=True) as admitting,
        psycopg.connect(postgres_url, autocommit=True) as probe,
    ):
        admitting.execute("BEGIN")
        admitting.execute("SELECT pg_advisory_xact_lock(%s, %s)", account_lock)

        def waiting_for_a_lock() -> bool:
            row = probe.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()
            return row is not None and row[0] > 0

        def let_it_through() -> None:
            wait_until(waiting_for_a_lock, "the change waits for the account's lock")
            taken = probe.execute("SELECT pg_try_advisory_lock(%s, %s)", call_lock).fetchone()
            assert taken is not None
            call_free_meanwhile.append(taken[0])
            probe.execute("SELECT pg_advisory_unlock_all()")
            admitting.execute("COMMIT")

        def admit(tx: Any) -> None:
            tx.legs_matching(query("call-1", closed_since=0.0))
            assert tx.admit_extension(ACCOUNT, "108", limit=10)

        releaser = threading.Thread(target=let_it_through)
        releaser.start()
        outcomes = in_one_batch(
            store,
            [
                lambda tx: tx.legs_matching(query("call-9", closed_since=0.0)),
                admit,
            ],
        )
        releaser.join(timeout=120)

    assert outcomes == [None, None]
    assert call_free_meanwhile == [False]
    store.close()
