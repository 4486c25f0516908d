"""`mcn-exporter simulate`: realistic call traffic with a known ground truth.

Each planned call is a short script of webhook bodies, sent in order by one sender thread while
other threads send other calls. Alongside, the simulator writes down what the exporter must show
once everything is delivered: that is the ground truth printed at the end. Deliveries that fail
on the network or with a 5xx are retried, as the provider does.

Given several URLs (replicas of one exporter sharing a store), each event goes to one of them at
random, a retry to the next, and a share of the events (`copies`) to two of them at the same
moment, as a provider retrying through a load balancer may do; the truth counts each copy.

The traffic is drawn from the seed; the call ids and caller numbers also carry a run id drawn
afresh for each run, so that a second run with the same seed places new calls instead of
repeating the first run's (which the exporter would rightly take as retried deliveries).

Besides the legs, the ground truth holds the caller level: each caller's call (every leg rung for
them) and whether a missed caller is still waiting for a call back. That truth is the settled
state: a missed call counts once callers.settle has passed after its last leg, at the next event
or scrape. So call-backs and calls again are sent only once the caller's missed call has settled
(--settle after it, at the end of the run), and /metrics is read for --verify only once the last
missed call has settled too. Its `period` is the account's calendar at the moment the call's
first event was sent, by the simulator's clock.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import queue
import random
import secrets
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

from prometheus_client.parser import text_string_to_metric_families

from exporter.config import Config
from exporter.events import EVENT_KINDS

DEFAULT_EXTENSIONS = tuple(str(n) for n in range(101, 111))
DEFAULT_SETTLE = 30.0  # the exporter's default callers.settle
SETTLE_MARGIN = 1.0  # past the settle, so that the exporter's clock surely agrees it passed
COUNTRY_CODE = "421"
# The subscriber part of a number: the digits a call-back is matched on (callbacks.match_digits).
SUBSCRIBER_DIGITS = 9
NUMBER_SPACE = 10**SUBSCRIBER_DIGITS
FIRST_NUMBER = 10 ** (SUBSCRIBER_DIGITS - 1)  # a subscriber number does not start with 0
MAX_ATTEMPTS = 30
TIMEOUT = 30.0
Labels = tuple[tuple[str, str], ...]
Samples = dict[str, dict[Labels, float]]


class SimulationError(Exception):
    """The run cannot go on: the exporter cannot be reached, or refuses the events as sent."""


def new_run_id() -> str:
    """Ten random digits: they also make the caller numbers, which are digits."""
    return f"{secrets.randbelow(10**10):010d}"


@dataclass
class GroundTruth:
    """What /metrics must show after the traffic: sample name -> labels -> value."""

    samples: dict[str, Counter[Labels]] = field(default_factory=dict)

    def add(self, sample: str, labels: dict[str, str], value: int = 1) -> None:
        self.samples.setdefault(sample, Counter())[tuple(sorted(labels.items()))] += value

    def as_json(self) -> dict[str, list[dict[str, Any]]]:
        return {
            sample: [
                {"labels": dict(labels), "value": value} for labels, value in sorted(c.items())
            ]
            for sample, c in sorted(self.samples.items())
        }


@dataclass(eq=False)
class PlannedCall:
    steps: list[tuple[float, dict[str, Any]]]  # (pause before sending, body)
    copied: set[int] = field(default_factory=set)  # steps also sent to a second URL at once
    # A call-back or call again: sent only once the caller's missed call has settled.
    follow_up: bool = False
    # A missed call that a follow-up waits for: sent first, so that the wait overlaps the run.
    followed: bool = False
    started_at: float | None = None  # by the simulator's clock, when its first event was sent

    def after_first(self) -> PlannedCall:
        return replace(
            self, steps=self.steps[1:], copied={index - 1 for index in self.copied if index}
        )


@dataclass
class Options:
    url: str
    calls: int = 200
    rate: float = 0.0  # events per second over all senders; 0 sends as fast as it can
    seed: int = 1
    concurrency: int = 16
    missed_ratio: float = 0.1
    pace: float = 0.2  # longest ring or talk pause, in seconds
    run_id: str = field(default_factory=new_run_id)
    verify: bool = False  # compare how /metrics moved during the run with the ground truth
    metrics_url: str | None = None  # default: /metrics on the webhook URL's host
    other_urls: tuple[str, ...] = ()  # more replicas: each event goes to one URL at random
    copies: float = 0.0  # share of events sent to two URLs at once (the same one if alone)
    settle: float = DEFAULT_SETTLE  # the exporter's callers.settle
    # Company lines by account, number -> name; default: `accounts[].lines` of the config.
    lines: Mapping[int, Mapping[str, str]] = field(default_factory=dict)
    clock: Callable[[], float] = time.time  # the wall clock deciding each call's `period`

    @property
    def urls(self) -> tuple[str, ...]:
        return (self.url, *self.other_urls)


CALLER_SAMPLES = (
    "mcn_inbound_calls_total",
    "mcn_inbound_call_wait_seconds_count",
    "mcn_inbound_calls_ringing",
    "mcn_missed_callers_waiting",
    "mcn_missed_callers_resolved_total",
    "mcn_callback_seconds_count",
    "mcn_repeat_missed_calls_total",
    "mcn_callback_attempts_total",
)
CALLER_NOTE = (
    "caller level, settled: compare once callers.settle has passed since the last event "
    "and a scrape has settled the missed calls; waits and call-back times are timed by the "
    "exporter's clock, so only their _count is given; gave_up needs callbacks.give_up_after "
    "and is never reached here"
)


@dataclass
class _PeriodSample:
    """A caller-level sample whose `period` is known only once its call has been sent."""

    sample: str
    account: int
    labels: dict[str, str]
    call: PlannedCall


@dataclass
class _Caller:
    """One person calling: their number (None when withheld) and company line."""

    account: int
    subscriber: str | None  # the last digits, on which call-backs are matched
    line_number: str | None  # did_mcn as written in their calls
    line: str  # the `line` label their calls count under
    waiting: bool = False
    written: list[str] = field(default_factory=list)  # how their calls wrote their number


class TrafficPlan:
    """Draws calls at random (from a seed) and keeps the ground truth they imply."""

    def __init__(self, config: Config, options: Options) -> None:
        self._random = random.Random(options.seed)
        self._options = options
        self._config = config
        self.copies = options.copies
        self._by_extension = config.metrics.histogram_extension_label
        self._serial = 0
        self._callers = 0
        # Caller numbers are unique within a run; from the run id, almost surely across runs.
        self._number_base = int(options.run_id) % (NUMBER_SPACE - FIRST_NUMBER)
        self.truth = GroundTruth()
        self._caller_truth = GroundTruth()
        self._by_period: list[_PeriodSample] = []
        # Talk time is exact only where the end carries billsec; a label set with any call
        # timed by the clock has no exact _sum to expect.
        self._clock_timed_talk: set[Labels] = set()
        self.calls: list[PlannedCall] = []
        self.follow_ups: list[PlannedCall] = []
        self._prepare_zero_series()

    def build(self) -> list[PlannedCall]:
        """The calls in sending order: followed missed calls first, follow-ups last."""
        missed = self._options.missed_ratio
        scenarios: list[tuple[float, Callable[[int], PlannedCall]]] = [
            (0.50, self._inbound),
            (0.25, self._outbound),
            (0.10, self._telephony),
            (0.08, self._ring_group),
            (0.04, self._retried_delivery),
            (0.02, self._lost_start),
            (0.01, self._unknown_event),
            (0.04, self._hunt_group),
            (0.02, self._withheld),
            # Stories of missed callers: as many more or fewer as --missed-ratio says.
            (0.3 * missed, self._ring_group_unanswered),
            (0.3 * missed, self._called_back),
            (0.2 * missed, self._calls_again),
            (0.1 * missed, self._missed_again),
        ]
        weights = [weight for weight, _ in scenarios]
        for _ in range(self._options.calls):
            account = self._random.choice(sorted(self._config.accounts))
            builder = self._random.choices([b for _, b in scenarios], weights)[0]
            self.calls.append(builder(account))
        talk_sums = self.truth.samples["mcn_call_talk_seconds_sum"]
        for labels in self._clock_timed_talk:
            del talk_sums[labels]
        followed = [call for call in self.calls if call.followed]
        self.calls = followed + [c for c in self.calls if not c.followed] + self.follow_ups
        return self.calls

    def caller_samples(self) -> GroundTruth:
        """The caller-level truth, once every call has been sent (each has its start time)."""
        truth = GroundTruth({k: Counter(v) for k, v in self._caller_truth.samples.items()})
        for entry in self._by_period:
            if entry.call.started_at is None:
                raise ValueError("caller-level truth asked for a call that was not sent")
            period = self._config.calendar(entry.account).period(entry.call.started_at)
            truth.add(entry.sample, {**entry.labels, "period": period})
        return truth

    # -- scenarios -----------------------------------------------------------------------------

    def _inbound(self, account: int) -> PlannedCall:
        ext = self._extension(account)
        call = self._call(account, with_call_id=self._random.random() < 0.7)
        call.start("onInCallingStart", ext)
        self._started(account, "vpbx", "inbound", ext)
        if self._random.random() < self._options.missed_ratio:
            call.send("onInCallingMissed", ext)
            self._caller_missed(call)
            return self._ended(call, account, "vpbx", "inbound", ext, "missed", ring=True)
        variant = self._random.choice(("answered", "billsec_only", "no_billsec"))
        if variant != "billsec_only":
            call.send("onInCallingAnswered", ext)
        billsec = None if variant == "no_billsec" else self._random.randint(1, 900)
        call.talk()
        call.send("onInCallingEnd", ext, billsec=billsec)
        self._caller_answered(call)
        return self._ended(
            call, account, "vpbx", "inbound", ext, "answered", ring=True, talk=True, billsec=billsec
        )

    def _outbound(self, account: int) -> PlannedCall:
        ext = self._extension(account)
        call = self._call(account, with_call_id=self._random.random() < 0.7)
        call.start("onOutCallingStart", ext)
        self._started(account, "vpbx", "outbound", ext)
        variant = self._random.choice(("answered", "answered", "missed", "billsec_zero"))
        if variant == "missed":
            call.send("onOutCallingMissed", ext)
        elif variant == "billsec_zero":
            call.send("onOutCallingEnd", ext, billsec=0)
        else:
            call.send("onOutCallingAnswered", ext)
            call.talk()
            billsec = self._random.randint(1, 600)
            call.send("onOutCallingEnd", ext, billsec=billsec)
            return self._ended(
                call,
                account,
                "vpbx",
                "outbound",
                ext,
                "answered",
                ring=True,
                talk=True,
                billsec=billsec,
            )
        return self._ended(call, account, "vpbx", "outbound", ext, "unanswered", ring=True)

    def _telephony(self, account: int) -> PlannedCall:
        call = self._call(account, with_call_id=False)
        call.start("InboundCallStart", None)
        self._started(account, "telephony", "inbound", "")
        call.talk()
        billsec = self._random.choice((None, self._random.randint(1, 300)))
        call.send("InboundCallEnd", None, billsec=billsec)
        return self._ended(
            call, account, "telephony", "inbound", "", "completed", talk=True, billsec=billsec
        )

    def _ring_group(self, account: int) -> PlannedCall:
        pool = self._extensions(account)
        group = self._random.sample(pool, min(3, len(pool)))
        call = self._call(account, with_call_id=True)
        for ext in group:
            call.start("onInCallingStart", ext)
            self._started(account, "vpbx", "inbound", ext)
        if self._random.random() < self._options.missed_ratio:
            for ext in group:
                call.send("onInCallingMissed", ext)
                self._ended(call, account, "vpbx", "inbound", ext, "missed", ring=True)
            self._caller_missed(call)
            return call.planned
        taker, *others = group
        call.send("onInCallingAnswered", taker)
        for ext in others:
            call.send("onCloseIncomingNotice", ext, pause=False)
            self._ended(call, account, "vpbx", "inbound", ext, "cancelled", ring=True)
        call.talk()
        billsec = self._random.randint(1, 900)
        call.send("onInCallingEnd", taker, billsec=billsec)
        self._caller_answered(call)
        return self._ended(
            call,
            account,
            "vpbx",
            "inbound",
            taker,
            "answered",
            ring=True,
            talk=True,
            billsec=billsec,
        )

    def _retried_delivery(self, account: int) -> PlannedCall:
        """The provider sends the end twice: the second copy must change nothing."""
        ext = self._extension(account)
        call = self._call(account, with_call_id=True)
        call.start("onInCallingStart", ext)
        self._started(account, "vpbx", "inbound", ext)
        call.send("onInCallingAnswered", ext)
        call.talk()
        billsec = self._random.randint(1, 900)
        call.send("onInCallingEnd", ext, billsec=billsec)
        call.send("onInCallingEnd", ext, billsec=billsec, pause=False)
        self._caller_answered(call)
        return self._ended(
            call, account, "vpbx", "inbound", ext, "answered", ring=True, talk=True, billsec=billsec
        )

    def _lost_start(self, account: int) -> PlannedCall:
        """Only the missed event arrives: unmatched, and still a missed call and caller."""
        ext = self._extension(account)
        call = self._call(account, with_call_id=True)
        call.send("onInCallingMissed", ext, pause=False)
        self.truth.add("mcn_call_events_unmatched_total", {"event_type": "onInCallingMissed"})
        # No leg was seen to start ringing: the call's wait is unknown, and not observed.
        self._caller_missed(call, waited=False)
        return self._ended(call, account, "vpbx", "inbound", ext, "missed")

    def _unknown_event(self, account: int) -> PlannedCall:
        call = self._call(account, with_call_id=False)
        call.send("onSomethingNew", self._extension(account), pause=False)
        return call.planned

    # -- scenarios of the caller level -----------------------------------------------------------

    def _ring_group_unanswered(self, account: int) -> PlannedCall:
        """Two to five phones ring for one caller; each rings out, or the caller hangs up first.

        One missed caller, however many legs.
        """
        pool = self._extensions(account)
        group = self._random.sample(pool, min(self._random.randint(2, 5), len(pool)))
        call = self._call(
            account, self._random.random() < 0.8, caller=self._new_caller(account, on_line=True)
        )
        for ext in group:
            call.start("onInCallingStart", ext)
            self._started(account, "vpbx", "inbound", ext)
        for ext in group:
            hung_up = self._random.random() < 0.5
            call.send("onCloseIncomingNotice" if hung_up else "onInCallingMissed", ext)
            outcome = "cancelled" if hung_up else "missed"
            self._ended(call, account, "vpbx", "inbound", ext, outcome, ring=True)
        self._caller_missed(call)
        return call.planned

    def _hunt_group(self, account: int) -> PlannedCall:
        """Sequential ringing: one phone rings out, the next rings for the same caller at once.

        One call, answered or missed by the second phone. The second ring starts within --pace
        of the first's end: well within callers.group_window and before the call can settle.
        """
        pool = self._extensions(account)
        if len(pool) < 2:
            return self._inbound(account)
        first, second = self._random.sample(pool, 2)
        call = self._call(
            account, self._random.random() < 0.5, caller=self._new_caller(account, on_line=True)
        )
        call.start("onInCallingStart", first)
        self._started(account, "vpbx", "inbound", first)
        call.send("onInCallingMissed", first)
        self._ended(call, account, "vpbx", "inbound", first, "missed", ring=True)
        call.pending_pause = self._random.uniform(0, self._options.pace)
        call.start("onInCallingStart", second)
        self._started(account, "vpbx", "inbound", second)
        if self._random.random() < self._options.missed_ratio:
            call.send("onInCallingMissed", second)
            self._caller_missed(call)
            return self._ended(call, account, "vpbx", "inbound", second, "missed", ring=True)
        return self._answer(call, second)

    def _withheld(self, account: int) -> PlannedCall:
        """A caller with a withheld number: a caller's call, but nobody can call them back."""
        caller = self._new_caller(account, on_line=True, withheld=True)
        call = self._call(account, with_call_id=True, caller=caller)
        ext = self._extension(account)
        call.start("onInCallingStart", ext)
        self._started(account, "vpbx", "inbound", ext)
        if self._random.random() < 0.5:
            call.send("onInCallingMissed", ext)
            self._caller_missed(call)
            return self._ended(call, account, "vpbx", "inbound", ext, "missed", ring=True)
        return self._answer(call, ext)

    def _called_back(self, account: int) -> PlannedCall:
        """A missed caller called back from another extension, the number written differently.

        Maybe first an attempt nobody answers (the caller keeps waiting), and maybe no answered
        one at all: then the caller is still waiting at the end.
        """
        missed = self._first_miss(account)
        follow_up = self._follow_up()
        reached = self._random.random() < 0.7
        if not reached or self._random.random() < 0.5:
            self._call_back(missed, follow_up, answered=False)
        if reached:
            self._call_back(missed, follow_up, answered=True)
            self._resolved(missed, "called_back")
        return missed.planned

    def _calls_again(self, account: int) -> PlannedCall:
        """A missed caller calls again, from the number written differently, and is answered."""
        missed = self._first_miss(account)
        again = self._call(account, True, caller=missed.caller, planned=self._follow_up())
        ext = self._extension(account)
        again.start("onInCallingStart", ext)
        self._started(account, "vpbx", "inbound", ext)
        self._answer(again, ext)
        self._resolved(missed, "called_again")
        return missed.planned

    def _missed_again(self, account: int) -> PlannedCall:
        """A missed caller calls again and is missed again: still one waiting caller."""
        missed = self._first_miss(account)
        again = self._call(account, True, caller=missed.caller, planned=self._follow_up())
        ext = self._extension(account)
        again.start("onInCallingStart", ext)
        self._started(account, "vpbx", "inbound", ext)
        again.send("onInCallingMissed", ext)
        self._caller_missed(again)
        self._ended(again, account, "vpbx", "inbound", ext, "missed", ring=True)
        return missed.planned

    def _first_miss(self, account: int) -> _CallScript:
        """A caller's call that one phone or two miss: the caller waits for a call back."""
        pool = self._extensions(account)
        group = self._random.sample(pool, min(self._random.randint(1, 2), len(pool)))
        call = self._call(
            account, self._random.random() < 0.7, caller=self._new_caller(account, on_line=True)
        )
        for ext in group:
            call.start("onInCallingStart", ext)
            self._started(account, "vpbx", "inbound", ext)
        for ext in group:
            call.send("onInCallingMissed", ext)
            self._ended(call, account, "vpbx", "inbound", ext, "missed", ring=True)
        self._caller_missed(call)
        call.planned.followed = True
        return call

    def _follow_up(self) -> PlannedCall:
        planned = PlannedCall([], follow_up=True)
        self.follow_ups.append(planned)
        return planned

    def _call_back(self, missed: _CallScript, follow_up: PlannedCall, answered: bool) -> None:
        """An outbound call to the missed caller, from an extension that did not ring for them."""
        account = missed.account
        ext = self._extension(account, avoid=missed.rung)
        call = self._call(account, True, caller=missed.caller, planned=follow_up, on_line=False)
        call.start("onOutCallingStart", ext)
        self._started(account, "vpbx", "outbound", ext)
        outcome = "answered" if answered else "unanswered"
        self._caller_truth.add(
            "mcn_callback_attempts_total", {"account": str(account), "outcome": outcome}
        )
        if not answered:
            call.send("onOutCallingMissed", ext)
            self._ended(call, account, "vpbx", "outbound", ext, "unanswered", ring=True)
            return
        call.send("onOutCallingAnswered", ext)
        call.talk()
        billsec = self._random.randint(1, 600)
        call.send("onOutCallingEnd", ext, billsec=billsec)
        self._ended(
            call,
            account,
            "vpbx",
            "outbound",
            ext,
            "answered",
            ring=True,
            talk=True,
            billsec=billsec,
        )

    def _answer(self, call: _CallScript, ext: str) -> PlannedCall:
        call.send("onInCallingAnswered", ext)
        call.talk()
        billsec = self._random.randint(1, 900)
        call.send("onInCallingEnd", ext, billsec=billsec)
        self._caller_answered(call)
        return self._ended(
            call,
            call.account,
            "vpbx",
            "inbound",
            ext,
            "answered",
            ring=True,
            talk=True,
            billsec=billsec,
        )

    # -- bookkeeping of the caller level -------------------------------------------------------

    def _new_caller(self, account: int, on_line: bool = False, withheld: bool = False) -> _Caller:
        self._callers += 1
        number = FIRST_NUMBER + (self._number_base + self._callers) % (NUMBER_SPACE - FIRST_NUMBER)
        subscriber = None if withheld else f"{number:09d}"
        line_number, line = None, ""
        lines = self._lines(account)
        draw = self._random.random()
        if on_line and draw >= 0.3:
            if lines and draw >= 0.5:
                number = self._random.choice(sorted(lines))
                line_number, line = self._written_line(number), lines[number]
            else:
                line_number, line = self._unconfigured_line(account), "other"
        return _Caller(account, subscriber, line_number, line)

    def _caller_answered(self, call: _CallScript) -> None:
        self._caller_call(call, "answered")

    def _caller_missed(self, call: _CallScript, waited: bool = True) -> None:
        """A missed call: its caller now waits for a call back, unless already waiting."""
        self._caller_call(call, "missed", waited)
        caller = call.caller
        if caller.subscriber is None:
            return
        labels = {"account": str(caller.account), "line": caller.line}
        if caller.waiting:
            self._caller_truth.add("mcn_repeat_missed_calls_total", labels)
        else:
            caller.waiting = True
            self._caller_truth.add("mcn_missed_callers_waiting", labels)

    def _caller_call(self, call: _CallScript, outcome: str, waited: bool = True) -> None:
        """A caller's call settled; `waited` unless none of its legs was seen to ring."""
        labels = {"account": str(call.account), "line": call.caller.line}
        self._caller_truth.add("mcn_inbound_calls_ringing", labels, 0)
        samples = ["mcn_inbound_calls_total"]
        if waited:
            samples.append("mcn_inbound_call_wait_seconds_count")
        for sample in samples:
            self._by_period.append(
                _PeriodSample(sample, call.account, {**labels, "outcome": outcome}, call.planned)
            )

    def _resolved(self, missed: _CallScript, resolution: str) -> None:
        """The caller of `missed` stops waiting; `period` is that of their missed call."""
        caller = missed.caller
        caller.waiting = False
        account = str(caller.account)
        labels = {"account": account, "line": caller.line}
        self._caller_truth.add("mcn_missed_callers_waiting", labels, -1)
        self._by_period.append(
            _PeriodSample(
                "mcn_missed_callers_resolved_total",
                caller.account,
                {**labels, "resolution": resolution},
                missed.planned,
            )
        )
        self._caller_truth.add(
            "mcn_callback_seconds_count", {"account": account, "resolution": resolution}
        )

    def _lines(self, account: int) -> Mapping[str, str]:
        """The account's company lines, number -> name: --line, else `accounts[].lines`."""
        if account in self._options.lines:
            return self._options.lines[account]
        lines: Mapping[str, str] | None = getattr(self._config.accounts[account], "lines", None)
        return lines or {}

    def _unconfigured_line(self, account: int) -> str:
        """A company number the config does not name: its calls count under line `other`."""
        taken = {_subscriber(number) for number in self._lines(account)}
        number = next(f"{n:09d}" for n in range(NUMBER_SPACE - 1, 0, -1) if f"{n:09d}" not in taken)
        return self._written(number, [])

    def _written_line(self, number: str) -> str:
        digits = "".join(c for c in number if c.isdigit())
        if len(digits) < SUBSCRIBER_DIGITS:
            return number
        return self._written(digits[-SUBSCRIBER_DIGITS:], [])

    def _written(self, subscriber: str, used: list[str]) -> str:
        """The number as the provider may write it; another way than `used` when there is one."""
        forms = [
            "0" + subscriber,
            COUNTRY_CODE + subscriber,
            "+" + COUNTRY_CODE + subscriber,
            f"+{COUNTRY_CODE} {subscriber[0]} {subscriber[1:5]} {subscriber[5:]}",
        ]
        fresh = [form for form in forms if form not in used] or forms
        return self._random.choice(fresh)

    # -- bookkeeping ---------------------------------------------------------------------------

    def _call(
        self,
        account: int,
        with_call_id: bool,
        caller: _Caller | None = None,
        planned: PlannedCall | None = None,
        on_line: bool = True,
    ) -> _CallScript:
        """One call of `caller` (a new one by default), into `planned` (a new one by default)."""
        self._serial += 1
        caller = caller or self._new_caller(account)
        did = None
        if caller.subscriber is not None:
            did = self._written(caller.subscriber, caller.written)
            caller.written.append(did)
        return _CallScript(
            plan=self,
            account=account,
            secret=self._config.accounts[account].secret,
            caller=caller,
            did=did,
            line_number=caller.line_number if on_line else None,
            call_id=(
                f"sim-{self._options.seed}-{self._options.run_id}-{self._serial}"
                if with_call_id
                else None
            ),
            pace=self._options.pace,
            rng=self._random,
            planned=planned or PlannedCall([]),
        )

    def _extensions(self, account: int) -> list[str]:
        configured = list(self._config.extensions.get(account, {})) or list(DEFAULT_EXTENSIONS)
        return configured[: self._config.limits.max_extensions]

    def _extension(self, account: int, avoid: set[str] | None = None) -> str:
        pool = self._extensions(account)
        others = [ext for ext in pool if ext not in (avoid or set())]
        return self._random.choice(others or pool)

    def _started(self, account: int, service: str, direction: str, ext: str) -> None:
        labels = {"account": str(account), "service": service, "direction": direction}
        labels["extension"] = ext
        self.truth.add("mcn_calls_started_total", labels)
        self.truth.add("mcn_active_calls", labels, 0)

    def _ended(
        self,
        call: _CallScript,
        account: int,
        service: str,
        direction: str,
        ext: str,
        outcome: str,
        ring: bool = False,
        talk: bool = False,
        billsec: int | None = None,
    ) -> PlannedCall:
        """Record a leg's end; a talk time without billsec is timed by the exporter's clock."""
        labels = {"account": str(account), "service": service, "direction": direction}
        self.truth.add("mcn_calls_ended_total", {**labels, "extension": ext, "outcome": outcome})
        timing = {**labels, "extension": ext} if self._by_extension else labels
        if ring:
            self.truth.add("mcn_call_ring_seconds_count", {**timing, "outcome": outcome})
        if talk:
            self.truth.add("mcn_call_talk_seconds_count", timing)
            self.truth.add("mcn_call_talk_seconds_sum", timing, billsec or 0)
            if billsec is None:
                self._clock_timed_talk.add(tuple(sorted(timing.items())))
        return call.planned

    def _prepare_zero_series(self) -> None:
        for sample in (
            "mcn_calls_started_total",
            "mcn_calls_ended_total",
            "mcn_call_ring_seconds_count",
            "mcn_call_talk_seconds_count",
            "mcn_call_talk_seconds_sum",
            "mcn_webhook_events_total",
            "mcn_call_events_unmatched_total",
            "mcn_active_calls",
        ):
            self.truth.samples.setdefault(sample, Counter())
        for sample in CALLER_SAMPLES:
            self._caller_truth.samples.setdefault(sample, Counter())

    def delivered(self, body: dict[str, Any]) -> None:
        kind = EVENT_KINDS.get(body["event_type"])
        if kind is None:
            labels = {"service": "vpbx", "event_type": "unknown"}
        else:
            labels = {"service": kind.service.value, "event_type": body["event_type"]}
        self.truth.add("mcn_webhook_events_total", labels)


@dataclass
class _CallScript:
    plan: TrafficPlan
    account: int
    secret: str
    caller: _Caller
    did: str | None  # the caller's number as this call writes it; None when withheld
    line_number: str | None  # did_mcn: the company number called
    call_id: str | None
    pace: float
    rng: random.Random
    planned: PlannedCall = field(default_factory=lambda: PlannedCall([]))
    pending_pause: float = 0.0
    rung: set[str] = field(default_factory=set)

    def start(self, event_type: str, ext: str | None) -> None:
        if ext is not None:
            self.rung.add(ext)
        self.send(event_type, ext, pause=False)

    def talk(self) -> None:
        self.pending_pause = self.rng.uniform(0, self.pace)

    def send(
        self, event_type: str, ext: str | None, billsec: int | None = None, pause: bool = True
    ) -> None:
        body: dict[str, Any] = {
            "event_type": event_type,
            "secret": self.secret,
            # The provider sends either form; so do we.
            "account_id": self.account if self.rng.random() < 0.8 else str(self.account),
        }
        if self.did is not None:
            body["did"] = self.did
        if self.line_number is not None:
            body["did_mcn"] = self.line_number
        if ext is not None:
            as_number = ext.isdigit() and str(int(ext)) == ext and self.rng.random() < 0.3
            body["abon"] = int(ext) if as_number else ext
        if self.call_id is not None:
            body["call_id"] = self.call_id
        if billsec is not None:
            body["billsec"] = billsec
        delay = self.pending_pause + (self.rng.uniform(0, self.pace) if pause else 0.0)
        self.pending_pause = 0.0
        self.planned.steps.append((delay, body))
        self.plan.delivered(body)
        # Drawn only when asked for, so that a seed without copies gives the traffic it gave.
        if self.plan.copies and self.rng.random() < self.plan.copies:
            self.planned.copied.add(len(self.planned.steps) - 1)
            self.plan.delivered(body)


@dataclass(frozen=True)
class Target:
    """One webhook URL: a replica of the exporter."""

    url: str
    parts: SplitResult

    @property
    def path(self) -> str:
        return self.parts.path or "/"


Connections = dict[int, http.client.HTTPConnection]  # a sender's keep-alive ones, by target


def _subscriber(number: str) -> str:
    """The digits a number is matched on: the last SUBSCRIBER_DIGITS of them."""
    return "".join(c for c in number if c.isdigit())[-SUBSCRIBER_DIGITS:]


class Sender:
    """Sends planned calls over keep-alive connections, `concurrency` calls at a time.

    The first event goes alone: a wrong address, path or secret stops the run there with its
    cause, instead of every event being retried. Later, network errors and 5xx are retried (the
    exporter may be restarting), on the next URL when there are several, while a redirect or a
    4xx stops the run: resending would not help.

    Follow-ups (call-backs, calls again) go last, once --settle has passed since the last missed
    call they follow was sent: the exporter has settled that call as missed by then.
    """

    def __init__(self, options: Options) -> None:
        self._targets = [Target(url, http_url(url)) for url in options.urls]
        self._options = options
        self._lock = threading.Lock()
        self._random = random.Random(options.seed)
        self._interval = 1.0 / options.rate if options.rate > 0 else 0.0
        self._next_slot = time.monotonic()
        self._stop = threading.Event()
        self.stopped_by: str | None = None
        self.sent = 0
        self.retries = 0
        self.failed: list[str] = []
        self.calls_done = 0
        self._followed_sent = 0.0  # monotonic time the last followed missed call was sent
        self._last_sent = 0.0  # monotonic time of the last delivery

    def run(
        self,
        calls: list[PlannedCall],
        progress: Callable[[bool], None] | None = None,
        before_follow_ups: Callable[[], None] | None = None,
    ) -> None:
        """Deliver every call; SimulationError if the exporter refuses them or is not there.

        `before_follow_ups` runs once the missed calls have settled, before the follow-ups.
        """
        first = [call for call in calls if not call.follow_up]
        follow_ups = [call for call in calls if call.follow_up]
        if first:
            self._send_all([self._probe(first[0]), *first[1:]], progress)
        if follow_ups and self.stopped_by is None:
            self._sleep_until(self._followed_sent + self._options.settle + SETTLE_MARGIN)
            if before_follow_ups:
                before_follow_ups()
            self._send_all(follow_ups, progress)
        if progress:
            progress(True)
        if self.stopped_by is not None:
            raise SimulationError(f"stopped after {self.sent} event(s): {self.stopped_by}")

    def wait_until_settled(self) -> None:
        """Until a call missed at the last delivery has surely settled in the exporter."""
        self._sleep_until(self._last_sent + self._options.settle + SETTLE_MARGIN)

    def _sleep_until(self, moment: float) -> None:
        delay = moment - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _send_all(self, calls: list[PlannedCall], progress: Callable[[bool], None] | None) -> None:
        work: queue.Queue[PlannedCall] = queue.Queue()
        for call in calls:
            work.put(call)
        threads = [
            threading.Thread(target=self._worker, args=(work,), daemon=True)
            for _ in range(max(1, self._options.concurrency))
        ]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            if progress:
                progress(False)
            time.sleep(0.2)

    def _probe(self, call: PlannedCall) -> PlannedCall:
        """Send the call's first event now, alone, to the first URL; what is left is returned."""
        _, body = call.steps[0]
        connections: Connections = {}
        self._deliver(connections, json.dumps(body).encode(), 0, probing=True)
        if self.stopped_by is None and 0 in call.copied:
            self._deliver(connections, json.dumps(body).encode(), self._other_than(0))
        _close(connections)
        if self.stopped_by is not None:
            raise SimulationError(self.stopped_by)
        call.started_at = self._options.clock()
        return call.after_first()

    def _worker(self, work: queue.Queue[PlannedCall]) -> None:
        connections: Connections = {}
        while not self._stop.is_set():
            try:
                call = work.get_nowait()
            except queue.Empty:
                break
            for index, (delay, body) in enumerate(call.steps):
                if delay:
                    time.sleep(delay)
                if self._stop.is_set():
                    break
                self._send(connections, json.dumps(body).encode(), copy=index in call.copied)
                if call.started_at is None:
                    call.started_at = self._options.clock()
            with self._lock:
                self.calls_done += 1
                if call.followed:
                    self._followed_sent = time.monotonic()
        _close(connections)

    def _send(self, connections: Connections, payload: bytes, copy: bool) -> None:
        """One event to a URL drawn at random; a copy, at the same moment, to another one."""
        target = self._pick()
        if not copy:
            self._deliver(connections, payload, target)
            return
        copy_connections: Connections = {}
        copy_thread = threading.Thread(
            target=self._deliver, args=(copy_connections, payload, self._other_than(target))
        )
        copy_thread.start()
        self._deliver(connections, payload, target)
        copy_thread.join()
        _close(copy_connections)

    def _deliver(
        self, connections: Connections, payload: bytes, target: int, probing: bool = False
    ) -> None:
        for attempt in range(MAX_ATTEMPTS):
            self._wait_for_slot()
            if self._stop.is_set():
                return
            connection = connections.get(target) or self._connect(target)
            connections[target] = connection
            try:
                connection.request(
                    "POST",
                    self._targets[target].path,
                    body=payload,
                    headers={"Content-Type": "application/json"},
                )
                response = connection.getresponse()
                answer = response.read()
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                del connections[target]
                if probing:
                    where = self._targets[target]
                    self._abort(f"{where.url}: {network_problem(exc, where.parts)}")
                    return
            else:
                if 200 <= response.status < 300:
                    with self._lock:
                        self.sent += 1
                        self._last_sent = time.monotonic()
                    return
                if response.status < 500 and response.status not in (408, 429):
                    self._abort(self._refusal(target, response, answer, payload))
                    with self._lock:
                        self.failed.append(f"HTTP {response.status}")
                    return
            with self._lock:
                self.retries += 1
            # A replica that failed may be down: the retry goes to the next one.
            target = (target + 1) % len(self._targets)
            time.sleep(min(0.05 * 2**attempt, 2.0))
        with self._lock:
            self.failed.append("gave up after retries")

    def _pick(self) -> int:
        if len(self._targets) == 1:
            return 0
        with self._lock:
            return self._random.randrange(len(self._targets))

    def _other_than(self, target: int) -> int:
        return (target + 1) % len(self._targets)

    def _abort(self, cause: str) -> None:
        with self._lock:
            if self.stopped_by is None:
                self.stopped_by = cause
        self._stop.set()

    def _refusal(
        self, target: int, response: http.client.HTTPResponse, answer: bytes, payload: bytes
    ) -> str:
        """One line: what the answer means for how simulate was pointed at the exporter."""
        url, path = self._targets[target].url, self._targets[target].path
        account = json.loads(payload).get("account_id")
        status = f"{response.status} {response.reason}"
        if response.status == 401:
            return (
                f"{url}: {status}: the exporter does not take the secret of account {account}: "
                "give simulate the exporter's config (--config)"
            )
        if response.status == 403:
            return (
                f"{url}: {status}: the exporter has no account {account}: "
                "give simulate the exporter's config (--config)"
            )
        if response.status in (404, 405):
            return (
                f"{url}: {status}: no webhook at {path}: use the path of the exporter's "
                "server.webhook_path (/webhook by default)"
            )
        if 300 <= response.status < 400:
            return f"{url}: {status}: redirected to {response.getheader('Location')}: use that URL"
        text = answer.decode("utf-8", "replace").strip()[:200]
        return f"{url}: {status}: {text}"

    def _connect(self, target: int) -> http.client.HTTPConnection:
        return connect(self._targets[target].parts)

    def _wait_for_slot(self) -> None:
        if not self._interval:
            return
        with self._lock:
            slot = max(self._next_slot, time.monotonic())
            self._next_slot = slot + self._interval
        delay = slot - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def _close(connections: Connections) -> None:
    for connection in connections.values():
        connection.close()
    connections.clear()


def http_url(url: str) -> SplitResult:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SimulationError(f"not an http(s) URL: {url}")
    try:
        parts.port  # noqa: B018 -- raises on a port that is not a number
    except ValueError as exc:
        raise SimulationError(f"{url}: {exc}") from exc
    return parts


def connect(parts: SplitResult) -> http.client.HTTPConnection:
    host, port = parts.hostname or "", parts.port
    if parts.scheme == "https":
        return http.client.HTTPSConnection(host, port, timeout=TIMEOUT)
    return http.client.HTTPConnection(host, port, timeout=TIMEOUT)


def network_problem(exc: BaseException, parts: SplitResult) -> str:
    """Why nothing could be sent, in the words of the fix."""
    where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused: is the exporter running and listening on {where}?"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host {parts.hostname}: {exc.strerror}"
    if isinstance(exc, TimeoutError):
        return f"no answer from {where} within {TIMEOUT:g} s"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed with {where}: {exc.reason or exc} (is it http rather than https?)"
    if isinstance(exc, http.client.HTTPException | ConnectionError):
        return f"{where} broke the connection ({type(exc).__name__}): is it an HTTP server?"
    return f"cannot connect to {where}: {exc}"


# -- comparing /metrics with the ground truth ----------------------------------------------------


def metrics_url(options: Options) -> str:
    """--metrics-url, or /metrics on the webhook URL's scheme, host and port."""
    if options.metrics_url:
        return options.metrics_url
    parts = urlsplit(options.url)
    return urlunsplit((parts.scheme, parts.netloc, "/metrics", "", ""))


def read_metrics(url: str) -> Samples:
    """Every sample /metrics shows, by name and labels; SimulationError if it cannot be read."""
    parts = http_url(url)
    connection = connect(parts)
    try:
        connection.request("GET", urlunsplit(("", "", parts.path or "/", parts.query, "")))
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise SimulationError(f"{url}: {network_problem(exc, parts)}") from exc
    finally:
        connection.close()
    if response.status != 200:
        raise SimulationError(
            f"{url}: {response.status} {response.reason}: cannot read the metrics to verify "
            "(give the exporter's own /metrics with --metrics-url)"
        )
    return parse_metrics(body.decode("utf-8", "replace"))


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def truth_differences(before: Samples, after: Samples, result: Mapping[str, Any]) -> list[str]:
    """How /metrics moved during a run (after minus before) against the run's ground truth.

    One line per difference; none when they agree. Every expected sample must have moved by
    exactly its value, and every other call sample not at all: mcn_active_calls included, whose
    truth is 0 because every simulated call ends, so it must be back where it was. Two are
    looser: a delivery retried because its answer was lost (a worker died after taking it) is
    rightly counted twice by mcn_webhook_events_total, and by nothing else; and talk-time sums
    are expected only where every end carried billsec (the others are timed by the exporter's
    clock). No request may have been refused. Give `before={}` for a store that started empty.

    The caller level (`result["callers"]`) is compared the same way when /metrics shows it:
    callers still waiting moved by the truth, and none ringing any more than before.
    """
    differences = [
        f"{_series(REJECTED, labels)}: {value:g} request(s) refused during the run"
        for labels, value in _moves(before, after, REJECTED).items()
    ]
    for name, expected_samples in sorted(result["samples"].items()):
        expected = _expected(expected_samples)
        moved = _moves(before, after, name)
        if name == "mcn_webhook_events_total":
            differences += _delivery_differences(moved, expected, int(result["retries"]))
        elif name == "mcn_call_talk_seconds_sum":
            differences += _sample_differences(
                name, {labels: moved.get(labels, 0.0) for labels in expected}, expected
            )
        else:
            differences += _sample_differences(name, moved, expected)
    if "callers" in result and has_caller_level(after):
        for name, expected_samples in sorted(result["callers"]["samples"].items()):
            differences += _sample_differences(
                name, _moves(before, after, name), _expected(expected_samples)
            )
    return differences


def has_caller_level(samples: Samples) -> bool:
    """Whether /metrics counts callers (an exporter without that level is compared on legs)."""
    return "mcn_inbound_calls_total" in samples


def _expected(samples: list[dict[str, Any]]) -> dict[Labels, float]:
    return {tuple(sorted(s["labels"].items())): float(s["value"]) for s in samples if s["value"]}


REJECTED = "mcn_webhook_rejected_total"


def _moves(before: Samples, after: Samples, name: str) -> dict[Labels, float]:
    was, now = before.get(name, {}), after.get(name, {})
    moves = {labels: now.get(labels, 0.0) - was.get(labels, 0.0) for labels in was.keys() | now}
    return {labels: move for labels, move in moves.items() if not _same(move, 0.0)}


def _sample_differences(
    name: str, moved: dict[Labels, float], expected: dict[Labels, float]
) -> list[str]:
    return [
        f"{_series(name, labels)}: expected {expected.get(labels, 0.0):+g}, "
        f"/metrics moved by {moved.get(labels, 0.0):+g}"
        for labels in sorted(moved.keys() | expected.keys())
        if not _same(moved.get(labels, 0.0), expected.get(labels, 0.0))
    ]


def _delivery_differences(
    moved: dict[Labels, float], expected: dict[Labels, float], retries: int
) -> list[str]:
    name = "mcn_webhook_events_total"
    differences = [
        f"{_series(name, labels)}: expected {expected.get(labels, 0.0):+g}"
        f"{' (or more, by retries)' if labels in expected else ''}, "
        f"/metrics moved by {moved.get(labels, 0.0):+g}"
        for labels in sorted(moved.keys() | expected.keys())
        if labels not in expected or labels not in moved or moved[labels] < expected[labels]
    ]
    excess = sum(moved.get(labels, 0.0) - value for labels, value in expected.items())
    if excess > retries:
        differences.append(
            f"{name}: {excess:g} more deliveries counted than expected, "
            f"but only {retries} were retried"
        )
    return differences


def _same(a: float, b: float) -> bool:
    # Sums of whole seconds, on top of clock-timed fractions: only float rounding may differ.
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def _series(name: str, labels: Labels) -> str:
    return name + "{" + ",".join(f'{key}="{value}"' for key, value in labels) + "}"


def simulate(config: Config, options: Options) -> dict[str, Any]:
    """Run the traffic; the result, with the ground truth and, if asked, how /metrics differs.

    SimulationError if the exporter or its /metrics cannot be reached or refuses the events.
    """
    plan = TrafficPlan(config, options)
    calls = plan.build()
    total_events = sum(len(call.steps) for call in calls)
    sender = Sender(options)
    before = read_metrics(metrics_url(options)) if options.verify else None
    metrics = metrics_url(options)
    sender.run(
        calls,
        _progress_bar(sender, len(calls)) if sys.stderr.isatty() else None,
        before_follow_ups=lambda: _settle_by_scrape(metrics),
    )
    result: dict[str, Any] = {
        "run_id": options.run_id,
        "calls": len(calls),
        "events": total_events,
        "copies": sum(len(call.copied) for call in calls),
        "delivered": sender.sent,
        "retries": sender.retries,
        "failed": len(sender.failed),
        "failures": sorted(set(sender.failed)),
        "samples": plan.truth.as_json(),
        "callers": {
            "note": CALLER_NOTE,
            "settle": options.settle,
            "samples": plan.caller_samples().as_json(),
        },
    }
    if before is not None:
        if has_caller_level(before):
            sender.wait_until_settled()
        after = read_metrics(metrics)
        result["callers"]["verified"] = has_caller_level(after)
        result["differences"] = truth_differences(before, after, result)
    return result


def _settle_by_scrape(url: str) -> None:
    """A scrape settles the missed calls whose time has come: before the call-backs to them.

    The exporter also settles them as the next event arrives; this keeps the truth from
    depending on whether it settles before or after matching that event. The exporter's
    /metrics may not be reachable from here (behind a proxy): then the events settle them.
    """
    with contextlib.suppress(SimulationError):
        read_metrics(url)


def _progress_bar(sender: Sender, total: int) -> Callable[[bool], None]:
    def show(final: bool) -> None:
        done = sender.calls_done
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} calls, "
            f"{sender.sent} events, {sender.retries} retries"
        )
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show
