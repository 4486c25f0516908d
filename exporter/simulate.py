"""`mcn-exporter simulate`: realistic call traffic with a known ground truth.

Each planned call is a short script of webhook bodies, sent in order by one sender thread while
other threads send other calls. Alongside, the simulator writes down what the exporter must show
once everything is delivered: that is the ground truth printed at the end. Deliveries that fail
on the network or with a 5xx are retried, as the provider does.
"""

from __future__ import annotations

import http.client
import json
import queue
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from exporter.config import Config
from exporter.events import EVENT_KINDS

DEFAULT_EXTENSIONS = tuple(str(n) for n in range(101, 111))
MAX_ATTEMPTS = 30
Labels = tuple[tuple[str, str], ...]


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


@dataclass
class PlannedCall:
    steps: list[tuple[float, dict[str, Any]]]  # (pause before sending, body)


@dataclass
class Options:
    url: str
    calls: int = 200
    rate: float = 0.0  # events per second over all senders; 0 sends as fast as it can
    seed: int = 1
    concurrency: int = 16
    missed_ratio: float = 0.1
    pace: float = 0.2  # longest ring or talk pause, in seconds


class TrafficPlan:
    """Draws calls at random (from a seed) and keeps the ground truth they imply."""

    def __init__(self, config: Config, options: Options) -> None:
        self._random = random.Random(options.seed)
        self._options = options
        self._config = config
        self._by_extension = config.metrics.histogram_extension_label
        self._serial = options.seed * 1_000_000
        self.truth = GroundTruth()
        # Talk time is exact only where the end carries billsec; a label set with any call
        # timed by the clock has no exact _sum to expect.
        self._clock_timed_talk: set[Labels] = set()
        self.calls: list[PlannedCall] = []
        self._prepare_zero_series()

    def build(self) -> list[PlannedCall]:
        scenarios: list[tuple[float, Callable[[int], PlannedCall]]] = [
            (0.50, self._inbound),
            (0.25, self._outbound),
            (0.10, self._telephony),
            (0.08, self._ring_group),
            (0.04, self._retried_delivery),
            (0.02, self._lost_start),
            (0.01, self._unknown_event),
        ]
        weights = [weight for weight, _ in scenarios]
        for _ in range(self._options.calls):
            account = self._random.choice(sorted(self._config.accounts))
            builder = self._random.choices([b for _, b in scenarios], weights)[0]
            self.calls.append(builder(account))
        talk_sums = self.truth.samples["mcn_call_talk_seconds_sum"]
        for labels in self._clock_timed_talk:
            del talk_sums[labels]
        return self.calls

    # -- scenarios -----------------------------------------------------------------------------

    def _inbound(self, account: int) -> PlannedCall:
        ext = self._extension(account)
        call = self._call(account, with_call_id=self._random.random() < 0.7)
        call.start("onInCallingStart", ext)
        self._started(account, "vpbx", "inbound", ext)
        if self._random.random() < self._options.missed_ratio:
            call.send("onInCallingMissed", ext)
            return self._ended(call, account, "vpbx", "inbound", ext, "missed", ring=True)
        variant = self._random.choice(("answered", "billsec_only", "no_billsec"))
        if variant != "billsec_only":
            call.send("onInCallingAnswered", ext)
        billsec = None if variant == "no_billsec" else self._random.randint(1, 900)
        call.talk()
        call.send("onInCallingEnd", ext, billsec=billsec)
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
            return call.planned
        taker, *others = group
        call.send("onInCallingAnswered", taker)
        for ext in others:
            call.send("onCloseIncomingNotice", ext, pause=False)
            self._ended(call, account, "vpbx", "inbound", ext, "cancelled", ring=True)
        call.talk()
        billsec = self._random.randint(1, 900)
        call.send("onInCallingEnd", taker, billsec=billsec)
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
        return self._ended(
            call, account, "vpbx", "inbound", ext, "answered", ring=True, talk=True, billsec=billsec
        )

    def _lost_start(self, account: int) -> PlannedCall:
        """Only the missed event arrives: unmatched, and still a missed call."""
        ext = self._extension(account)
        call = self._call(account, with_call_id=True)
        call.send("onInCallingMissed", ext, pause=False)
        self.truth.add("mcn_call_events_unmatched_total", {"event_type": "onInCallingMissed"})
        return self._ended(call, account, "vpbx", "inbound", ext, "missed")

    def _unknown_event(self, account: int) -> PlannedCall:
        call = self._call(account, with_call_id=False)
        call.send("onSomethingNew", self._extension(account), pause=False)
        return call.planned

    # -- bookkeeping ---------------------------------------------------------------------------

    def _call(self, account: int, with_call_id: bool) -> _CallScript:
        self._serial += 1
        return _CallScript(
            plan=self,
            account=account,
            secret=self._config.accounts[account].secret,
            did=f"+4219{self._serial:08d}",  # unique per call: calls without call_id never mix
            call_id=f"sim-{self._options.seed}-{self._serial}" if with_call_id else None,
            pace=self._options.pace,
            rng=self._random,
        )

    def _extensions(self, account: int) -> list[str]:
        configured = list(self._config.extensions.get(account, {})) or list(DEFAULT_EXTENSIONS)
        return configured[: self._config.limits.max_extensions]

    def _extension(self, account: int) -> str:
        return self._random.choice(self._extensions(account))

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
    did: str
    call_id: str | None
    pace: float
    rng: random.Random
    planned: PlannedCall = field(default_factory=lambda: PlannedCall([]))
    pending_pause: float = 0.0

    def start(self, event_type: str, ext: str | None) -> None:
        self.send(event_type, ext, pause=False)

    def talk(self) -> None:
        self.pending_pause = self.rng.uniform(0, self.pace)

    def send(
        self, event_type: str, ext: str | None, billsec: int | None = None, pause: bool = True
    ) -> None:
        body: dict[str, Any] = {
            "event_type": event_type,
            "did": self.did,
            "secret": self.secret,
            # The provider sends either form; so do we.
            "account_id": self.account if self.rng.random() < 0.8 else str(self.account),
        }
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


class Sender:
    """Sends planned calls over keep-alive connections, `concurrency` calls at a time."""

    def __init__(self, options: Options) -> None:
        parts = urlsplit(options.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {options.url}")
        self._options = options
        self._parts = parts
        self._path = parts.path or "/"
        self._lock = threading.Lock()
        self._interval = 1.0 / options.rate if options.rate > 0 else 0.0
        self._next_slot = time.monotonic()
        self.sent = 0
        self.retries = 0
        self.failed: list[str] = []
        self.calls_done = 0

    def run(self, calls: list[PlannedCall], progress: Callable[[], None] | None = None) -> None:
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
                progress()
            time.sleep(0.2)
        if progress:
            progress()

    def _worker(self, work: queue.Queue[PlannedCall]) -> None:
        connection: http.client.HTTPConnection | None = None
        while True:
            try:
                call = work.get_nowait()
            except queue.Empty:
                break
            for delay, body in call.steps:
                if delay:
                    time.sleep(delay)
                connection = self._deliver(connection, json.dumps(body).encode())
            with self._lock:
                self.calls_done += 1
        if connection is not None:
            connection.close()

    def _deliver(
        self, connection: http.client.HTTPConnection | None, payload: bytes
    ) -> http.client.HTTPConnection | None:
        for attempt in range(MAX_ATTEMPTS):
            self._wait_for_slot()
            if connection is None:
                connection = self._connect()
            try:
                connection.request(
                    "POST", self._path, body=payload, headers={"Content-Type": "application/json"}
                )
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                connection.close()
                connection, status = None, 0
            if 200 <= status < 300:
                with self._lock:
                    self.sent += 1
                return connection
            if 400 <= status < 500 and status != 429:
                with self._lock:
                    self.failed.append(f"HTTP {status}")
                return connection
            with self._lock:
                self.retries += 1
            time.sleep(min(0.05 * 2**attempt, 2.0))
        with self._lock:
            self.failed.append("gave up after retries")
        return connection

    def _connect(self) -> http.client.HTTPConnection:
        host, port = self._parts.hostname or "", self._parts.port
        if self._parts.scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=30)
        return http.client.HTTPConnection(host, port, timeout=30)

    def _wait_for_slot(self) -> None:
        if not self._interval:
            return
        with self._lock:
            slot = max(self._next_slot, time.monotonic())
            self._next_slot = slot + self._interval
        delay = slot - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def simulate(config: Config, options: Options) -> dict[str, Any]:
    plan = TrafficPlan(config, options)
    calls = plan.build()
    total_events = sum(len(call.steps) for call in calls)
    sender = Sender(options)
    sender.run(calls, _progress_bar(sender, len(calls)) if sys.stderr.isatty() else None)
    return {
        "calls": len(calls),
        "events": total_events,
        "delivered": sender.sent,
        "retries": sender.retries,
        "failed": len(sender.failed),
        "failures": sorted(set(sender.failed)),
        "samples": plan.truth.as_json(),
    }


def _progress_bar(sender: Sender, total: int) -> Callable[[], None]:
    def show() -> None:
        done = sender.calls_done
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} calls, "
            f"{sender.sent} events, {sender.retries} retries"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show
