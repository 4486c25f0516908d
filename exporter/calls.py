"""The call-leg state machine (docs/design.md, "Legs").

Plain Python: the store and the clock are handed in, and the store is asked for legs by a
`LegQuery` the rules here build.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from exporter.callers import CalendarOf, Callers, CallerScope, CallerSettings, InboundLeg
from exporter.events import CallEvent, Direction, Service, Step
from exporter.hours import ALWAYS_OPEN, Calendar
from exporter.legs import (
    OTHER_EXTENSION,
    CallerTally,
    EventTaken,
    EventUnmatched,
    ExtensionOverflowed,
    Leg,
    LegEnded,
    LegLabels,
    LegStarted,
    Outcome,
    Tally,
)
from exporter.numbers import Lines
from exporter.store import CallStore, LegQuery, StoreTransaction
from exporter.store.base import StoreRetry

Clock = Callable[[], float]
CLOSED_LEG_RETENTION = 24 * 3600.0  # how long a leg with a call_id absorbs late copies
CLEANUP_INTERVAL = 60.0
SETTLE_INTERVAL = 1.0  # how often events sweep for callers' calls that are over


class Disposition(StrEnum):
    """What an event did."""

    OPENED = "opened"
    ANSWERED = "answered"
    CLOSED = "closed"
    STARTED_LATE = "started_late"  # the start of a leg whose answer or end came first
    DUPLICATE = "duplicate"  # a copy of an event already taken, or one for a leg already closed
    UNMATCHED = "unmatched"  # no leg for it: counted, and its outcome still counted
    IGNORED = "ignored"  # an event type we do not know


def _always_open(_account: int) -> Calendar:
    return ALWAYS_OPEN


@dataclass(frozen=True)
class TrackerSettings:
    max_duration: float = 4 * 3600.0
    duplicate_window: float = 60.0
    max_extensions: int = 1000
    # The caller level (docs/design.md, "Callers and call-backs"): its rules, each account's
    # lines (an account not in `lines` has none) and opening hours.
    callers: CallerSettings = field(default_factory=CallerSettings)
    lines: Mapping[int, Lines] = field(default_factory=dict)
    calendar: CalendarOf = _always_open


class CallTracker:
    """Turns call events into leg changes and the tallies they imply, one transaction each."""

    def __init__(
        self, store: CallStore, settings: TrackerSettings, clock: Clock = time.time
    ) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self._last_cleanup = 0.0
        self._last_settle = -SETTLE_INTERVAL

    def on_event(self, event: CallEvent) -> Disposition:
        try:
            return self._on_event(event)
        except StoreRetry:
            return self._on_event(event)  # undone: nothing of it counted

    def _on_event(self, event: CallEvent) -> Disposition:
        with self._store.transaction() as tx:
            now = self._clock()  # read under the write lock, so events are dated in order
            tx.touch(event.account, event.service, now)
            taken = EventTaken(event.service, event.event_type)
            if event.kind is None:
                tx.record([taken])
                return Disposition.IGNORED
            callers = _CallerLevel(tx, self._settings, now)
            self._settle_now_and_then(callers, now)
            disposition, tallies = self._apply(tx, callers, event, event.kind.step, now)
            tx.record([taken, *tallies, *callers.tallies])
            self._forget_old_legs(tx, now)
        return disposition

    def expire_stale(self) -> int:
        """Close legs open longer than calls.max_duration as `expired`, and settle the callers'
        calls that are over; returns how many legs expired."""
        with self._store.transaction() as tx:
            now = self._clock()
            callers = _CallerLevel(tx, self._settings, now)
            stale = tx.open_legs_before(now - self._settings.max_duration)
            tallies: list[Tally] = [
                self._close(tx, callers, leg, Outcome.EXPIRED, now) for leg in stale
            ]
            callers.settle()
            tx.record([*tallies, *callers.tallies])
            self._forget_old_legs(tx, now)
        return len(stale)

    def _settle_now_and_then(self, callers: _CallerLevel, now: float) -> None:
        """Settle the callers' calls that are over, at most once a SETTLE_INTERVAL on events.

        Only for promptness: a new leg never joins a call quiet for longer than the group
        window, nor a call_id's call due to settle, and every scrape settles first. Each sweep
        is two queries, which every event would otherwise pay for.
        """
        if now - self._last_settle >= SETTLE_INTERVAL:
            callers.settle()
            self._last_settle = now

    def _forget_old_legs(self, tx: StoreTransaction, now: float) -> None:
        """Closed legs are kept only as long as they can still absorb a late copy."""
        if now - self._last_cleanup >= CLEANUP_INTERVAL:
            tx.forget_closed_legs(
                with_call_id_before=now - CLOSED_LEG_RETENTION,
                without_call_id_before=now - self._settings.duplicate_window,
            )
            self._last_cleanup = now

    # -- one event -----------------------------------------------------------------------------

    def _apply(
        self, tx: StoreTransaction, callers: _CallerLevel, event: CallEvent, step: Step, now: float
    ) -> tuple[Disposition, list[Tally]]:
        candidates = tx.legs_matching(self._legs_of(event, now, callers.scope(event, step)))
        expired = self._expire_overdue(tx, callers, candidates, now)
        if step is Step.START:
            disposition, tallies = self._start(tx, callers, event, candidates, now)
        else:
            disposition, tallies = self._act_on_leg(tx, callers, event, step, candidates, now)
        return disposition, [*expired, *tallies]

    def _legs_of(self, event: CallEvent, now: float, callers: CallerScope | None) -> LegQuery:
        """The legs an event may belong to (docs/design.md, Leg identity).

        With a call_id, that call's leg at the abon. Without, the legs of the extension still
        able to take an event, of the same caller or an unknown one: either side may lack the
        number (close notices often carry no did).
        """
        assert event.kind is not None
        return LegQuery(
            account=event.account,
            service=event.service,
            direction=event.kind.direction,
            abon=event.abon,
            call_id=event.call_id,
            party=event.did,
            closed_since=now - self._settings.duplicate_window,
            callers=callers,
        )

    def _expire_overdue(
        self, tx: StoreTransaction, callers: _CallerLevel, candidates: list[Leg], now: float
    ) -> list[Tally]:
        """Expire the event's legs that outlived calls.max_duration, as a scrape would have.

        Without this an end arriving after a long gap with no scrape (Prometheus down, or
        just restarted) would close its leg as answered with hours of talk time.
        """
        cutoff = now - self._settings.max_duration
        return [
            self._close(tx, callers, leg, Outcome.EXPIRED, now)
            for leg in candidates
            if leg.is_open and leg.opened_at < cutoff
        ]

    def _act_on_leg(
        self,
        tx: StoreTransaction,
        callers: _CallerLevel,
        event: CallEvent,
        step: Step,
        candidates: list[Leg],
        now: float,
    ) -> tuple[Disposition, list[Tally]]:
        leg = _target(step, candidates)
        if leg is None:
            if candidates:
                # A leg it could belong to exists but cannot take it: a retry, or a late event
                # for a leg that already closed (an end after a missed, say).
                return Disposition.DUPLICATE, []
            return self._unmatched(tx, callers, event, step, now)
        tallies = _overflow(leg.labels)
        if step is Step.ANSWER:
            leg.answered_at = now
            tx.save_leg(leg)
            callers.leg_answered(leg, event.did)
            return Disposition.ANSWERED, tallies
        outcome = _closing_outcome(step, leg, event.billsec)
        tallies.append(self._close(tx, callers, leg, outcome, now, event.billsec, event.did))
        return Disposition.CLOSED, tallies

    def _start(
        self,
        tx: StoreTransaction,
        callers: _CallerLevel,
        event: CallEvent,
        candidates: list[Leg],
        now: float,
    ) -> tuple[Disposition, list[Tally]]:
        late = self._leg_started_late(candidates, now)
        if late is not None:
            # Counted as started, so that started and ended legs add up; it opens nothing.
            late.started_at = now
            tx.save_leg(late)
            return Disposition.STARTED_LATE, [LegStarted(late.labels), *_overflow(late.labels)]
        if self._start_is_known(event, candidates, now):
            return Disposition.DUPLICATE, []
        leg = self._new_leg(tx, event, now)
        leg.started_at = now
        tx.insert_leg(leg, event.did)
        callers.leg_opened(leg, event, rang=True)
        return Disposition.OPENED, [LegStarted(leg.labels), *_overflow(leg.labels)]

    def _leg_started_late(self, candidates: list[Leg], now: float) -> Leg | None:
        """A recent leg opened by its answer or end, whose start was delayed, not lost."""
        window_start = now - self._settings.duplicate_window
        return next(
            (leg for leg in candidates if leg.started_at is None and leg.opened_at >= window_start),
            None,
        )

    def _start_is_known(self, event: CallEvent, candidates: list[Leg], now: float) -> bool:
        """A copy of a start already taken.

        Without a call_id this needs a leg of the same caller's number: two calls of withheld
        numbers at one extension are two calls, however close together, and a call from a
        number is not a copy of one from a withheld number.
        """
        if event.call_id is not None:
            return bool(candidates)
        window_start = now - self._settings.duplicate_window
        return any(
            leg.same_party and leg.opened_at >= window_start and (leg.is_open or leg.started_late)
            for leg in candidates
        )

    def _unmatched(
        self, tx: StoreTransaction, callers: _CallerLevel, event: CallEvent, step: Step, now: float
    ) -> tuple[Disposition, list[Tally]]:
        """The leg's start was lost: keep what the event still tells."""
        leg = self._new_leg(tx, event, now)
        tallies: list[Tally] = [EventUnmatched(event.event_type), *_overflow(leg.labels)]
        if step is Step.ANSWER:
            leg.answered_at = now  # open it answered, so that its end closes it as answered
        else:
            leg.outcome = _closing_outcome(step, leg, event.billsec)
            leg.closed_at = now
            talk = event.billsec if leg.outcome in _TALKED else None
            tallies.append(LegEnded(leg.labels, leg.outcome, None, _seconds(talk)))
        tx.insert_leg(leg, event.did)
        # It still rang for a caller, or reached one: when it began ringing is unknown.
        callers.leg_opened(leg, event, rang=False)
        if leg.outcome is None:
            callers.leg_answered(leg, event.did)
        else:
            callers.leg_closed(leg, leg.outcome, _answered_at(leg, now, event.billsec), event.did)
        return Disposition.UNMATCHED, tallies

    def _close(
        self,
        tx: StoreTransaction,
        callers: _CallerLevel,
        leg: Leg,
        outcome: Outcome,
        now: float,
        billsec: int | None = None,
        number: str | None = None,
    ) -> LegEnded:
        """Close a leg; `number` is the event's other party (None for an expiry)."""
        callers.leg_closed(leg, outcome, _answered_at(leg, now, billsec), number)
        leg.closed_at = now
        leg.outcome = outcome
        tx.save_leg(leg)
        return LegEnded(
            leg.labels,
            outcome,
            _ring_seconds(leg, outcome, now, billsec),
            _talk_seconds(leg, outcome, now, billsec),
        )

    def _new_leg(self, tx: StoreTransaction, event: CallEvent, now: float) -> Leg:
        assert event.kind is not None
        labels = LegLabels(
            event.account, event.service, event.kind.direction, self._extension(tx, event)
        )
        return Leg(labels, event.abon, event.call_id, opened_at=now, started_at=None)

    def _extension(self, tx: StoreTransaction, event: CallEvent) -> str:
        """The extension label for a new leg: its abon, or `other` once the account is full."""
        if event.service is Service.TELEPHONY:
            return ""
        # Asked of the store each time, not remembered here: an admission is only real once
        # its transaction commits, and a rolled-back one must not keep its place in any worker.
        if tx.admit_extension(event.account, event.abon, self._settings.max_extensions):
            return event.abon
        return OTHER_EXTENSION


_TALKED = (Outcome.ANSWERED, Outcome.COMPLETED)


class _CallerLevel:
    """The caller level within one transaction: told of the leg changes, and the tallies it
    returns recorded with the leg's (docs/design.md, "Callers and call-backs").

    Only vpbx inbound legs form callers' calls; vpbx outbound legs are call-backs to whoever
    their `did` names. Numbers are kept as digests by the store's key, so the rules are bound
    to each transaction's store.
    """

    def __init__(self, tx: StoreTransaction, settings: TrackerSettings, now: float) -> None:
        self._callers = Callers(settings.callers, settings.lines, tx.digest, settings.calendar)
        self._book = tx.callers
        self._now = now
        self.tallies: list[CallerTally] = []

    def settle(self) -> None:
        self.tallies += self._callers.settle(self._book, self._now)

    def scope(self, event: CallEvent, step: Step) -> CallerScope | None:
        """The caller records an event may reach, from what it says (see the methods below).

        An inbound leg's event reaches its call (by call_id, or its caller's calls) and its
        caller's waiting record; one without the number, other than a start, reaches the call
        of whichever leg it acts on: any caller. An outbound leg reaches the callee's records
        only when it is answered or ends (a start or a close notice never does), and only
        with a number. Telephony legs have no callers.
        """
        if event.service is not Service.VPBX:
            return None
        caller = self._callers.caller(event.did)
        if event.kind is not None and event.kind.direction is Direction.OUTBOUND:
            if caller is None or step in (Step.START, Step.CLOSE_NOTICE):
                return None
            return CallerScope(event.account, caller=caller)
        if caller is None and step is not Step.START:
            return CallerScope(event.account, whole_account=True)
        return CallerScope(event.account, event.call_id, caller)

    def leg_opened(self, leg: Leg, event: CallEvent, rang: bool) -> None:
        if _rings_for_caller(leg.labels) and leg.id is not None:
            opened = InboundLeg(
                leg.id, leg.labels.account, leg.call_id, event.did, event.did_mcn, rang
            )
            self.tallies += self._callers.on_leg_started(self._book, opened, self._now)

    def leg_answered(self, leg: Leg, number: str | None) -> None:
        if _rings_for_caller(leg.labels) and leg.id is not None:
            self.tallies += self._callers.on_leg_answered(self._book, leg.id, self._now)
        elif _calls_out(leg.labels):
            self.tallies += self._callers.on_outbound_answered(
                self._book, leg.labels.account, number, self._now
            )

    def leg_closed(
        self, leg: Leg, outcome: Outcome, answered_at: float | None, number: str | None
    ) -> None:
        """Before the leg's close is written: `leg.answered_at` still says whether an answer
        was seen (an outbound leg answered then was a call-back already)."""
        if _rings_for_caller(leg.labels) and leg.id is not None:
            self.tallies += self._callers.on_leg_ended(
                self._book, leg.id, outcome, self._now, answered_at
            )
        elif _calls_out(leg.labels):
            account = leg.labels.account
            if outcome is Outcome.ANSWERED and leg.answered_at is None:
                self.tallies += self._callers.on_outbound_answered(
                    self._book, account, number, self._now
                )
            elif outcome is Outcome.UNANSWERED:
                self.tallies += self._callers.on_outbound_unanswered(
                    self._book, account, number, self._now
                )


def _rings_for_caller(labels: LegLabels) -> bool:
    return labels.service is Service.VPBX and labels.direction is Direction.INBOUND


def _calls_out(labels: LegLabels) -> bool:
    return labels.service is Service.VPBX and labels.direction is Direction.OUTBOUND


def _answered_at(leg: Leg, now: float, billsec: int | None) -> float | None:
    """When a closing leg was answered: seen, or dated billsec before its end, or unknown."""
    if leg.answered_at is not None:
        return leg.answered_at
    return None if billsec is None else now - billsec


def _target(step: Step, candidates: list[Leg]) -> Leg | None:
    """The leg an answer, miss, close notice or end acts on: the oldest that can take it."""
    for leg in candidates:
        if leg.is_open and (step is Step.END or leg.answered_at is None):
            return leg
    return None


def _closing_outcome(step: Step, leg: Leg, billsec: int | None) -> Outcome:
    not_answered = (
        Outcome.MISSED if leg.labels.direction is Direction.INBOUND else Outcome.UNANSWERED
    )
    if step is Step.CLOSE_NOTICE:
        return Outcome.CANCELLED
    if step is Step.MISS:
        return not_answered
    if leg.labels.service is Service.TELEPHONY:
        return Outcome.COMPLETED
    if leg.answered_at is None and billsec == 0:
        return not_answered
    return Outcome.ANSWERED


def _ring_seconds(leg: Leg, outcome: Outcome, now: float, billsec: int | None) -> float | None:
    """Start to answer, miss or cancel. Without an answer event, billsec dates the answer."""
    if leg.started_at is None or outcome is Outcome.COMPLETED:
        return None
    if leg.started_late:
        return None  # the start came after the answer: when the ringing began is unknown
    if outcome in (Outcome.ANSWERED, Outcome.EXPIRED):
        answered_at = leg.answered_at
        if answered_at is None and billsec is not None and outcome is Outcome.ANSWERED:
            answered_at = now - billsec
        if answered_at is None:
            return None
        return min(max(answered_at - leg.started_at, 0.0), max(now - leg.started_at, 0.0))
    return max(now - leg.started_at, 0.0)


def _talk_seconds(leg: Leg, outcome: Outcome, now: float, billsec: int | None) -> float | None:
    """billsec when given; else end minus answer; else end minus start."""
    if outcome not in _TALKED:
        return None
    if billsec is not None:
        return float(billsec)
    since = leg.answered_at if leg.answered_at is not None else leg.opened_at
    return max(now - since, 0.0)


def _overflow(labels: LegLabels) -> list[Tally]:
    return [ExtensionOverflowed(labels.account)] if labels.extension == OTHER_EXTENSION else []


def _seconds(value: int | None) -> float | None:
    return None if value is None else float(value)
