"""The caller level over its reference book: callers' calls, missed callers and call-backs."""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from datetime import UTC, datetime
from itertools import count
from pathlib import Path

import pytest

from exporter.callers import (
    CallerGauges,
    Callers,
    CallerSettings,
    InboundLeg,
    MemoryCallerBook,
    caller_zero_rows,
)
from exporter.hours import ALWAYS_OPEN, Calendar, parse_hours
from exporter.legs import (
    CALLBACK_BUCKETS,
    CallbackAttempted,
    CounterRow,
    InboundCallSettled,
    MissedCallerResolved,
    Outcome,
    RepeatMissed,
    Resolution,
    Tally,
    TallyKind,
    TallyLayout,
    TimingRow,
)
from exporter.numbers import Lines, number_key
from exporter.store import SqliteCallStore

ACCOUNT = 1
CALLER = "0903123456"
MAIN = "0222202999"
RING_BUCKETS = (1.0, 5.0, 10.0, 20.0, 30.0, 60.0)
DEFAULTS = CallerSettings()
MONDAY = datetime(2026, 11, 23, 10, 0, tzinfo=UTC).timestamp()


def digest(key: str) -> str:
    return hmac.new(b"test key", key.encode(), hashlib.sha256).hexdigest()[:16]


class Exchange:
    """Drives the caller level as the leg machine would, on a hand-moved clock."""

    def __init__(
        self, settings: CallerSettings = DEFAULTS, calendar: Calendar = ALWAYS_OPEN
    ) -> None:
        lines = {ACCOUNT: Lines.from_config({MAIN: "Main line", "0850123456": "Sales"})}
        self.callers = Callers(settings, lines, digest, lambda _account: calendar)
        self.book = MemoryCallerBook()
        self.layout = TallyLayout(RING_BUCKETS, (60.0,), caller_period=True)
        self.now = MONDAY
        self.tallies: list[Tally] = []
        self._leg_ids = count(1)

    def ring(
        self,
        caller: str | None = CALLER,
        line: str | None = MAIN,
        call_id: str | None = None,
        account: int = ACCOUNT,
        rang: bool = True,
    ) -> int:
        leg = InboundLeg(next(self._leg_ids), account, call_id, caller, line, rang)
        self.tallies += self.callers.on_leg_started(self.book, leg, self.now)
        return leg.id

    def answer(self, leg: int) -> None:
        self.tallies += self.callers.on_leg_answered(self.book, leg, self.now)

    def end(self, leg: int, outcome: Outcome) -> None:
        self.tallies += self.callers.on_leg_ended(self.book, leg, outcome, self.now)

    def call_out(self, number: str | None, answered: bool, account: int = ACCOUNT) -> None:
        if answered:
            self.tallies += self.callers.on_outbound_answered(self.book, account, number, self.now)
        else:
            self.tallies += self.callers.on_outbound_unanswered(
                self.book, account, number, self.now
            )

    def after(self, seconds: float) -> None:
        """Time passes; an event or a scrape then settles what is due."""
        self.now += seconds
        self.tallies += self.callers.settle(self.book, self.now)

    def rows(self) -> list[CounterRow | TimingRow]:
        return [row for tally in self.tallies for row in self.layout.rows(tally)]

    def counted(self, kind: TallyKind) -> Counter[tuple[str, ...]]:
        return Counter(row.labels for row in self.rows() if row.kind is kind)

    def observed(self, kind: TallyKind) -> list[tuple[tuple[str, ...], float]]:
        return [
            (row.labels, row.seconds)
            for row in self.rows()
            if isinstance(row, TimingRow) and row.kind is kind
        ]

    def calls(self, outcome: str, line: str = "Main line") -> int:
        return self.counted(TallyKind.INBOUND_CALLS)[str(ACCOUNT), line, outcome, "open"]

    def resolved(self, resolution: str, line: str = "Main line") -> int:
        return self.counted(TallyKind.CALLERS_RESOLVED)[str(ACCOUNT), line, resolution, "open"]

    def gauges(self) -> CallerGauges:
        return self.callers.gauges(self.book, self.now, [ACCOUNT])

    def waiting(self, line: str = "Main line") -> int:
        return self.gauges().waiting.get((ACCOUNT, line), 0)

    def ringing(self, line: str = "Main line") -> int:
        return self.gauges().ringing.get((ACCOUNT, line), 0)


def missed_call(exchange: Exchange, caller: str | None = CALLER) -> None:
    leg = exchange.ring(caller)
    exchange.after(20)
    exchange.end(leg, Outcome.MISSED)
    exchange.after(30)


# -- inbound calls -----------------------------------------------------------------------------


def test_a_ring_group_nobody_answers_is_one_missed_caller() -> None:
    exchange = Exchange()
    legs = [exchange.ring() for _ in range(3)]
    assert exchange.ringing() == 1
    exchange.after(20)
    for leg in legs:
        exchange.end(leg, Outcome.MISSED)
    exchange.after(29)
    assert exchange.calls("missed") == 0, "settles only after callers.settle of quiet"
    exchange.after(1)
    assert exchange.calls("missed") == 1
    assert exchange.observed(TallyKind.INBOUND_WAIT) == [
        ((str(ACCOUNT), "Main line", "missed", "open"), 20.0)
    ]
    assert exchange.ringing() == 0
    assert exchange.waiting() == 1
    # The caller level adds its own tallies and no leg tally: the legs count as they did.
    assert all(
        isinstance(t, InboundCallSettled | MissedCallerResolved | RepeatMissed | CallbackAttempted)
        for t in exchange.tallies
    )


def test_a_ring_group_answered_by_one_phone_is_one_answered_caller() -> None:
    exchange = Exchange()
    legs = {abon: exchange.ring() for abon in ("201", "202", "203")}
    exchange.after(8)
    exchange.answer(legs["202"])
    assert exchange.calls("answered") == 1, "answered as soon as a leg is"
    assert exchange.ringing() == 0
    exchange.end(legs["201"], Outcome.CANCELLED)
    exchange.end(legs["203"], Outcome.CANCELLED)
    exchange.after(60)
    exchange.end(legs["202"], Outcome.ANSWERED)
    exchange.after(3600)
    assert exchange.counted(TallyKind.INBOUND_CALLS) == Counter(
        {(str(ACCOUNT), "Main line", "answered", "open"): 1}
    )
    assert exchange.observed(TallyKind.INBOUND_WAIT) == [
        ((str(ACCOUNT), "Main line", "answered", "open"), 8.0)
    ]
    assert exchange.waiting() == 0
    assert exchange.book.calls == {}
    assert exchange.book.legs == {}


def test_a_caller_who_hangs_up_on_one_ringing_phone_is_a_missed_caller() -> None:
    exchange = Exchange()
    leg = exchange.ring()
    exchange.after(12)
    exchange.end(leg, Outcome.CANCELLED)  # onCloseIncomingNotice: the caller gave up
    exchange.after(30)
    assert exchange.calls("missed") == 1
    assert exchange.observed(TallyKind.INBOUND_WAIT)[0][1] == 12.0
    assert exchange.waiting() == 1


@pytest.mark.parametrize("call_id", [None, "call-1"])
def test_a_hunt_group_is_one_caller_whose_wait_spans_both_rings(call_id: str | None) -> None:
    exchange = Exchange()
    first = exchange.ring(call_id=call_id)  # 201
    exchange.after(20)
    exchange.end(first, Outcome.MISSED)
    exchange.after(5)
    second = exchange.ring(call_id=call_id)  # 202, 25 s after 201 began ringing
    exchange.after(6)
    exchange.answer(second)
    exchange.after(120)
    exchange.end(second, Outcome.ANSWERED)
    exchange.after(60)
    assert exchange.counted(TallyKind.INBOUND_CALLS) == Counter(
        {(str(ACCOUNT), "Main line", "answered", "open"): 1}
    )
    assert exchange.observed(TallyKind.INBOUND_WAIT)[0][1] == 31.0
    assert exchange.waiting() == 0


def test_without_call_id_legs_after_the_group_window_are_another_call() -> None:
    exchange = Exchange()
    first = exchange.ring()
    exchange.after(5)
    exchange.end(first, Outcome.CANCELLED)
    exchange.after(11)  # past callers.group_window since the last leg's end
    second = exchange.ring()
    exchange.answer(second)
    # The first call settled when its caller called again, so the answer reached them.
    assert exchange.calls("missed") == 1
    assert exchange.calls("answered") == 1
    assert exchange.resolved("called_again") == 1
    assert exchange.waiting() == 0


def test_a_call_id_ringing_again_after_its_call_is_due_to_settle_begins_a_new_call() -> None:
    exchange = Exchange()
    first = exchange.ring(call_id="call-1")
    exchange.after(20)
    exchange.end(first, Outcome.MISSED)
    exchange.now += DEFAULTS.settle  # due to settle, but no event or scrape settled it yet
    second = exchange.ring(call_id="call-1")
    assert exchange.calls("missed") == 1  # settled by the new leg, not revived by it
    exchange.answer(second)
    assert exchange.calls("answered") == 1
    assert exchange.resolved("called_again") == 1
    assert exchange.waiting() == 0


def test_two_callers_ringing_at_once_are_two_calls() -> None:
    exchange = Exchange()
    exchange.ring(caller="0903111111")
    exchange.ring(caller="0903222222")
    assert exchange.ringing() == 2


def test_a_leg_expired_unanswered_makes_an_expired_call_with_no_wait() -> None:
    exchange = Exchange()
    leg = exchange.ring()
    exchange.after(4 * 3600)
    exchange.end(leg, Outcome.EXPIRED)
    exchange.after(30)
    assert exchange.calls("expired") == 1
    assert exchange.observed(TallyKind.INBOUND_WAIT) == []
    assert exchange.waiting() == 0


def test_an_answer_only_seen_at_the_end_answers_the_call_at_that_time() -> None:
    exchange = Exchange()
    leg = exchange.ring()
    exchange.after(60)
    exchange.tallies += exchange.callers.on_leg_ended(
        exchange.book, leg, Outcome.ANSWERED, exchange.now, answered_at=exchange.now - 50
    )
    assert exchange.observed(TallyKind.INBOUND_WAIT)[0][1] == 10.0


def test_a_call_whose_start_was_lost_is_counted_with_no_wait() -> None:
    exchange = Exchange()
    leg = exchange.ring(rang=False)  # opened by its miss, the start lost
    exchange.end(leg, Outcome.MISSED)
    exchange.after(30)
    assert exchange.calls("missed") == 1
    assert exchange.observed(TallyKind.INBOUND_WAIT) == []
    assert exchange.waiting() == 1


def test_a_seen_start_gives_the_first_ring_even_after_an_unmatched_leg() -> None:
    exchange = Exchange()
    exchange.ring(rang=False)
    exchange.after(2)
    leg = exchange.ring()
    exchange.after(7)
    exchange.answer(leg)
    assert exchange.observed(TallyKind.INBOUND_WAIT)[0][1] == 7.0


def test_legs_the_caller_level_never_saw_change_nothing() -> None:
    exchange = Exchange()
    exchange.answer(999)
    exchange.end(999, Outcome.MISSED)
    assert exchange.tallies == []


# -- missed callers and call-backs -------------------------------------------------------------


def test_a_missed_caller_called_back_from_another_extension() -> None:
    exchange = Exchange()
    missed_call(exchange)  # missed 30 s ago
    assert exchange.waiting() == 1
    exchange.after(570)
    exchange.call_out("+421 903 123 456", answered=True)
    assert exchange.waiting() == 0
    assert exchange.resolved("called_back") == 1
    assert exchange.observed(TallyKind.CALLBACK) == [((str(ACCOUNT), "called_back"), 600.0)]
    assert exchange.counted(TallyKind.CALLBACK_ATTEMPTS) == Counter({(str(ACCOUNT), "answered"): 1})
    assert exchange.book.waiting == {}, "the digest is deleted once the caller stops waiting"


def test_a_call_back_before_the_missed_call_settled_still_counts() -> None:
    exchange = Exchange()
    leg = exchange.ring()
    exchange.after(20)
    exchange.end(leg, Outcome.MISSED)
    exchange.after(10)
    exchange.call_out("421903123456", answered=True)
    assert exchange.calls("missed") == 1
    assert exchange.resolved("called_back") == 1
    assert exchange.observed(TallyKind.CALLBACK)[0][1] == 10.0
    exchange.after(3600)
    assert exchange.waiting() == 0


def test_a_missed_caller_who_calls_again_and_is_answered() -> None:
    exchange = Exchange()
    missed_call(exchange)
    exchange.after(270)
    leg = exchange.ring(caller="+421903123456")
    exchange.after(4)
    exchange.answer(leg)
    assert exchange.resolved("called_again") == 1
    assert exchange.observed(TallyKind.CALLBACK) == [((str(ACCOUNT), "called_again"), 304.0)]
    assert exchange.waiting() == 0
    assert exchange.counted(TallyKind.CALLBACK_ATTEMPTS) == Counter()


def test_a_caller_missed_twice_and_never_reached_gives_up() -> None:
    exchange = Exchange()
    missed_call(exchange)
    first_miss = exchange.now - 30
    exchange.after(3600)
    missed_call(exchange, caller="421 903 123 456")
    assert exchange.waiting() == 1
    assert exchange.counted(TallyKind.REPEAT_MISSED) == Counter({(str(ACCOUNT), "Main line"): 1})
    assert exchange.calls("missed") == 2
    assert exchange.gauges().oldest_wait_seconds[ACCOUNT] == exchange.now - first_miss
    exchange.call_out(CALLER, answered=False)
    assert exchange.counted(TallyKind.CALLBACK_ATTEMPTS) == Counter(
        {(str(ACCOUNT), "unanswered"): 1}
    )
    assert exchange.waiting() == 1
    exchange.after(first_miss + 72 * 3600 - exchange.now - 1)
    assert exchange.resolved("gave_up") == 0
    exchange.after(1)
    assert exchange.resolved("gave_up") == 1
    assert exchange.waiting() == 0
    assert exchange.gauges().oldest_wait_seconds == {ACCOUNT: 0.0}
    assert exchange.observed(TallyKind.CALLBACK) == []


def test_withheld_numbers_do_not_wait() -> None:
    exchange = Exchange()
    missed_call(exchange, caller=None)
    missed_call(exchange, caller="anonymous")  # no digits: withheld too
    assert exchange.calls("missed") == 2
    assert exchange.waiting() == 0
    exchange.call_out(None, answered=True)
    assert exchange.counted(TallyKind.CALLBACK_ATTEMPTS) == Counter()


def test_a_call_back_from_another_account_does_not_reach_the_caller() -> None:
    exchange = Exchange()
    missed_call(exchange)
    exchange.call_out(CALLER, answered=True, account=2)
    assert exchange.waiting() == 1
    assert exchange.resolved("called_back") == 0


def test_an_outbound_call_to_someone_not_waiting_is_no_call_back_attempt() -> None:
    exchange = Exchange()
    exchange.call_out("0903999999", answered=True)
    exchange.call_out("0903999999", answered=False)
    assert exchange.tallies == []


# -- lines and numbers -------------------------------------------------------------------------


def test_lines_are_named_by_configuration_never_by_number() -> None:
    exchange = Exchange()
    for caller, line in (
        ("0903000001", "+421 850 123 456"),
        ("0903000002", None),
        ("0903000003", "0233333333"),
    ):
        leg = exchange.ring(caller=caller, line=line)
        exchange.after(1)
        exchange.end(leg, Outcome.MISSED)
    exchange.after(30)
    assert exchange.counted(TallyKind.INBOUND_CALLS) == Counter(
        {
            (str(ACCOUNT), "Sales", "missed", "open"): 1,
            (str(ACCOUNT), "", "missed", "open"): 1,
            (str(ACCOUNT), "other", "missed", "open"): 1,
        }
    )
    assert exchange.gauges().waiting == {
        (ACCOUNT, "Sales"): 1,
        (ACCOUNT, ""): 1,
        (ACCOUNT, "other"): 1,
    }


def test_one_caller_on_two_lines_at_once_is_two_calls() -> None:
    exchange = Exchange()
    exchange.ring(line=MAIN)
    exchange.ring(line="0850123456")
    assert exchange.ringing("Main line") == 1
    assert exchange.ringing("Sales") == 1


@pytest.mark.parametrize("spelling", ["0222202999", "421222202999", "+421 2 2220 2999"])
def test_numbers_match_by_their_last_digits(spelling: str) -> None:
    assert number_key(spelling) == "222202999"
    assert Lines.from_config({"0222202999": "Main line"}).line(spelling) == "Main line"


def test_numbers_match_by_the_configured_number_of_digits() -> None:
    assert number_key("+421 2 2220 2999", 6) == "202999"
    assert number_key("+421 2 2220 2999", 20) == "421222202999"
    assert number_key("") is None
    assert number_key(None) is None
    lines = Lines.from_config({"0222202999": "Main line", "0850123456": "Sales"})
    assert lines.label_values() == ("", "Main line", "Sales", "other")


# -- opening hours -----------------------------------------------------------------------------


def test_calls_carry_their_period_and_call_backs_count_open_time() -> None:
    calendar = parse_hours({"timezone": "UTC", "open": {"mon-fri": "08:00-17:00"}})
    exchange = Exchange(calendar=calendar)
    exchange.now = datetime(2026, 11, 27, 16, 54, 30, tzinfo=UTC).timestamp()  # a Friday
    leg = exchange.ring()
    exchange.after(30)
    exchange.end(leg, Outcome.MISSED)  # missed at 16:55:00
    exchange.after(30)
    monday = datetime(2026, 11, 30, 8, 10, tzinfo=UTC).timestamp()
    exchange.after(monday - exchange.now)
    assert exchange.gauges().oldest_wait_seconds[ACCOUNT] == 900.0
    assert exchange.gauges().oldest_wait_wall_seconds[ACCOUNT] == monday - (
        datetime(2026, 11, 27, 16, 55, tzinfo=UTC).timestamp()
    )
    exchange.call_out(CALLER, answered=True)
    assert exchange.observed(TallyKind.CALLBACK) == [((str(ACCOUNT), "called_back"), 900.0)]
    assert exchange.resolved("called_back") == 1  # the missed call rang while open
    night = exchange.ring(caller="0903777777")  # Monday 08:10 is open; now one at night
    exchange.end(night, Outcome.CANCELLED)
    exchange.now = datetime(2026, 11, 30, 22, 0, tzinfo=UTC).timestamp()
    late = exchange.ring(caller="0903888888")
    exchange.after(10)
    exchange.end(late, Outcome.MISSED)
    exchange.after(30)
    rows = exchange.counted(TallyKind.INBOUND_CALLS)
    assert rows[str(ACCOUNT), "Main line", "missed", "closed"] == 1
    assert rows[str(ACCOUNT), "Main line", "missed", "open"] == 2


def test_the_layout_leaves_the_period_out_unless_asked() -> None:
    layout = TallyLayout(RING_BUCKETS, (60.0,))
    tally = MissedCallerResolved(ACCOUNT, "Sales", Resolution.CALLED_BACK, 400.0, 400.0, "closed")
    assert layout.rows(tally) == [
        CounterRow(TallyKind.CALLERS_RESOLVED, ("1", "Sales", "called_back")),
        TimingRow(TallyKind.CALLBACK, ("1", "called_back"), CALLBACK_BUCKETS[1], 400.0),
    ]


@pytest.mark.parametrize("caller_period", [False, True])
def test_configured_accounts_and_lines_start_at_zero(caller_period: bool) -> None:
    layout = TallyLayout(RING_BUCKETS, (60.0,), caller_period=caller_period)
    lines = {1: Lines.from_config({MAIN: "Main line"}), 2: Lines()}
    rows = caller_zero_rows(layout, lines)
    for row in rows:
        assert len(row.labels) == len(layout.label_names(row.kind))
    series = {(row.kind, row.labels) for row in rows}
    periods = ("open", "closed") if caller_period else ("",)
    for period in periods:
        tail = (period,) if period else ()
        assert (TallyKind.INBOUND_CALLS, ("1", "Main line", "missed", *tail)) in series
        assert (TallyKind.INBOUND_WAIT, ("2", "other", "answered", *tail)) in series
        assert (TallyKind.CALLERS_RESOLVED, ("1", "", "gave_up", *tail)) in series
    assert (TallyKind.REPEAT_MISSED, ("2", "")) in series
    assert (TallyKind.CALLBACK, ("1", "called_again")) in series
    assert (TallyKind.CALLBACK_ATTEMPTS, ("2", "unanswered")) in series
    # 2 accounts; lines "", other (+ Main line for account 1): 5 lines in all.
    per_line = 1 + len(periods) * (2 * 3 + 3)
    assert len(rows) == 2 * (2 + 2) + 5 * per_line


def test_the_store_keeps_caller_tallies_with_the_leg_totals(tmp_path: Path) -> None:
    exchange = Exchange()
    missed_call(exchange)
    exchange.after(600)
    exchange.call_out(CALLER, answered=True)
    store = SqliteCallStore(tmp_path / "calls.sqlite3", exchange.layout)
    try:
        with store.transaction() as tx:
            tx.record(exchange.tallies)
        snapshot = store.snapshot()
    finally:
        store.close()
    counters = snapshot.counters
    assert counters[TallyKind.INBOUND_CALLS] == {("1", "Main line", "missed", "open"): 1}
    assert counters[TallyKind.CALLERS_RESOLVED] == {("1", "Main line", "called_back", "open"): 1}
    assert counters[TallyKind.CALLBACK_ATTEMPTS] == {("1", "answered"): 1}
    [callback] = snapshot.timings[TallyKind.CALLBACK]
    assert callback.labels == ("1", "called_back")
    assert callback.buckets == {900.0: 1}
    assert callback.total == 630.0
