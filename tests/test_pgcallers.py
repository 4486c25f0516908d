"""The caller book in PostgreSQL, on its own: the same behaviour as the reference book, every
query on an index, and replicas that never both make one caller's call or resolve one wait.

Each step runs through `Callers` on a `MemoryCallerBook` and, in a transaction of its own, on
a `PostgresCallerBook`; the tallies, the gauges and the records must come out the same.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass, replace
from datetime import UTC, datetime
from functools import partial
from itertools import count
from typing import TYPE_CHECKING, Any, Self, TypeVar

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.callers import (
    Callers,
    CallerScope,
    CallerSettings,
    InboundCall,
    InboundLeg,
    MemoryCallerBook,
    WaitingCaller,
)
from exporter.calls import CallTracker, TrackerSettings
from exporter.events import EVENT_KINDS, CallEvent, Direction, Service
from exporter.legs import (
    CallerTally,
    InboundCallSettled,
    Leg,
    LegLabels,
    LegStarted,
    MissedCallerResolved,
    Outcome,
    TallyKind,
    TallyLayout,
)
from exporter.numbers import Lines
from exporter.store import LegQuery
from exporter.store.pgcallers import (
    CALLER_KEYS,
    CALLER_LOCKS,
    CALLER_SCHEMA,
    LOCK_CALLERS,
    TRY_LOCK_CALLERS,
    OwnLocks,
    PostgresCallerBook,
)
from exporter.store.postgresql import PostgresCallStore, _PostgresTransaction
from tests.conftest import FakeClock

if TYPE_CHECKING:
    from tests.pgcluster import PgCluster

pytest_plugins = ["tests.pgcluster"]
pytestmark = pytest.mark.postgresql

ACCOUNT = 1
CALLER = "0903123456"
MAIN = "0222202999"
MONDAY = datetime(2026, 11, 23, 10, 0, tzinfo=UTC).timestamp()
LINES = {ACCOUNT: Lines.from_config({MAIN: "Main line", "0850123456": "Sales"})}
TIMEOUT = 30.0  # seconds a thread may take on the loaded test machine
T = TypeVar("T")


def digest(key: str) -> str:
    return hmac.new(b"test key", key.encode(), hashlib.sha256).hexdigest()[:16]


CALLERS = Callers(CallerSettings(), LINES, digest)


def create_tables(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        for statement in CALLER_SCHEMA.split(";"):
            if statement.strip():
                connection.execute(statement)


@pytest.fixture
def caller_db(postgres_url: str) -> str:
    create_tables(postgres_url)
    return postgres_url


@pytest.fixture(scope="module")
def shared_caller_db(postgres_cluster: PgCluster) -> str:
    """One database for every example of a property test, emptied by each."""
    url = postgres_cluster.create_database()
    create_tables(url)
    return url


def empty(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("TRUNCATE inbound_call_legs, inbound_calls, waiting_callers")


# -- the same behaviour as the reference book --------------------------------------------------


@dataclass(frozen=True)
class Records:
    """A book's records without their ids, which each book numbers its own way."""

    calls: Counter[tuple[Any, ...]]
    legs: dict[int, tuple[Any, ...]]  # leg id -> its call
    waiting: Counter[tuple[Any, ...]]


def memory_records(book: MemoryCallerBook) -> Records:
    calls = {call_id: _call_values(call) for call_id, call in book.calls.items()}
    return Records(
        Counter(calls.values()),
        {leg: calls[call_id] for leg, call_id in book.legs.items()},
        Counter(_waiting_values(waiting) for waiting in book.waiting.values()),
    )


CALL_VALUES = (
    "c.account, c.line, c.call_id, c.caller, c.opened_at, c.first_ring_at, c.quiet_since,"
    " c.open_legs, c.answered_at, c.expired"
)
READ_RECORDS = (
    f"SELECT {CALL_VALUES} FROM inbound_calls c",
    f"SELECT l.leg, {CALL_VALUES} FROM inbound_call_legs l JOIN inbound_calls c ON c.id = l.call",
    "SELECT account, caller, line, first_missed_at, call_started_at FROM waiting_callers",
)


def postgres_records(connection: psycopg.Connection[Any]) -> Records:
    calls, legs, waiting = (connection.execute(query).fetchall() for query in READ_RECORDS)
    connection.commit()
    return Records(
        Counter(tuple(row) for row in calls),
        {row[0]: tuple(row[1:]) for row in legs},
        Counter(tuple(row) for row in waiting),
    )


def _call_values(call: InboundCall) -> tuple[Any, ...]:
    return astuple(call)[:-1]  # all but the id


def _waiting_values(waiting: WaitingCaller) -> tuple[Any, ...]:
    return astuple(waiting)[:-1]


class Twins:
    """Drives the caller level on both books at once, on a hand-moved clock; every step must
    give the same tallies, gauges and records on both."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self.connection = connection
        self.memory = MemoryCallerBook()
        self.now = MONDAY
        self.tallies: list[CallerTally] = []
        self._leg_ids = count(1)

    def step(self, change: Callable[[Any], list[CallerTally]]) -> list[CallerTally]:
        expected = change(self.memory)
        got = change(PostgresCallerBook(self.connection))
        self.connection.commit()
        assert got == expected
        self.tallies += got
        self.check()
        return got

    def check(self) -> None:
        book = PostgresCallerBook(self.connection)
        got = CALLERS.gauges(book, self.now, [ACCOUNT])
        self.connection.commit()
        assert got == CALLERS.gauges(self.memory, self.now, [ACCOUNT])
        assert postgres_records(self.connection) == memory_records(self.memory)

    def ring(
        self,
        caller: str | None = CALLER,
        line: str | None = MAIN,
        call_id: str | None = None,
        account: int = ACCOUNT,
        rang: bool = True,
    ) -> int:
        leg = InboundLeg(next(self._leg_ids), account, call_id, caller, line, rang)
        self.step(lambda book: CALLERS.on_leg_started(book, leg, self.now))
        return leg.id

    def answer(self, leg: int) -> None:
        self.step(lambda book: CALLERS.on_leg_answered(book, leg, self.now))

    def end(self, leg: int, outcome: Outcome, answered_at: float | None = None) -> None:
        self.step(lambda book: CALLERS.on_leg_ended(book, leg, outcome, self.now, answered_at))

    def call_out(self, number: str | None, answered: bool, account: int = ACCOUNT) -> None:
        if answered:
            self.step(lambda book: CALLERS.on_outbound_answered(book, account, number, self.now))
        else:
            self.step(lambda book: CALLERS.on_outbound_unanswered(book, account, number, self.now))

    def after(self, seconds: float) -> None:
        """Time passes; an event or a scrape then settles what is due."""
        self.now += seconds
        self.step(lambda book: CALLERS.settle(book, self.now))

    def outcomes(self) -> Counter[str]:
        return Counter(t.outcome.value for t in self.tallies if isinstance(t, InboundCallSettled))

    def resolutions(self) -> Counter[str]:
        return Counter(
            t.resolution.value for t in self.tallies if isinstance(t, MissedCallerResolved)
        )


@pytest.fixture(params=["alone", "pipelined"])
def twins(request: pytest.FixtureRequest, caller_db: str) -> Iterator[Twins]:
    """Over a connection of its own, or one kept in pipeline mode as a batching store does."""
    with psycopg.connect(caller_db) as connection:
        if request.param == "alone":
            yield Twins(connection)
        else:
            with connection.pipeline():
                yield Twins(connection)


def missed_call(twins: Twins, caller: str | None = CALLER) -> None:
    leg = twins.ring(caller)
    twins.after(20)
    twins.end(leg, Outcome.MISSED)
    twins.after(30)


def test_a_ring_group_nobody_answers_then_one_phone_answers(twins: Twins) -> None:
    legs = [twins.ring() for _ in range(3)]
    twins.after(20)
    for leg in legs:
        twins.end(leg, Outcome.MISSED)
    twins.after(30)
    assert twins.outcomes() == Counter({"missed": 1})
    answered = {abon: twins.ring(call_id="ring-2") for abon in ("201", "202", "203")}
    twins.after(8)
    twins.answer(answered["202"])
    twins.end(answered["201"], Outcome.CANCELLED)
    twins.end(answered["203"], Outcome.CANCELLED)
    twins.after(60)
    twins.end(answered["202"], Outcome.ANSWERED)
    twins.after(3600)
    assert twins.outcomes() == Counter({"missed": 1, "answered": 1})
    assert twins.resolutions() == Counter({"called_again": 1})
    assert postgres_records(twins.connection) == Records(Counter(), {}, Counter())


@pytest.mark.parametrize("call_id", [None, "call-1"])
def test_a_hunt_group_and_a_caller_who_hangs_up(twins: Twins, call_id: str | None) -> None:
    first = twins.ring(call_id=call_id)
    twins.after(20)
    twins.end(first, Outcome.MISSED)
    twins.after(5)
    second = twins.ring(call_id=call_id)
    twins.after(6)
    twins.end(second, Outcome.CANCELLED)
    twins.after(11)
    third = twins.ring(caller="+421 903 123 456")  # past the group window: another call
    twins.after(2)
    twins.end(third, Outcome.ANSWERED, answered_at=twins.now - 1)
    assert twins.outcomes() == Counter({"missed": 1, "answered": 1})
    assert twins.resolutions() == Counter({"called_again": 1})


def test_a_call_id_whose_first_leg_lacks_the_number_is_one_call(twins: Twins) -> None:
    first = twins.ring(caller=None, call_id="c-1")
    second = twins.ring(call_id="c-1")
    twins.after(10)
    twins.end(first, Outcome.MISSED)
    twins.end(second, Outcome.MISSED)
    twins.after(30)
    assert twins.outcomes() == Counter({"missed": 1})


def test_missed_callers_called_back_again_and_given_up(twins: Twins) -> None:
    missed_call(twins)
    twins.after(570)
    twins.call_out("+421 903 123 456", answered=True)
    missed_call(twins, caller="0903222222")
    twins.call_out("0903222222", answered=False)
    missed_call(twins, caller="421903222222")  # missed again while waiting
    twins.after(72 * 3600)
    assert twins.resolutions() == Counter({"called_back": 1, "gave_up": 1})
    leg = twins.ring(caller="0903333333", line="0850123456")
    twins.end(leg, Outcome.CANCELLED)
    twins.after(10)
    twins.call_out("0903333333", answered=True)  # before the missed call settled
    assert twins.resolutions()["called_back"] == 2


def test_withheld_expired_unseen_and_other_accounts(twins: Twins) -> None:
    missed_call(twins, caller=None)
    missed_call(twins, caller="anonymous")
    leg = twins.ring(caller="0903444444", rang=False)
    twins.after(4 * 3600)
    twins.end(leg, Outcome.EXPIRED)
    twins.answer(999)
    twins.end(999, Outcome.MISSED)
    missed_call(twins, caller="0903555555")
    twins.call_out("0903555555", answered=True, account=2)
    twins.ring(account=2)
    twins.ring(line="0850123456")
    twins.ring(line=None)
    twins.after(31)
    assert twins.outcomes() == Counter({"missed": 3, "expired": 1})


def test_numbers_are_kept_only_as_digests(twins: Twins) -> None:
    missed_call(twins)
    twins.ring(caller="0903987654", call_id="c-9")
    with twins.connection.cursor() as cursor:
        cursor.execute(
            "SELECT caller FROM inbound_calls UNION ALL SELECT caller FROM waiting_callers"
        )
        kept = {caller for (caller,) in cursor.fetchall()}
    twins.connection.commit()
    assert kept == {digest("903123456"), digest("903987654")}


NUMBERS = [CALLER, "+421 903 123 456", "0903222222", None]
LINE_NUMBERS = [MAIN, "0850123456", None]
steps = st.one_of(
    st.tuples(
        st.just("ring"),
        st.sampled_from(NUMBERS),
        st.sampled_from(LINE_NUMBERS),
        st.sampled_from([None, None, "a", "b"]),
        st.booleans(),
    ),
    st.tuples(st.just("answer"), st.integers(0, 20)),
    st.tuples(st.just("end"), st.integers(0, 20), st.sampled_from(list(Outcome))),
    st.tuples(st.just("call_out"), st.sampled_from(NUMBERS), st.booleans()),
    st.tuples(st.just("after"), st.sampled_from([1.0, 5.0, 11.0, 31.0, 3600.0, 72 * 3600.0])),
)


@settings(max_examples=25, deadline=None)
@given(script=st.lists(steps, max_size=30))
def test_any_sequence_of_changes_gives_what_the_reference_book_gives(
    shared_caller_db: str, script: list[tuple[Any, ...]]
) -> None:
    empty(shared_caller_db)
    with psycopg.connect(shared_caller_db) as connection:
        twins = Twins(connection)
        legs: list[int] = []
        for step in script:
            match step:
                case ("ring", number, line, call_id, rang):
                    legs.append(twins.ring(number, line, call_id, rang=rang))
                case ("answer", index) if legs:
                    twins.answer(legs[index % len(legs)])
                case ("end", index, outcome) if legs:
                    twins.end(legs[index % len(legs)], outcome)
                case ("call_out", number, answered):
                    twins.call_out(number, answered)
                case ("after", seconds):
                    twins.after(seconds)


# -- every query on an index --------------------------------------------------------------------


RECORDED: list[tuple[str, Any]] = []


def table_scans(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The nodes of a JSON plan that read a table or an index."""
    if "Scan" in plan["Node Type"] and plan["Node Type"] not in (
        "Subquery Scan",
        "Bitmap Heap Scan",
    ):
        yield plan
    for child in plan.get("Plans", ()):
        yield from table_scans(child)


class RecordingCursor(psycopg.Cursor[Any]):
    """Remembers every statement, to explain the book's queries afterwards."""

    def execute(
        self,
        query: Any,
        params: Any = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Self:
        RECORDED.append((str(query), params))
        return super().execute(query, params, prepare=prepare, binary=binary)


def test_every_query_of_the_book_reads_an_index(caller_db: str) -> None:
    RECORDED.clear()
    with psycopg.connect(caller_db, cursor_factory=RecordingCursor) as connection:
        twins = Twins(connection)
        missed_call(twins)
        missed_call(twins, caller=None)
        missed_call(twins, caller="0903222222")  # never reached: given up
        leg = twins.ring(call_id="c-1")
        twins.answer(leg)
        twins.end(leg, Outcome.ANSWERED)
        twins.call_out(CALLER, answered=True)
        twins.after(72 * 3600)
    book_queries = {
        query: params
        for query, params in RECORDED
        if query.startswith(("SELECT", "UPDATE", "DELETE"))
        and "pg_advisory_xact_lock(" not in query  # taking a lock reads no table
        and query not in READ_RECORDS  # the test's own
    }
    with psycopg.connect(caller_db) as connection:
        connection.execute("SET enable_seqscan = off")  # still chosen when no index serves
        for query, params in book_queries.items():
            row = connection.execute(f"EXPLAIN (FORMAT JSON) {query}", params).fetchone()
            assert row is not None
            for scan in table_scans(row[0][0]["Plan"]):
                # An index that narrows the rows down, or one that holds every column read.
                served = "Index Cond" in scan or scan["Node Type"] == "Index Only Scan"
                assert served, f"{query}\n{scan}"
    assert len(book_queries) >= 15, sorted(book_queries)


# -- replicas ------------------------------------------------------------------------------------


def backend_pid(connection: psycopg.Connection[Any]) -> int:
    return connection.info.backend_pid


def wait_while_running(url: str, thread: threading.Thread, pid: int | None = None) -> None:
    """Until the backend `pid` (any of the database's, without one) waits for a lock another
    transaction holds, or `thread` is done (it did not need one)."""
    deadline = time.monotonic() + TIMEOUT
    with psycopg.connect(url, autocommit=True) as monitor:
        while thread.is_alive() and time.monotonic() < deadline:
            row = monitor.execute(
                "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid)"
                " WHERE pid = coalesce(%s::int, pid) AND datname = current_database()"
                " AND NOT granted",
                (pid,),
            ).fetchone()
            if row and row[0]:
                return
            time.sleep(0.05)


class Replica:
    """One replica's connection, handling one change at a time in its own thread."""

    def __init__(self, url: str) -> None:
        # A lock never granted fails the test rather than hang it.
        self.connection = psycopg.connect(url, options="-c lock_timeout=30s")
        self.pid = backend_pid(self.connection)

    def close(self) -> None:
        self.connection.close()

    def run(self, change: Callable[[PostgresCallerBook], T]) -> T:
        return change(PostgresCallerBook(self.connection))


def one_after_the_other(
    url: str,
    first: tuple[Replica, Callable[[PostgresCallerBook], T]],
    second: tuple[Replica, Callable[[PostgresCallerBook], T]],
) -> tuple[T, T]:
    """The first change holds its transaction open while the second runs on another
    connection; the first commits once the second waits for a lock (or is done)."""
    (one, change_one), (other, change_other) = first, second
    done_one = one.run(change_one)
    results: list[T] = []
    errors: list[BaseException] = []

    def run_other() -> None:
        try:
            results.append(other.run(change_other))
            other.connection.commit()
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=run_other)
    thread.start()
    try:
        wait_while_running(url, thread, other.pid)
    finally:
        one.connection.commit()
        thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert not errors, errors
    return done_one, results[0]


@pytest.fixture
def replicas(caller_db: str) -> Iterator[tuple[Replica, Replica]]:
    pair = (Replica(caller_db), Replica(caller_db))
    yield pair
    for replica in pair:
        replica.close()


def ringing_and_waiting(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as connection:
        calls = connection.execute("SELECT count(*) FROM inbound_calls").fetchone()
        waiting = connection.execute("SELECT count(*) FROM waiting_callers").fetchone()
    assert calls is not None
    assert waiting is not None
    return calls[0], waiting[0]


@pytest.mark.parametrize(("first_caller", "call_id"), [(CALLER, None), (None, "ring-1")])
def test_two_replicas_ringing_one_caller_make_one_call_and_one_waiting_caller(
    caller_db: str,
    replicas: tuple[Replica, Replica],
    first_caller: str | None,
    call_id: str | None,
) -> None:
    one, other = replicas
    legs = [InboundLeg(leg, ACCOUNT, call_id, CALLER, MAIN) for leg in (201, 202)]
    legs[0] = replace(legs[0], caller=first_caller)
    one_after_the_other(
        caller_db,
        (one, lambda book: CALLERS.on_leg_started(book, legs[0], MONDAY)),
        (other, lambda book: CALLERS.on_leg_started(book, legs[1], MONDAY)),
    )
    assert ringing_and_waiting(caller_db) == (1, 0)
    one_after_the_other(
        caller_db,
        (one, lambda book: CALLERS.on_leg_ended(book, 201, Outcome.MISSED, MONDAY + 20)),
        (other, lambda book: CALLERS.on_leg_ended(book, 202, Outcome.MISSED, MONDAY + 20)),
    )
    settled = one_after_the_other(
        caller_db,
        (one, lambda book: CALLERS.on_outbound_unanswered(book, ACCOUNT, CALLER, MONDAY + 25)),
        (other, lambda book: CALLERS.on_outbound_unanswered(book, ACCOUNT, CALLER, MONDAY + 25)),
    )
    assert [len(tallies) for tallies in settled] == [2, 1], "missed once, two attempts"
    assert ringing_and_waiting(caller_db) == (0, 1)
    resolved = one_after_the_other(
        caller_db,
        (one, lambda book: CALLERS.on_outbound_answered(book, ACCOUNT, CALLER, MONDAY + 90)),
        (other, lambda book: CALLERS.on_outbound_answered(book, ACCOUNT, CALLER, MONDAY + 90)),
    )
    assert [
        [type(t).__name__ for t in tallies if isinstance(t, MissedCallerResolved)]
        for tallies in resolved
    ] == [["MissedCallerResolved"], []]
    assert ringing_and_waiting(caller_db) == (0, 0)


def test_the_end_of_a_leg_waits_for_the_change_holding_its_account(
    caller_db: str, replicas: tuple[Replica, Replica]
) -> None:
    one, other = replicas
    leg = InboundLeg(201, ACCOUNT, None, CALLER, MAIN)
    one.run(lambda book: CALLERS.on_leg_started(book, leg, MONDAY))
    one.connection.commit()
    answered, ended = one_after_the_other(
        caller_db,
        (one, lambda book: CALLERS.on_leg_answered(book, 201, MONDAY + 5)),
        (other, lambda book: CALLERS.on_leg_ended(book, 201, Outcome.ANSWERED, MONDAY + 9)),
    )
    assert len(answered) == 1
    assert ended == [], "answered once, at the first answer"


def test_a_sweep_skips_an_account_another_replica_holds_and_settles_it_later(
    caller_db: str, replicas: tuple[Replica, Replica]
) -> None:
    one, other = replicas
    leg = InboundLeg(201, ACCOUNT, None, CALLER, MAIN)
    one.run(lambda book: CALLERS.on_leg_started(book, leg, MONDAY))
    one.run(lambda book: CALLERS.on_leg_ended(book, 201, Outcome.MISSED, MONDAY + 20))
    one.connection.commit()
    other_caller = replace(leg, id=202, caller="0903999999")
    one.run(lambda book: CALLERS.on_leg_started(book, other_caller, MONDAY + 60))
    # The account is held: the sweep neither waits nor settles it.
    assert other.run(lambda book: CALLERS.settle(book, MONDAY + 60)) == []
    other.connection.commit()
    one.connection.commit()
    [missed] = other.run(lambda book: CALLERS.settle(book, MONDAY + 60))
    other.connection.commit()
    assert isinstance(missed, InboundCallSettled)
    assert missed.outcome.value == "missed"
    assert ringing_and_waiting(caller_db) == (1, 1)


class HeldBack(OwnLocks):
    """Sweeps wait for the store's word."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        super().__init__(connection)
        self.allowed = False
        self.swept_accounts: list[list[int]] = []

    def may_sweep(self) -> bool:
        return self.allowed

    def swept(self, accounts: Iterable[int]) -> None:
        self.swept_accounts.append(list(accounts))


def test_a_store_tries_the_locks_of_several_accounts_at_once(
    replicas: tuple[Replica, Replica],
) -> None:
    one, other = replicas
    one.connection.execute(LOCK_CALLERS, (2,))
    got = other.connection.execute(TRY_LOCK_CALLERS, ([1, 2, 2**40 + 3],)).fetchall()
    assert got == [(1,), (2**40 + 3,)]
    one.connection.commit()
    assert other.connection.execute(TRY_LOCK_CALLERS, ([2],)).fetchall() == [(2,)]
    other.connection.commit()


def test_a_sweep_the_store_holds_back_finds_nothing_due_until_it_may(caller_db: str) -> None:
    leg = InboundLeg(201, ACCOUNT, None, CALLER, MAIN)
    with psycopg.connect(caller_db) as connection:
        locks = HeldBack(connection)
        book = PostgresCallerBook(connection, locks)
        CALLERS.on_leg_started(book, leg, MONDAY)
        CALLERS.on_leg_ended(book, 201, Outcome.MISSED, MONDAY + 20)
        assert CALLERS.settle(book, MONDAY + 100 * 3600) == []
        locks.allowed = True
        assert [type(t).__name__ for t in CALLERS.settle(book, MONDAY + 100 * 3600)] == [
            "InboundCallSettled",
            "MissedCallerResolved",
        ]
        assert locks.swept_accounts == [[ACCOUNT], [ACCOUNT]], "told of both sweeps' locks"


def test_a_rollback_to_a_savepoint_gives_up_the_lock_and_the_book_takes_it_again(
    caller_db: str, replicas: tuple[Replica, Replica]
) -> None:
    one, other = replicas
    leg = InboundLeg(201, ACCOUNT, None, CALLER, MAIN)
    book = PostgresCallerBook(one.connection)  # one book for the whole transaction
    one.connection.execute("SAVEPOINT before_leg")
    CALLERS.on_leg_started(book, leg, MONDAY)
    one.connection.execute("ROLLBACK TO SAVEPOINT before_leg")  # and the lock with it
    started = one_after_the_other(
        caller_db,
        (one, lambda _book: CALLERS.on_leg_started(book, replace(leg, id=202), MONDAY)),
        (other, lambda book: CALLERS.on_leg_started(book, replace(leg, id=203), MONDAY)),
    )
    assert started == ([], [])
    with psycopg.connect(caller_db) as connection:
        calls = connection.execute("SELECT open_legs FROM inbound_calls").fetchall()
        legs = connection.execute("SELECT leg FROM inbound_call_legs ORDER BY leg").fetchall()
    assert calls == [(2,)], "one call: the second replica saw the first's"
    assert legs == [(202,), (203,)]


# -- in the PostgreSQL store ----------------------------------------------------------------------

LAYOUT = TallyLayout((5.0, 20.0), (60.0,))
VPBX = LegLabels(ACCOUNT, Service.VPBX, Direction.INBOUND, "108")
TELEPHONY = LegLabels(ACCOUNT, Service.TELEPHONY, Direction.INBOUND, "108")


def open_store(url: str) -> PostgresCallStore:
    return PostgresCallStore(url, LAYOUT, connect_timeout=5.0, statement_timeout=30.0)


def legs_of(labels: LegLabels, call_id: str, callers: CallerScope | None = None) -> LegQuery:
    return LegQuery(
        labels.account,
        labels.service,
        labels.direction,
        labels.extension,
        call_id,
        CALLER,
        0.0,
        callers,
    )


def new_leg(labels: LegLabels, call_id: str, opened_at: float = 100.0) -> Leg:
    return Leg(labels, labels.extension, call_id, opened_at=opened_at, started_at=opened_at)


class Holder:
    """A change of one store kept open in a thread of its own, until released."""

    def __init__(self, store: PostgresCallStore, change: Callable[[Any], object]) -> None:
        self._inside, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(store, change))
        self._thread.start()
        assert self._inside.wait(TIMEOUT)

    def _run(self, store: PostgresCallStore, change: Callable[[Any], object]) -> None:
        with store.transaction() as tx:
            change(tx)
            self._inside.set()
            self._release.wait(TIMEOUT)

    def release(self) -> None:
        self._release.set()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive()


def caller_lock_waiters(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as monitor:
        row = monitor.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND classid IN (%s::oid, %s::oid)",
            (CALLER_LOCKS, CALLER_KEYS),
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def two_stores(postgres_url: str) -> Iterator[tuple[PostgresCallStore, PostgresCallStore]]:
    stores = (open_store(postgres_url), open_store(postgres_url))
    yield stores
    for store in stores:
        store.close()


HELD = CallerScope(ACCOUNT, "call-1", "caller-1")


@pytest.mark.parametrize(
    ("scope", "waits"),
    [
        (None, False),  # a telephony leg, or an outbound start: no caller records
        (CallerScope(ACCOUNT, "call-2", "caller-2"), False),  # another caller's call
        (CallerScope(ACCOUNT + 1, "call-1", "caller-1"), False),  # another account's
        (CallerScope(ACCOUNT, "call-2", "caller-1"), True),  # the same caller's other call
        (CallerScope(ACCOUNT, "call-1", None), True),  # its call, from a leg without a number
        (CallerScope(ACCOUNT, caller="caller-1"), True),  # a call back to that caller
        (CallerScope(ACCOUNT, whole_account=True), True),  # an event of any caller
    ],
)
def test_a_change_holds_the_callers_it_may_reach_from_its_legs_to_its_commit(
    postgres_url: str,
    two_stores: tuple[PostgresCallStore, PostgresCallStore],
    scope: CallerScope | None,
    waits: bool,
) -> None:
    one, other = two_stores
    holder = Holder(one, lambda tx: tx.legs_matching(legs_of(VPBX, "call-1", HELD)))
    done = threading.Event()

    def another_change() -> None:
        with other.transaction() as tx:
            tx.legs_matching(legs_of(VPBX, "call-3", scope))
        done.set()

    thread = threading.Thread(target=another_change)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not caller_lock_waiters(postgres_url) and thread.is_alive():
        assert time.monotonic() < deadline, "neither done nor waiting"
        time.sleep(0.05)
    assert done.is_set() is not waits
    holder.release()
    thread.join(TIMEOUT)
    assert done.is_set()


class PausingStore(PostgresCallStore):
    """A store whose changes, once `pause` is set, wait before their commit until released;
    it counts the changes begun."""

    def __init__(self, url: str) -> None:
        super().__init__(url, LAYOUT, connect_timeout=5.0, statement_timeout=30.0)
        self.pause = False
        self.made, self.released = threading.Event(), threading.Event()
        self.changes = 0

    @contextmanager
    def transaction(self) -> Iterator[_PostgresTransaction]:
        self.changes += 1
        with super().transaction() as tx:
            yield tx
            if self.pause:
                self.made.set()
                assert self.released.wait(TIMEOUT)


@pytest.fixture
def pausing_stores(postgres_url: str) -> Iterator[tuple[PausingStore, PausingStore]]:
    stores = (PausingStore(postgres_url), PausingStore(postgres_url))
    yield stores
    for store in stores:
        store.close()


def in_thread(action: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=action)
    thread.start()
    return thread


def inbound_calls(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as connection:
        return connection.execute(
            "SELECT call_id, open_legs FROM inbound_calls ORDER BY id"
        ).fetchall()


@pytest.mark.parametrize(("call_id", "first_did"), [(None, CALLER), ("ring-1", None)])
def test_one_callers_legs_through_two_stores_wait_for_each_other_and_make_one_call(
    postgres_url: str,
    pausing_stores: tuple[PausingStore, PausingStore],
    call_id: str | None,
    first_did: str | None,
) -> None:
    """The second leg waits for the first's commit, whichever lock it reaches the call by:
    the caller's (a call without call_id) or the call_id's (its first leg without a number)."""
    one, other = pausing_stores
    clock = FakeClock()
    settings = TrackerSettings(lines=LINES)
    first, second = CallTracker(one, settings, clock), CallTracker(other, settings, clock)
    one.reserve_extensions(ACCOUNT, ["201", "202", "203"])  # new ones take turns to be admitted
    one.pause = True
    holding = in_thread(
        partial(first.on_event, vpbx_event("onInCallingStart", call_id, "201", first_did))
    )
    assert one.made.wait(TIMEOUT)
    # Another caller's leg meanwhile: not held back.
    second.on_event(vpbx_event("onInCallingStart", None, "203", "0903999999"))
    waiting = in_thread(partial(second.on_event, vpbx_event("onInCallingStart", call_id, "202")))
    deadline = time.monotonic() + TIMEOUT
    while not caller_lock_waiters(postgres_url) and waiting.is_alive():
        assert time.monotonic() < deadline, "neither done nor waiting"
        time.sleep(0.05)
    assert waiting.is_alive(), "the second leg waits for the first leg's change"
    one.released.set()
    for thread in (holding, waiting):
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert inbound_calls(postgres_url) == [(call_id, 2), (None, 1)]


def test_an_event_reaching_a_caller_outside_its_locks_is_made_again_with_the_whole_account(
    postgres_url: str, pausing_stores: tuple[PausingStore, PausingStore]
) -> None:
    """A call_id's second leg with another number reaches the call under the first number's
    lock, which the event did not take: undone, and made again under the account's lock."""
    store, _ = pausing_stores
    clock = FakeClock()
    tracker = CallTracker(store, TrackerSettings(lines=LINES), clock)
    tracker.on_event(vpbx_event("onInCallingStart", "ring-1", "201"))
    assert store.changes == 1
    tracker.on_event(vpbx_event("onInCallingStart", "ring-1", "202", "0903999999"))
    assert store.changes == 3, "made twice"
    tracker.on_event(vpbx_event("onInCallingStart", "ring-1", "203"))
    assert store.changes == 4, "the next event's locks are its own again"
    assert inbound_calls(postgres_url) == [("ring-1", 3)]
    snapshot = store.snapshot()
    assert snapshot.counters[TallyKind.STARTED] == {
        (str(ACCOUNT), "vpbx", "inbound", abon): 1.0 for abon in ("201", "202", "203")
    }, "the undone change counted nothing"


def test_an_event_sweeps_nothing_before_its_legs_are_locked(
    two_stores: tuple[PostgresCallStore, PostgresCallStore],
) -> None:
    store, _ = two_stores
    quiet = InboundCall(ACCOUNT, "Main line", None, digest("903123456"), 10.0, 10.0, 20.0, 0)
    with store.transaction() as tx:
        tx.callers.save_call(quiet)
    with store.transaction() as tx:
        tx.touch(ACCOUNT, Service.VPBX, 100.0)  # an event's change
        assert tx.callers.calls_quiet_before(50.0) == []
        tx.legs_matching(legs_of(VPBX, "call-1"))
        assert tx.callers.calls_quiet_before(50.0) == [quiet]
    with store.transaction() as tx:  # an expiry's, or a scrape's
        assert tx.callers.calls_quiet_before(50.0) == [quiet]


def test_expiry_leaves_the_vpbx_legs_of_an_account_whose_callers_are_held(
    two_stores: tuple[PostgresCallStore, PostgresCallStore],
) -> None:
    one, other = two_stores
    with one.transaction() as tx:
        tx.insert_leg(new_leg(VPBX, "stale-vpbx", opened_at=1.0), CALLER)
        tx.insert_leg(new_leg(TELEPHONY, "stale-telephony", opened_at=1.0), CALLER)
    holder = Holder(one, lambda tx: tx.legs_matching(legs_of(VPBX, "call-1", HELD)))
    with other.transaction() as tx:
        assert [leg.call_id for leg in tx.open_legs_before(50.0)] == ["stale-telephony"]
    holder.release()
    with other.transaction() as tx:
        stale = tx.open_legs_before(50.0)
        assert sorted(str(leg.call_id) for leg in stale) == ["stale-telephony", "stale-vpbx"]


def test_a_store_of_schema_version_1_gains_the_caller_tables_and_keeps_its_legs(
    postgres_url: str,
) -> None:
    store = open_store(postgres_url)
    with store.transaction() as tx:
        tx.insert_leg(new_leg(VPBX, "call-1"), CALLER)
        tx.record([LegStarted(VPBX)])
    store.close()
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        # As the exporter before the caller level left it.
        connection.execute("DROP TABLE inbound_call_legs, inbound_calls, waiting_callers")
        connection.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")

    store = open_store(postgres_url)
    try:
        assert store.snapshot().counters[TallyKind.STARTED] == {
            (str(ACCOUNT), "vpbx", "inbound", "108"): 1.0
        }
        with store.transaction() as tx:
            assert [leg.call_id for leg in tx.legs_matching(legs_of(VPBX, "call-1"))] == ["call-1"]
            tx.callers.save_waiting(WaitingCaller(ACCOUNT, digest("903123456"), "", 5.0, 1.0))
    finally:
        store.close()
    with psycopg.connect(postgres_url) as connection:
        row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert row == ("2",)


def test_a_store_opening_while_a_batch_writes_caller_records_and_legs_waits_for_nothing(
    postgres_url: str,
) -> None:
    """A worker or replica starting while the others write: opening its store took the tables'
    locks (CREATE INDEX IF NOT EXISTS locks its table even when the index exists), legs' before
    inbound_calls', and a batch that wrote a caller record and went on to a leg deadlocked
    with it."""
    open_store(postgres_url).close()  # the schema is there, as when a worker restarts
    opened: list[PostgresCallStore] = []
    errors: list[BaseException] = []

    def open_another() -> None:
        try:
            opened.append(open_store(postgres_url))
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    with psycopg.connect(postgres_url, options="-c lock_timeout=30s") as batch:
        batch.execute("UPDATE inbound_calls SET open_legs = open_legs WHERE id = 0")
        thread = in_thread(open_another)
        wait_while_running(postgres_url, thread)
        batch.execute("UPDATE legs SET closed_at = closed_at WHERE id = 0")
        batch.commit()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert not errors, errors
    opened[0].close()


def vpbx_event(
    event_type: str, call_id: str | None, abon: str, did: str | None = CALLER
) -> CallEvent:
    kind = EVENT_KINDS[event_type]
    return CallEvent(event_type, kind, ACCOUNT, kind.service, abon, did, call_id, None, MAIN)


def all_at_once(changes: list[Callable[[], object]]) -> None:
    """The changes in threads started together; the first error, if any, raised here."""
    start = threading.Barrier(len(changes), timeout=TIMEOUT)
    errors: list[BaseException] = []

    def run(change: Callable[[], object]) -> None:
        try:
            start.wait()
            change()
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(change,)) for change in changes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors


@pytest.mark.parametrize("call_id", [None, "ring-1"])
def test_a_ring_group_rung_through_two_replicas_at_once_is_one_caller_called_back_once(
    two_stores: tuple[PostgresCallStore, PostgresCallStore], call_id: str | None
) -> None:
    clock = FakeClock()
    settings = TrackerSettings(lines=LINES)
    trackers = [CallTracker(store, settings, clock) for store in two_stores]
    abons = ("201", "202", "203", "204")

    def each_leg(event_type: str) -> None:
        all_at_once(
            [
                partial(trackers[n % 2].on_event, vpbx_event(event_type, call_id, abon))
                for n, abon in enumerate(abons)
            ]
        )

    each_leg("onInCallingStart")
    clock.advance(20)
    each_leg("onInCallingMissed")
    clock.advance(31)
    trackers[0].expire_stale()  # a scrape: the caller's call settles
    snapshot = two_stores[1].snapshot()
    assert snapshot.counters[TallyKind.INBOUND_CALLS][str(ACCOUNT), "Main line", "missed"] == 1
    assert snapshot.waiting_callers == {(ACCOUNT, "Main line"): 1}
    clock.advance(600)
    # Called back from two extensions at once, the number written another way.
    callee = "+421 903 123 456"
    all_at_once(
        [
            partial(
                trackers[n].on_event, vpbx_event("onOutCallingStart", f"back-{n}", abon, callee)
            )
            for n, abon in enumerate(("301", "302"))
        ]
    )
    all_at_once(
        [
            partial(
                trackers[n].on_event, vpbx_event("onOutCallingAnswered", f"back-{n}", abon, callee)
            )
            for n, abon in enumerate(("301", "302"))
        ]
    )
    trackers[1].expire_stale()
    snapshot = two_stores[0].snapshot()
    resolved = snapshot.counters[TallyKind.CALLERS_RESOLVED]
    assert resolved[str(ACCOUNT), "Main line", "called_back"] == 1
    assert snapshot.counters[TallyKind.CALLBACK_ATTEMPTS] == {(str(ACCOUNT), "answered"): 1}
    assert snapshot.waiting_callers == {}
    assert snapshot.counters[TallyKind.INBOUND_CALLS][str(ACCOUNT), "Main line", "missed"] == 1


def webhook_mix(n: int) -> list[CallEvent]:
    """Call `n`'s events, each call with a number and extension of its own: inbound answered,
    missed, rung in a group (answered by one leg, the other cancelled); a call back to the
    caller missed two calls before; telephony. Every other call has no call_id."""
    kind = n % 5
    number = f"090312{n - 2 if kind == 3 else n:04d}"
    call_id = f"call-{n}" if n % 2 else None
    a, b = str(100 + n % 7), str(200 + n % 7)

    def event(event_type: str, abon: str, billsec: int | None = None) -> CallEvent:
        kind = EVENT_KINDS[event_type]
        return CallEvent(
            event_type, kind, ACCOUNT, kind.service, abon, number, call_id, billsec, MAIN
        )

    if kind == 0:
        return [
            event("onInCallingStart", a),
            event("onInCallingAnswered", a),
            event("onInCallingEnd", a, 30),
        ]
    if kind == 1:
        return [event("onInCallingStart", a), event("onInCallingMissed", a)]
    if kind == 2:
        return [
            event("onInCallingStart", a),
            event("onInCallingStart", b),
            event("onInCallingAnswered", a),
            event("onCloseIncomingNotice", b),
            event("onInCallingEnd", a, 30),
        ]
    if kind == 3:
        return [
            event("onOutCallingStart", a),
            event("onOutCallingAnswered", a),
            event("onOutCallingEnd", a, 30),
        ]
    return [event("InboundCallStart", a), event("InboundCallEnd", a)]


def test_a_callers_events_stay_within_the_locks_the_caller_level_names_for_them(
    pausing_stores: tuple[PausingStore, PausingStore],
) -> None:
    """Every event of ordinary traffic reaches only the caller records its scope names: none
    is made again under the whole account (each would cost a second change)."""
    store, _ = pausing_stores
    clock = FakeClock()
    tracker = CallTracker(store, TrackerSettings(lines=LINES), clock)
    events = [event for n in range(40) for event in webhook_mix(n)]
    for event in events:
        tracker.on_event(event)
        clock.advance(1)
    clock.advance(3600)
    tracker.expire_stale()
    assert store.changes == len(events) + 1
    snapshot = store.snapshot()
    settled = snapshot.counters[TallyKind.INBOUND_CALLS]
    assert sum(settled.values()) == 24, "every inbound call counted once"
    resolved = snapshot.counters[TallyKind.CALLERS_RESOLVED]
    assert resolved[str(ACCOUNT), "Main line", "called_back"] == 8, "each missed caller"
