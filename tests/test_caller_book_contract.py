"""The contract of `CallerBook`, on every backend: the reference book in memory and the stores'.

A backend is a name in BOOK_BACKENDS and an opener in OPENERS: a context manager that yields a
`Books`, which opens one transaction at a time and hands out its book. Records go in and out as
copies, as with a database: a change counts once saved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from exporter.callers import (
    CallerBook,
    Callers,
    CallerSettings,
    InboundCall,
    InboundLeg,
    MemoryCallerBook,
    WaitingCaller,
)
from exporter.legs import (
    AttemptOutcome,
    CallbackAttempted,
    CallOutcome,
    InboundCallSettled,
    MissedCallerResolved,
    Outcome,
    Resolution,
    Tally,
    TallyLayout,
)
from exporter.numbers import Lines
from exporter.store import SqliteCallStore
from exporter.store.postgresql import PostgresCallStore

pytest_plugins = ["tests.pgcluster"]

Books = Callable[[], AbstractContextManager[CallerBook]]
ACCOUNT = 1
OTHER_ACCOUNT = 2
T0 = 1_790_000_000.0
LAYOUT = TallyLayout((5.0, 30.0), (60.0,), caller_period=True)


@contextmanager
def memory_books(_request: pytest.FixtureRequest, _tmp_path: Path) -> Iterator[Books]:
    book = MemoryCallerBook()

    @contextmanager
    def transaction() -> Iterator[CallerBook]:
        yield book

    yield transaction


@contextmanager
def sqlite_books(_request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Books]:
    store = SqliteCallStore(tmp_path / "calls.sqlite3", LAYOUT)

    @contextmanager
    def transaction() -> Iterator[CallerBook]:
        with store.transaction() as tx:
            yield tx.callers

    try:
        yield transaction
    finally:
        store.close()


@contextmanager
def postgresql_books(request: pytest.FixtureRequest, _tmp_path: Path) -> Iterator[Books]:
    """A fresh database of the session's throwaway cluster (tests/pgcluster.py)."""
    url = request.getfixturevalue("postgres_url")
    store = PostgresCallStore(url, LAYOUT, connect_timeout=5.0, statement_timeout=30.0)

    @contextmanager
    def transaction() -> Iterator[CallerBook]:
        with store.transaction() as tx:
            yield tx.callers

    try:
        yield transaction
    finally:
        store.close()


# Add a backend here: its name (a pytest.param with marks if it needs a server) and opener.
BOOK_BACKENDS: list[object] = [
    "memory",
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.postgresql),
]
OPENERS: dict[str, Callable[[pytest.FixtureRequest, Path], AbstractContextManager[Books]]] = {
    "memory": memory_books,
    "sqlite": sqlite_books,
    "postgresql": postgresql_books,
}


@pytest.fixture(params=BOOK_BACKENDS)
def book_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Books]:
    with OPENERS[request.param](request, tmp_path) as books:
        yield books


def call(
    caller: str | None = "digest-a",
    call_id: str | None = None,
    account: int = ACCOUNT,
    line: str = "Main line",
    opened_at: float = T0,
    open_legs: int = 1,
) -> InboundCall:
    return InboundCall(
        account, line, call_id, caller, opened_at, opened_at, opened_at, open_legs=open_legs
    )


def waiting(
    caller: str = "digest-a", account: int = ACCOUNT, line: str = "Main line", at: float = T0
) -> WaitingCaller:
    return WaitingCaller(account, caller, line, at, at - 20)


def saved(books: Books, *records: InboundCall | WaitingCaller) -> None:
    with books() as book:
        for record in records:
            if isinstance(record, InboundCall):
                book.save_call(record)
            else:
                book.save_waiting(record)


# -- calls ---------------------------------------------------------------------------------------


def test_a_saved_call_gets_an_id_and_comes_back_whole(book_factory: Books) -> None:
    first, second = call(call_id="c1"), call(call_id="c2")
    saved(book_factory, first, second)
    assert first.id is not None
    assert second.id is not None
    assert first.id != second.id
    with book_factory() as book:
        assert book.call_by_call_id(ACCOUNT, "c1") == first
        assert book.call_by_call_id(ACCOUNT, "c2") == second
        assert book.call_by_call_id(OTHER_ACCOUNT, "c1") is None
        assert book.call_by_call_id(ACCOUNT, "c3") is None


def test_every_field_of_a_call_is_updated(book_factory: Books) -> None:
    one = call(call_id="c1")
    saved(book_factory, one)
    changed = replace(
        one,
        line="Sales",
        caller="digest-b",
        first_ring_at=None,
        quiet_since=T0 + 9.5,
        open_legs=3,
        answered_at=T0 + 4.25,
        expired=True,
    )
    saved(book_factory, changed)
    with book_factory() as book:
        assert book.call_by_call_id(ACCOUNT, "c1") == changed
        assert book.calls_of_caller(ACCOUNT, "digest-b") == [changed]
        assert book.calls_of_caller(ACCOUNT, "digest-a") == []


def test_records_are_copies_a_change_counts_once_saved(book_factory: Books) -> None:
    one = call(call_id="c1")
    saved(book_factory, one)
    with book_factory() as book:
        found = book.call_by_call_id(ACCOUNT, "c1")
        assert found is not None
        found.open_legs = 7
        one.open_legs = 9
        again = book.call_by_call_id(ACCOUNT, "c1")
        assert again is not None
        assert again.open_legs == 1


def test_calls_of_a_caller_oldest_first_withheld_callers_apart(book_factory: Books) -> None:
    later = call(opened_at=T0 + 5)
    earlier = call(opened_at=T0)
    withheld = call(caller=None)
    elsewhere = call(account=OTHER_ACCOUNT)
    someone_else = call(caller="digest-b")
    saved(book_factory, later, earlier, withheld, elsewhere, someone_else)
    with book_factory() as book:
        assert book.calls_of_caller(ACCOUNT, "digest-a") == [earlier, later]
        assert book.calls_of_caller(ACCOUNT, None) == [withheld]
        assert book.calls_of_caller(OTHER_ACCOUNT, "digest-a") == [elsewhere]


def test_a_call_is_found_by_its_legs_until_deleted(book_factory: Books) -> None:
    one, other = call(call_id="c1"), call(call_id="c2")
    with book_factory() as book:
        book.save_call(one)
        book.save_call(other)
        book.add_leg(one, 11)
        book.add_leg(one, 12)
        book.add_leg(other, 13)
    with book_factory() as book:
        assert book.call_of_leg(11) == one
        assert book.call_of_leg(12) == one
        assert book.call_of_leg(13) == other
        assert book.call_of_leg(14) is None
        book.delete_call(one)
    with book_factory() as book:
        assert book.call_of_leg(11) is None
        assert book.call_of_leg(12) is None
        assert book.call_by_call_id(ACCOUNT, "c1") is None
        assert book.call_of_leg(13) == other


def test_calls_quiet_before_have_no_open_leg_oldest_first(book_factory: Books) -> None:
    ringing = call(open_legs=1, opened_at=T0 - 100)
    quiet_late = replace(call(open_legs=0, opened_at=T0 - 50), quiet_since=T0 - 10)
    quiet_early = replace(call(open_legs=0, opened_at=T0 - 60), quiet_since=T0 - 30)
    too_recent = replace(call(open_legs=0, opened_at=T0 - 5), quiet_since=T0 - 9)
    saved(book_factory, ringing, quiet_late, quiet_early, too_recent)
    with book_factory() as book:
        # At or before: a call quiet exactly `settle` seconds settles.
        assert book.calls_quiet_before(T0 - 10) == [quiet_early, quiet_late]
        assert book.calls_quiet_before(T0 - 31) == []


# -- waiting callers -----------------------------------------------------------------------------


def test_a_waiting_caller_is_one_per_account_and_caller(book_factory: Books) -> None:
    one, elsewhere = waiting(), waiting(account=OTHER_ACCOUNT)
    saved(book_factory, one, elsewhere)
    assert one.id is not None
    assert elsewhere.id is not None
    assert one.id != elsewhere.id
    with book_factory() as book:
        assert book.waiting_caller(ACCOUNT, "digest-a") == one
        assert book.waiting_caller(OTHER_ACCOUNT, "digest-a") == elsewhere
        assert book.waiting_caller(ACCOUNT, "digest-b") is None
        moved = replace(one, line="Sales", first_missed_at=T0 + 1, call_started_at=T0 - 3)
        book.save_waiting(moved)
    with book_factory() as book:
        assert book.waiting_caller(ACCOUNT, "digest-a") == moved
        book.delete_waiting(moved)
    with book_factory() as book:
        assert book.waiting_caller(ACCOUNT, "digest-a") is None
        assert book.waiting_caller(OTHER_ACCOUNT, "digest-a") == elsewhere


def test_callers_missed_before_oldest_first(book_factory: Books) -> None:
    late, early, recent = (
        waiting("digest-a", at=T0 - 10),
        waiting("digest-b", at=T0 - 20),
        waiting("digest-c", at=T0),
    )
    saved(book_factory, late, early, recent)
    with book_factory() as book:
        assert book.waiting_missed_before(T0 - 10) == [early, late]
        assert book.waiting_missed_before(T0 - 21) == []


# -- the gauges' aggregates ----------------------------------------------------------------------


def test_the_aggregates_count_ringing_calls_and_waiting_callers_per_line(
    book_factory: Books,
) -> None:
    answered = replace(call(), answered_at=T0 + 1)
    saved(
        book_factory,
        call(),
        call(caller="digest-b"),
        call(line="Sales"),
        call(account=OTHER_ACCOUNT),
        call(open_legs=0),  # nothing rings
        answered,
        waiting("digest-a", at=T0 - 30),
        waiting("digest-b", at=T0 - 60),
        waiting("digest-c", line="", at=T0 - 10),
        waiting("digest-a", account=OTHER_ACCOUNT, at=T0 - 5),
    )
    with book_factory() as book:
        assert dict(book.ringing_calls()) == {
            (ACCOUNT, "Main line"): 2,
            (ACCOUNT, "Sales"): 1,
            (OTHER_ACCOUNT, "Main line"): 1,
        }
        assert dict(book.waiting_callers()) == {
            (ACCOUNT, "Main line"): 2,
            (ACCOUNT, ""): 1,
            (OTHER_ACCOUNT, "Main line"): 1,
        }
        assert dict(book.first_misses()) == {ACCOUNT: T0 - 60, OTHER_ACCOUNT: T0 - 5}


def test_an_empty_book_has_no_aggregates(book_factory: Books) -> None:
    with book_factory() as book:
        assert dict(book.ringing_calls()) == {}
        assert dict(book.waiting_callers()) == {}
        assert dict(book.first_misses()) == {}


# -- the rules over each book --------------------------------------------------------------------


def test_the_caller_rules_give_the_same_tallies_on_every_book(book_factory: Books) -> None:
    """A ring group of three nobody answers, then a call-back: one transaction per event."""
    lines = {ACCOUNT: Lines.from_config({"0222202999": "Main line"})}
    callers = Callers(CallerSettings(), lines, lambda key: f"digest-{key}")
    tallies: list[Tally] = []
    now = T0
    for leg_id in (1, 2, 3):
        with book_factory() as book:
            leg = InboundLeg(leg_id, ACCOUNT, None, "0903123456", "0222202999")
            tallies += callers.on_leg_started(book, leg, now)
    now += 20
    for leg_id in (1, 2, 3):
        with book_factory() as book:
            tallies += callers.on_leg_ended(book, leg_id, Outcome.MISSED, now)
    with book_factory() as book:
        assert dict(book.ringing_calls()) == {}
        tallies += callers.settle(book, now + 30)
    with book_factory() as book:
        assert dict(book.waiting_callers()) == {(ACCOUNT, "Main line"): 1}
        tallies += callers.on_outbound_answered(book, ACCOUNT, "+421 903 123 456", now + 600)
    with book_factory() as book:
        assert dict(book.waiting_callers()) == {}
        assert book.calls_of_caller(ACCOUNT, "digest-903123456") == []

    assert tallies == [
        InboundCallSettled(ACCOUNT, "Main line", CallOutcome.MISSED, 20.0, "open"),
        CallbackAttempted(ACCOUNT, AttemptOutcome.ANSWERED),
        MissedCallerResolved(ACCOUNT, "Main line", Resolution.CALLED_BACK, 600.0, 600.0, "open"),
    ]
