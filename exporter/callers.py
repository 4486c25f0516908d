"""The caller level: who called, who was answered, and who still waits for a call back.

Plain Python over a small storage interface (`CallerBook`), like the leg state machine: the leg
machine calls `Callers` inside the transaction of the leg change, with the book of that same
transaction, and records the tallies it returns with its own. docs/design.md, "Callers and
call-backs", gives the rules and why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from itertools import count
from typing import Protocol

from exporter.hours import ALWAYS_OPEN, Calendar
from exporter.legs import (
    AttemptOutcome,
    CallbackAttempted,
    CallerTally,
    CallOutcome,
    CounterRow,
    InboundCallSettled,
    MissedCallerResolved,
    Outcome,
    RepeatMissed,
    Resolution,
    TallyKind,
    TallyLayout,
    TimingRow,
)
from exporter.numbers import DEFAULT_MATCH_DIGITS, Lines, number_key

# A keyed digest of a number's last match_digits digits: the only form a number is kept in.
Digest = Callable[[str], str]
CalendarOf = Callable[[int], Calendar]
NO_LINES = Lines()


@dataclass(frozen=True)
class CallerSettings:
    group_window: float = 10.0  # callers.group_window
    settle: float = 30.0  # callers.settle
    give_up_after: float = 72 * 3600.0  # callbacks.give_up_after
    match_digits: int = DEFAULT_MATCH_DIGITS  # callbacks.match_digits


@dataclass(frozen=True)
class InboundLeg:
    """What the caller level needs of a vpbx inbound leg when it opens."""

    id: int  # the store's id of the leg, which later events name
    account: int
    call_id: str | None
    caller: str | None  # `did`, as the event wrote it; None when withheld
    company_number: str | None  # `did_mcn`
    # False for a leg opened by its answer, miss or end (its start was lost): when it began
    # ringing is unknown, so it gives the call no first ring.
    rang: bool = True


@dataclass
class InboundCall:
    """One caller's call: the legs rung for it, until it settles.

    `caller` is the digest of the caller's number, None when withheld. `opened_at` is when its
    first leg opened (it decides the call's `period`), `first_ring_at` when its first seen start
    came (None without one: no wait is known). `quiet_since` is the latest leg start or end: a
    call with no open leg settles `settle` seconds after it.
    """

    account: int
    line: str
    call_id: str | None
    caller: str | None
    opened_at: float
    first_ring_at: float | None
    quiet_since: float
    open_legs: int = 0
    answered_at: float | None = None
    expired: bool = False  # a leg expired before anyone answered
    id: int | None = None

    @property
    def ringing(self) -> bool:
        return self.open_legs > 0 and self.answered_at is None


@dataclass(frozen=True)
class CallerScope:
    """The caller records one event's change may read or write, as the caller level's rules
    tell them from the event alone: for a store that locks records per caller.

    `call_id`'s call (if any) and the calls and waiting record of `caller` (a digest; None:
    withheld callers, whose calls without a call_id are told apart by line only). With
    `whole_account`, any of the account's records: the event does not tell which caller.
    A store may lock wider than this; a change that reaches a record outside it is taken again
    with the whole account.
    """

    account: int
    call_id: str | None = None
    caller: str | None = None
    whole_account: bool = False


@dataclass
class WaitingCaller:
    """A missed caller nobody has reached yet. One per (account, caller), whatever the line.

    `first_missed_at` is when their first missed call ended (its last leg's end);
    `call_started_at` when that call first rang, which decides its `period`.
    """

    account: int
    caller: str
    line: str
    first_missed_at: float
    call_started_at: float
    id: int | None = None


class CallerBook(Protocol):
    """What the caller level reads and writes, within the transaction of the leg change."""

    def call_by_call_id(self, account: int, call_id: str) -> InboundCall | None:
        """The unsettled call of that call_id."""

    def calls_of_caller(self, account: int, caller: str | None) -> list[InboundCall]:
        """The unsettled calls of that caller digest (None: withheld), oldest first."""

    def call_of_leg(self, leg_id: int) -> InboundCall | None:
        """The unsettled call a leg was added to."""

    def save_call(self, call: InboundCall) -> None:
        """Insert (setting `id`) or update."""

    def add_leg(self, call: InboundCall, leg_id: int) -> None:
        """Remember that the leg belongs to the (saved) call."""

    def delete_call(self, call: InboundCall) -> None:
        """Forget the call and which legs were its."""

    def calls_quiet_before(self, before: float) -> list[InboundCall]:
        """Calls with no open leg and `quiet_since` at or before `before`, oldest first."""

    def waiting_caller(self, account: int, caller: str) -> WaitingCaller | None: ...

    def save_waiting(self, waiting: WaitingCaller) -> None:
        """Insert (setting `id`) or update."""

    def delete_waiting(self, waiting: WaitingCaller) -> None: ...

    def waiting_missed_before(self, before: float) -> list[WaitingCaller]:
        """Waiting callers whose first miss is at or before `before`, oldest first."""

    def ringing_calls(self) -> Mapping[tuple[int, str], int]:
        """Per (account, line): calls with an open leg and no answer."""

    def waiting_callers(self) -> Mapping[tuple[int, str], int]:
        """Per (account, line): callers waiting for a call back."""

    def first_misses(self) -> Mapping[int, float]:
        """Per account with a waiting caller: the earliest `first_missed_at`."""


@dataclass(frozen=True)
class CallerGauges:
    """The caller level's gauges at one instant; waits in open seconds and in wall seconds."""

    ringing: Mapping[tuple[int, str], int]
    waiting: Mapping[tuple[int, str], int]
    oldest_wait_seconds: Mapping[int, float]
    oldest_wait_wall_seconds: Mapping[int, float]


class Callers:
    """Turns leg changes into callers' calls and call-backs, and the tallies they imply.

    Every method takes the book of the transaction that changes the leg and returns the tallies
    to record in it. Numbers are compared by their last `match_digits` digits, through `digest`.
    """

    def __init__(
        self,
        settings: CallerSettings,
        lines: Mapping[int, Lines],
        digest: Digest,
        calendar: CalendarOf = lambda _account: ALWAYS_OPEN,
    ) -> None:
        self._settings = settings
        self._lines = lines
        self._digest = digest
        self._calendar = calendar

    # -- inbound legs --------------------------------------------------------------------------

    def on_leg_started(self, book: CallerBook, leg: InboundLeg, now: float) -> list[CallerTally]:
        """A vpbx inbound leg opened: it joins its caller's call, or begins a new one."""
        caller = self.caller(leg.caller)
        line = self._lines.get(leg.account, NO_LINES).line(leg.company_number)
        tallies: list[CallerTally] = []
        call = self._call_to_join(book, leg, caller, line, now)
        if leg.call_id is not None and call is not None and self._is_over(call, now):
            # A call_id's call already due to settle is over: this leg begins a new call.
            tallies, call = self._settle(book, call), None
        if call is None:
            # The caller's earlier calls with nothing ringing are over: settle them first, so a
            # caller who hangs up and calls again waits, and this call can end their wait.
            tallies.extend(self._settle_calls_of(book, leg.account, caller))
            call = InboundCall(leg.account, line, leg.call_id, caller, now, None, now)
        call.caller = call.caller or caller  # a call_id's first leg may lack the number
        if leg.rang and call.first_ring_at is None:
            call.first_ring_at = now
        call.quiet_since = max(call.quiet_since, now)
        call.open_legs += 1
        book.save_call(call)
        book.add_leg(call, leg.id)
        return tallies

    def on_leg_answered(
        self, book: CallerBook, leg_id: int, answered_at: float
    ) -> list[CallerTally]:
        """A leg was answered: its call is answered, once, at its first answer."""
        call = book.call_of_leg(leg_id)
        if call is None:
            return []  # a leg from before the caller level, or of a call already settled
        return self._answer(book, call, answered_at)

    def on_leg_ended(
        self,
        book: CallerBook,
        leg_id: int,
        outcome: Outcome,
        now: float,
        answered_at: float | None = None,
    ) -> list[CallerTally]:
        """A leg closed with `outcome`. An `answered` leg whose answer was never reported
        answers its call at `answered_at` (the leg machine's estimate), else now."""
        call = book.call_of_leg(leg_id)
        if call is None:
            return []
        tallies: list[CallerTally] = []
        if outcome is Outcome.ANSWERED:
            tallies = self._answer(book, call, now if answered_at is None else answered_at)
        elif outcome is Outcome.EXPIRED and call.answered_at is None:
            call.expired = True
        call.open_legs = max(call.open_legs - 1, 0)
        call.quiet_since = max(call.quiet_since, now)
        book.save_call(call)
        return tallies

    # -- outbound calls ------------------------------------------------------------------------

    def on_outbound_answered(
        self, book: CallerBook, account: int, number: str | None, now: float
    ) -> list[CallerTally]:
        """An outbound leg to `number` was answered: a waiting caller is called back."""
        return self._outbound(book, account, number, now, AttemptOutcome.ANSWERED)

    def on_outbound_unanswered(
        self, book: CallerBook, account: int, number: str | None, now: float
    ) -> list[CallerTally]:
        """An outbound leg to `number` closed unanswered: an attempt; the caller still waits."""
        return self._outbound(book, account, number, now, AttemptOutcome.UNANSWERED)

    # -- time ----------------------------------------------------------------------------------

    def settle(self, book: CallerBook, now: float) -> list[CallerTally]:
        """Settle the calls quiet for `settle` seconds; give up on callers waiting too long."""
        tallies: list[CallerTally] = []
        for call in book.calls_quiet_before(now - self._settings.settle):
            tallies.extend(self._settle(book, call))
        for waiting in book.waiting_missed_before(now - self._settings.give_up_after):
            tallies.append(self._resolve(book, waiting, Resolution.GAVE_UP, now))
        return tallies

    def gauges(self, book: CallerBook, now: float, accounts: Iterable[int] = ()) -> CallerGauges:
        """The gauges now; the oldest waits are 0 for `accounts` with nobody waiting."""
        return caller_gauges(
            book.ringing_calls(),
            book.waiting_callers(),
            book.first_misses(),
            self._calendar,
            now,
            accounts,
        )

    def caller(self, number: str | None) -> str | None:
        """The digest callers are told apart by: of the number's last `match_digits` digits."""
        key = number_key(number, self._settings.match_digits)
        return None if key is None else self._digest(key)

    # -- the rules -----------------------------------------------------------------------------

    def _call_to_join(
        self, book: CallerBook, leg: InboundLeg, caller: str | None, line: str, now: float
    ) -> InboundCall | None:
        """With a call_id, the call of that call_id until it settles. Without, the caller's
        call on the same line while one of its legs is open or within the group window of its
        last leg start or end (a hunt group's next leg can start long after the first)."""
        if leg.call_id is not None:
            return book.call_by_call_id(leg.account, leg.call_id)
        return next(
            (
                call
                for call in book.calls_of_caller(leg.account, caller)
                if call.call_id is None
                and call.line == line
                and (call.open_legs > 0 or now - call.quiet_since <= self._settings.group_window)
            ),
            None,
        )

    def _is_over(self, call: InboundCall, now: float) -> bool:
        """Due to settle: nothing open, and quiet for `settle` seconds."""
        return not call.open_legs and now - call.quiet_since >= self._settings.settle

    def _settle_calls_of(
        self, book: CallerBook, account: int, caller: str | None
    ) -> list[CallerTally]:
        """Settle a known caller's calls that have no open leg, whatever their age."""
        if caller is None:
            return []  # withheld callers are not told apart: their calls settle on time
        tallies: list[CallerTally] = []
        for call in book.calls_of_caller(account, caller):
            if call.open_legs == 0:
                tallies.extend(self._settle(book, call))
        return tallies

    def _answer(self, book: CallerBook, call: InboundCall, answered_at: float) -> list[CallerTally]:
        if call.answered_at is not None:
            return []
        call.answered_at = answered_at
        book.save_call(call)
        tallies: list[CallerTally] = [
            self._counted(call, CallOutcome.ANSWERED, _wait(call, answered_at))
        ]
        waiting = None if call.caller is None else book.waiting_caller(call.account, call.caller)
        if waiting is not None:
            tallies.append(self._resolve(book, waiting, Resolution.CALLED_AGAIN, answered_at))
        return tallies

    def _settle(self, book: CallerBook, call: InboundCall) -> list[CallerTally]:
        """A call with no open leg is over: counted now unless it was answered already."""
        book.delete_call(call)
        if call.answered_at is not None:
            return []
        if call.expired:
            return [self._counted(call, CallOutcome.EXPIRED, None)]
        ended_at = call.quiet_since  # its last leg's end: nothing started after it
        tallies: list[CallerTally] = [
            self._counted(call, CallOutcome.MISSED, _wait(call, ended_at))
        ]
        if call.caller is None:
            return tallies  # a withheld number cannot be called back
        waiting = book.waiting_caller(call.account, call.caller)
        if waiting is not None:
            tallies.append(RepeatMissed(call.account, call.line))
        else:
            book.save_waiting(
                WaitingCaller(call.account, call.caller, call.line, ended_at, call.opened_at)
            )
        return tallies

    def _counted(
        self, call: InboundCall, outcome: CallOutcome, wait: float | None
    ) -> InboundCallSettled:
        period = self._calendar(call.account).period(call.opened_at)
        return InboundCallSettled(call.account, call.line, outcome, wait, period)

    def _outbound(
        self,
        book: CallerBook,
        account: int,
        number: str | None,
        now: float,
        outcome: AttemptOutcome,
    ) -> list[CallerTally]:
        callee = self.caller(number)
        if callee is None:
            return []
        # A call back can come before the missed call settled: settle it first.
        tallies = self._settle_calls_of(book, account, callee)
        waiting = book.waiting_caller(account, callee)
        if waiting is None:
            return tallies
        tallies.append(CallbackAttempted(account, outcome))
        if outcome is AttemptOutcome.ANSWERED:
            tallies.append(self._resolve(book, waiting, Resolution.CALLED_BACK, now))
        return tallies

    def _resolve(
        self, book: CallerBook, waiting: WaitingCaller, resolution: Resolution, now: float
    ) -> MissedCallerResolved:
        book.delete_waiting(waiting)
        calendar = self._calendar(waiting.account)
        period = calendar.period(waiting.call_started_at)
        if resolution is Resolution.GAVE_UP:
            return MissedCallerResolved(
                waiting.account, waiting.line, resolution, None, None, period
            )
        return MissedCallerResolved(
            waiting.account,
            waiting.line,
            resolution,
            calendar.open_seconds(waiting.first_missed_at, now),
            max(now - waiting.first_missed_at, 0.0),
            period,
        )


def caller_gauges(
    ringing: Mapping[tuple[int, str], int],
    waiting: Mapping[tuple[int, str], int],
    first_misses: Mapping[int, float],
    calendar: CalendarOf,
    now: float,
    accounts: Iterable[int] = (),
) -> CallerGauges:
    """The gauges from a book's aggregates (read at scrape time, in one consistent view)."""
    oldest: dict[int, float] = dict.fromkeys(accounts, 0.0)
    oldest_wall = dict(oldest)
    for account, first_miss in first_misses.items():
        # The caller who waits longest in wall time also does in open time.
        oldest[account] = calendar(account).open_seconds(first_miss, now)
        oldest_wall[account] = max(now - first_miss, 0.0)
    return CallerGauges(ringing, waiting, oldest, oldest_wall)


def _wait(call: InboundCall, until: float) -> float | None:
    """First ring to `until`; None when no leg of the call was seen to start ringing."""
    if call.first_ring_at is None:
        return None
    return max(until - call.first_ring_at, 0.0)


def caller_zero_rows(
    layout: TallyLayout, lines: Mapping[int, Lines]
) -> list[CounterRow | TimingRow]:
    """The caller series of configured accounts and their lines, so they start at 0.

    `lines` holds every configured account (one without `lines` maps to `Lines()`), each line
    with its "" and `other` values too.
    """
    periods = (("open",), ("closed",)) if layout.caller_period else ((),)
    rows: list[CounterRow | TimingRow] = []
    for account, account_lines in lines.items():
        key = str(account)
        for resolution in (Resolution.CALLED_BACK, Resolution.CALLED_AGAIN):
            rows.append(TimingRow(TallyKind.CALLBACK, (key, resolution.value), math.inf, 0))
        rows.extend(CounterRow(TallyKind.CALLBACK_ATTEMPTS, (key, o.value)) for o in AttemptOutcome)
        for line in account_lines.label_values():
            rows.append(CounterRow(TallyKind.REPEAT_MISSED, (key, line)))
            for period in periods:
                for outcome in CallOutcome:
                    labels = (key, line, outcome.value, *period)
                    rows.append(CounterRow(TallyKind.INBOUND_CALLS, labels))
                    rows.append(TimingRow(TallyKind.INBOUND_WAIT, labels, math.inf, 0))
                rows.extend(
                    CounterRow(TallyKind.CALLERS_RESOLVED, (key, line, resolution.value, *period))
                    for resolution in Resolution
                )
    return rows


@dataclass
class MemoryCallerBook:
    """The reference `CallerBook`, in memory: the contract the store's books follow.

    Records are copied in and out, as a database would, so a change counts only once saved.
    """

    calls: dict[int, InboundCall] = field(default_factory=dict)
    legs: dict[int, int] = field(default_factory=dict)  # leg id -> call id
    waiting: dict[int, WaitingCaller] = field(default_factory=dict)
    _ids: count[int] = field(default_factory=lambda: count(1))

    def call_by_call_id(self, account: int, call_id: str) -> InboundCall | None:
        return next(
            (c for c in self._calls() if c.account == account and c.call_id == call_id), None
        )

    def calls_of_caller(self, account: int, caller: str | None) -> list[InboundCall]:
        return [c for c in self._calls() if c.account == account and c.caller == caller]

    def call_of_leg(self, leg_id: int) -> InboundCall | None:
        call_id = self.legs.get(leg_id)
        return None if call_id is None else replace(self.calls[call_id])

    def save_call(self, call: InboundCall) -> None:
        if call.id is None:
            call.id = next(self._ids)
        self.calls[call.id] = replace(call)

    def add_leg(self, call: InboundCall, leg_id: int) -> None:
        assert call.id is not None, "a call is saved before its legs are added"
        self.legs[leg_id] = call.id

    def delete_call(self, call: InboundCall) -> None:
        self.calls.pop(call.id or 0, None)
        self.legs = {leg: owner for leg, owner in self.legs.items() if owner != call.id}

    def calls_quiet_before(self, before: float) -> list[InboundCall]:
        return [c for c in self._calls() if c.open_legs == 0 and c.quiet_since <= before]

    def waiting_caller(self, account: int, caller: str) -> WaitingCaller | None:
        return next(
            (w for w in self._waiting() if w.account == account and w.caller == caller), None
        )

    def save_waiting(self, waiting: WaitingCaller) -> None:
        if waiting.id is None:
            waiting.id = next(self._ids)
        self.waiting[waiting.id] = replace(waiting)

    def delete_waiting(self, waiting: WaitingCaller) -> None:
        self.waiting.pop(waiting.id or 0, None)

    def waiting_missed_before(self, before: float) -> list[WaitingCaller]:
        return [w for w in self._waiting() if w.first_missed_at <= before]

    def ringing_calls(self) -> Mapping[tuple[int, str], int]:
        totals: dict[tuple[int, str], int] = {}
        for call in self.calls.values():
            if call.ringing:
                totals[call.account, call.line] = totals.get((call.account, call.line), 0) + 1
        return totals

    def waiting_callers(self) -> Mapping[tuple[int, str], int]:
        totals: dict[tuple[int, str], int] = {}
        for waiting in self.waiting.values():
            key = (waiting.account, waiting.line)
            totals[key] = totals.get(key, 0) + 1
        return totals

    def first_misses(self) -> Mapping[int, float]:
        earliest: dict[int, float] = {}
        for waiting in self.waiting.values():
            earliest[waiting.account] = min(
                waiting.first_missed_at, earliest.get(waiting.account, waiting.first_missed_at)
            )
        return earliest

    def _calls(self) -> list[InboundCall]:
        ordered = sorted(self.calls.values(), key=lambda c: (c.opened_at, c.id or 0))
        return [replace(call) for call in ordered]

    def _waiting(self) -> list[WaitingCaller]:
        ordered = sorted(self.waiting.values(), key=lambda w: (w.first_missed_at, w.id or 0))
        return [replace(waiting) for waiting in ordered]
