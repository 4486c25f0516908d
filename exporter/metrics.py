"""Every metric (docs/design.md, "Tallies"), declared once, and the scrape that renders them.

Two sources feed /metrics:
- everything about accepted events (deliveries, call totals, ring and talk times, active calls,
  last-event times) comes from the call store, committed with the legs it describes: exact
  across workers, killed workers and restarts;
- refused requests, which never reach the store, are per-process counters of prometheus_client,
  merged over the gunicorn workers by its multiprocess mode;
- whether each account is open comes from its opening hours and the clock, at scrape time.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from exporter import __version__
from exporter.callers import caller_gauges, caller_zero_rows
from exporter.calls import Clock
from exporter.config import Config
from exporter.events import EVENT_KINDS, UNKNOWN_EVENT, Direction, Service, Step
from exporter.hours import ALWAYS_OPEN, Calendar
from exporter.legs import LEG_LABELS, CounterRow, Outcome, TallyKind, TallyLayout, TimingRow
from exporter.rejections import COUNTED_REASONS, Reason
from exporter.store import CallStore, StoreSnapshot, TimingSeries

disable_created_metrics()
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # counters without the _total suffix, which the exposition adds
    help: str
    labels: tuple[str, ...] = ()


ACTIVE_CALLS = MetricSpec("mcn_active_calls", "Call legs in progress now.", LEG_LABELS)
CALLS_STARTED = MetricSpec("mcn_calls_started", "Call legs whose start event was received.")
CALLS_ENDED = MetricSpec(
    "mcn_calls_ended", 'Call legs ended, by outcome (missed calls are outcome="missed").'
)
RING_SECONDS = MetricSpec(
    "mcn_call_ring_seconds",
    "Ring time of call legs, from start to answer or to the end of ringing, in seconds.",
)
TALK_SECONDS = MetricSpec(
    "mcn_call_talk_seconds",
    "Talk time of answered call legs and completed telephony calls, in seconds.",
)
EVENTS_UNMATCHED = MetricSpec(
    "mcn_call_events_unmatched",
    "Answer, miss, close or end events whose leg was unknown (its start lost).",
)
EXTENSION_OVERFLOW = MetricSpec(
    "mcn_extension_overflow",
    'Events reported under extension="other" because the account reached limits.max_extensions.',
)
WEBHOOK_EVENTS = MetricSpec(
    "mcn_webhook_events", "Webhook events accepted, including retries.", ("service", "event_type")
)
WEBHOOK_REJECTED = MetricSpec("mcn_webhook_rejected", "Webhook requests refused.", ("reason",))
LAST_EVENT = MetricSpec(
    "mcn_last_event_timestamp_seconds",
    "Unix time of the last accepted webhook event.",
    ("account", "service"),
)
EXTENSION_INFO = MetricSpec(
    "mcn_extension_info", "Configured extensions: name and extra labels; always 1."
)
OPEN = MetricSpec(
    "mcn_open",
    "1 while the account is open by its opening hours, 0 while closed; always 1 without hours.",
    ("account",),
)
OPEN_NEXT_CHANGE = MetricSpec(
    "mcn_open_next_change_timestamp_seconds",
    "Unix time at which mcn_open of the account next changes; absent when it never does.",
    ("account",),
)
# The caller level (docs/design.md, "Callers and call-backs"): callers' calls, not legs.
INBOUND_CALLS = MetricSpec(
    "mcn_inbound_calls",
    "Callers' inbound calls settled (all the legs rung for one caller's call), by outcome; "
    "period: open or closed by the opening hours when the call started.",
)
INBOUND_WAIT = MetricSpec(
    "mcn_inbound_call_wait_seconds",
    "Callers' wait: first ring to answer (answered), or to the last leg's end (missed),"
    " in seconds.",
)
INBOUND_RINGING = MetricSpec(
    "mcn_inbound_calls_ringing",
    "Callers' calls ringing now that nobody has answered yet.",
    ("account", "line"),
)
CALLERS_WAITING = MetricSpec(
    "mcn_missed_callers_waiting",
    "Missed callers waiting for a call back now.",
    ("account", "line"),
)
OLDEST_WAIT = MetricSpec(
    "mcn_missed_callers_oldest_wait_seconds",
    "How long the longest-waiting missed caller has waited, in open seconds (opening hours); "
    "0 when nobody waits.",
    ("account",),
)
OLDEST_WAIT_WALL = MetricSpec(
    "mcn_missed_callers_oldest_wait_wall_seconds",
    "How long the longest-waiting missed caller has waited, in wall-clock seconds; "
    "0 when nobody waits.",
    ("account",),
)
CALLERS_RESOLVED = MetricSpec(
    "mcn_missed_callers_resolved",
    "Missed callers who stopped waiting: called_back, called_again or gave_up; "
    "period: that of their first missed call.",
)
CALLBACK_SECONDS = MetricSpec(
    "mcn_callback_seconds",
    "First missed call to called_back or called_again, in open seconds (opening hours).",
)
REPEAT_MISSED = MetricSpec(
    "mcn_repeat_missed_calls",
    "Missed calls from a caller already waiting for a call back.",
)
CALLBACK_ATTEMPTS = MetricSpec(
    "mcn_callback_attempts",
    "Outbound calls to a caller waiting for a call back, answered or unanswered.",
)
BUILD_INFO = MetricSpec(
    "mcn_exporter_build_info", "Version of the exporter; always 1.", ("version",)
)

TALLY_METRICS = {
    TallyKind.EVENTS: WEBHOOK_EVENTS,
    TallyKind.STARTED: CALLS_STARTED,
    TallyKind.ENDED: CALLS_ENDED,
    TallyKind.UNMATCHED: EVENTS_UNMATCHED,
    TallyKind.OVERFLOW: EXTENSION_OVERFLOW,
    TallyKind.INBOUND_CALLS: INBOUND_CALLS,
    TallyKind.CALLERS_RESOLVED: CALLERS_RESOLVED,
    TallyKind.REPEAT_MISSED: REPEAT_MISSED,
    TallyKind.CALLBACK_ATTEMPTS: CALLBACK_ATTEMPTS,
}
TIMING_METRICS = {
    TallyKind.RING: RING_SECONDS,
    TallyKind.TALK: TALK_SECONDS,
    TallyKind.INBOUND_WAIT: INBOUND_WAIT,
    TallyKind.CALLBACK: CALLBACK_SECONDS,
}

INBOUND_OUTCOMES: tuple[Outcome, ...] = (
    Outcome.ANSWERED,
    Outcome.MISSED,
    Outcome.CANCELLED,
    Outcome.EXPIRED,
)
OUTBOUND_OUTCOMES: tuple[Outcome, ...] = (Outcome.ANSWERED, Outcome.UNANSWERED, Outcome.EXPIRED)
TELEPHONY_OUTCOMES: tuple[Outcome, ...] = (Outcome.COMPLETED, Outcome.EXPIRED)


class RejectionCounter:
    """Refused requests, which never reach the store: per process, summed over the workers."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        counter = Counter(
            WEBHOOK_REJECTED.name,
            WEBHOOK_REJECTED.help,
            WEBHOOK_REJECTED.labels,
            registry=registry,
        )
        # Children looked up once (and so created at 0): labels() costs more than inc().
        self._children = {reason: counter.labels(reason) for reason in COUNTED_REASONS}

    def count(self, reason: Reason) -> None:
        self._children[reason].inc()


class StoreCollector(Collector):
    """Call metrics read from the call store at scrape time.

    With the config, the caller gauges show 0 for every configured account and line, and the
    oldest waits count open seconds by each account's hours; `clock` dates them.
    """

    def __init__(
        self, store: CallStore, config: Config | None = None, clock: Clock = time.time
    ) -> None:
        self._store = store
        self._layout = store.layout
        self._config = config
        self._clock = clock
        self._lines = {} if config is None else config.lines()

    def collect(self) -> Iterator[Metric]:
        snapshot = self._store.snapshot()
        yield _active_calls(snapshot)
        yield from self._caller_gauges(snapshot)
        for kind, spec in TALLY_METRICS.items():
            family = CounterMetricFamily(
                spec.name, spec.help, labels=self._layout.label_names(kind)
            )
            for labels, value in sorted(snapshot.counters.get(kind, {}).items()):
                family.add_metric(labels, value)
            yield family
        for kind, spec in TIMING_METRICS.items():
            yield self._histogram(kind, spec, snapshot.timings.get(kind, []))
        yield _last_events(snapshot)

    def _caller_gauges(self, snapshot: StoreSnapshot) -> Iterator[GaugeMetricFamily]:
        lines = self._lines
        gauges = caller_gauges(
            snapshot.ringing_calls,
            snapshot.waiting_callers,
            snapshot.first_misses,
            self._calendar,
            self._clock(),
            lines,
        )
        zero = {(account, line) for account, own in lines.items() for line in own.label_values()}
        yield _per_line(INBOUND_RINGING, gauges.ringing, zero)
        yield _per_line(CALLERS_WAITING, gauges.waiting, zero)
        yield _per_account(OLDEST_WAIT, gauges.oldest_wait_seconds)
        yield _per_account(OLDEST_WAIT_WALL, gauges.oldest_wait_wall_seconds)

    def _calendar(self, account: int) -> Calendar:
        # An account no longer configured may still have callers waiting: always open then.
        if self._config is None or account not in self._config.accounts:
            return ALWAYS_OPEN
        return self._config.calendar(account)

    def _histogram(
        self, kind: TallyKind, spec: MetricSpec, series: list[TimingSeries]
    ) -> HistogramMetricFamily:
        names = self._layout.label_names(kind)
        family = HistogramMetricFamily(spec.name, spec.help, labels=names)
        bounds = (*self._layout.buckets(kind), math.inf)
        for one in sorted(series, key=lambda s: s.labels):
            if len(one.labels) != len(names):
                continue  # written before metrics.histogram_extension_label was switched
            # Rows keep the bound they were counted under; re-bin them onto today's buckets.
            cumulative = [
                (floatToGoString(bound), sum(n for le, n in one.buckets.items() if le <= bound))
                for bound in bounds
            ]
            family.add_metric(one.labels, cumulative, one.total)
        return family


class ConfigCollector(Collector):
    """Info metrics: the configured extensions and the build."""

    def __init__(self, config: Config) -> None:
        self._families = list(_info_families(config))

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class HoursCollector(Collector):
    """Whether each account is open now, and until when, read from its calendar at scrape time.

    An account without hours (or whose hours never change) is open, with no next change.
    """

    def __init__(self, config: Config, clock: Clock) -> None:
        self._calendars = sorted(
            (str(account.id), account.calendar) for account in config.accounts.values()
        )
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        is_open = GaugeMetricFamily(OPEN.name, OPEN.help, labels=OPEN.labels)
        next_change = GaugeMetricFamily(
            OPEN_NEXT_CHANGE.name, OPEN_NEXT_CHANGE.help, labels=OPEN_NEXT_CHANGE.labels
        )
        for account, calendar in self._calendars:
            is_open.add_metric((account,), 1 if calendar.is_open(now) else 0)
            change = calendar.next_change(now)
            if change is not None:
                next_change.add_metric((account,), change)
        yield is_open
        yield next_change


class WorkerFilesCollector(Collector):
    """prometheus_client's multiprocess files, minus any a killed worker left unreadable.

    A worker killed while growing its file can leave it short or empty, which makes the stock
    collector fail every scrape until restart (client_python #1199).
    """

    def __init__(self, path: str) -> None:
        self._path = path

    def collect(self) -> Iterable[Metric]:
        # Only files: anything else named *.db was reported, and left alone, at start-up.
        files = [
            name for name in glob.glob(os.path.join(self._path, "*.db")) if os.path.isfile(name)
        ]
        try:
            merged: Iterable[Metric] = MultiProcessCollector.merge(files, accumulate=True)
        except Exception:
            readable = [name for name in files if _readable(name)]
            log.warning(
                "skipping %d unreadable metrics file(s) in %s",
                len(files) - len(readable),
                self._path,
            )
            merged = MultiProcessCollector.merge(readable, accumulate=True)
        return merged


class Scrape:
    """Renders /metrics in the format and encoding the scraper asks for."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def render(self, accept: str | None, accept_encoding: str | None) -> tuple[bytes, str, bool]:
        """Returns the body, its content type and whether it is gzip-compressed."""
        encoder, content_type = choose_encoder(accept or "")
        body = encoder(self.registry)
        if _accepts_gzip(accept_encoding or ""):
            return gzip.compress(body, compresslevel=1), content_type, True
        return body, content_type, False


def build_metrics(
    store: CallStore, config: Config, multiprocess_dir: str | None, clock: Clock = time.time
) -> tuple[RejectionCounter, Scrape]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, config, clock))
    registry.register(ConfigCollector(config))
    registry.register(HoursCollector(config, clock))
    if multiprocess_dir:
        registry.register(WorkerFilesCollector(multiprocess_dir))
        rejections = RejectionCounter(registry=None)
    else:
        rejections = RejectionCounter(registry=registry)
    return rejections, Scrape(registry)


def initial_rows(config: Config, layout: TallyLayout) -> list[CounterRow | TimingRow]:
    """The series of configured accounts and extensions, so they start at 0.

    See docs/design.md, "Zero series".
    """
    rows: list[CounterRow | TimingRow] = [
        CounterRow(TallyKind.UNMATCHED, (name,))
        for name, kind in EVENT_KINDS.items()
        if kind.step is not Step.START
    ]
    rows.extend(
        CounterRow(TallyKind.EVENTS, (kind.service.value, name))
        for name, kind in EVENT_KINDS.items()
    )
    rows.extend(CounterRow(TallyKind.EVENTS, (service.value, UNKNOWN_EVENT)) for service in Service)
    for account in config.accounts:
        rows.append(CounterRow(TallyKind.OVERFLOW, (str(account),)))
        legs: list[tuple[Service, Direction, str, tuple[Outcome, ...]]] = [
            (Service.TELEPHONY, Direction.INBOUND, "", TELEPHONY_OUTCOMES)
        ]
        for extension in config.extensions.get(account, {}):
            legs.append((Service.VPBX, Direction.INBOUND, extension, INBOUND_OUTCOMES))
            legs.append((Service.VPBX, Direction.OUTBOUND, extension, OUTBOUND_OUTCOMES))
        for service, direction, extension, outcomes in legs:
            leg: tuple[str, ...] = (str(account), service.value, direction.value, extension)
            rows.append(CounterRow(TallyKind.STARTED, leg))
            rows.extend(CounterRow(TallyKind.ENDED, (*leg, o.value)) for o in outcomes)
            if layout.timings_by_extension:
                rows.extend(_zero_timings(layout, leg, outcomes))
        if not layout.timings_by_extension:
            for service, direction, _, outcomes in (
                legs[0],
                (Service.VPBX, Direction.INBOUND, "", INBOUND_OUTCOMES),
                (Service.VPBX, Direction.OUTBOUND, "", OUTBOUND_OUTCOMES),
            ):
                leg = (str(account), service.value, direction.value, "")
                rows.extend(_zero_timings(layout, leg, outcomes))
    rows.extend(caller_zero_rows(layout, config.lines()))
    return rows


def _zero_timings(
    layout: TallyLayout, leg: tuple[str, ...], outcomes: tuple[Outcome, ...]
) -> Iterator[TimingRow]:
    extension = leg[3:] if layout.timings_by_extension else ()
    if leg[1] == Service.VPBX.value:  # telephony reports no answer: no ring time to observe
        for outcome in outcomes:
            yield TimingRow(TallyKind.RING, (*leg[:3], outcome.value, *extension), math.inf, 0)
    yield TimingRow(TallyKind.TALK, (*leg[:3], *extension), math.inf, 0)


def _active_calls(snapshot: StoreSnapshot) -> GaugeMetricFamily:
    family = GaugeMetricFamily(ACTIVE_CALLS.name, ACTIVE_CALLS.help, labels=ACTIVE_CALLS.labels)
    # Every leg series ever started shows, at 0 when idle, so graphs drop to zero, not vanish.
    values = dict.fromkeys(snapshot.counters.get(TallyKind.STARTED, {}), 0)
    for labels, count in snapshot.active.items():
        key: tuple[str, ...] = (
            str(labels.account),
            labels.service.value,
            labels.direction.value,
            labels.extension,
        )
        values[key] = count
    for key, count in sorted(values.items()):
        family.add_metric(key, count)
    return family


def _per_line(
    spec: MetricSpec, values: Mapping[tuple[int, str], int], zero: Iterable[tuple[int, str]]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
    series = {**dict.fromkeys(zero, 0), **values}
    for (account, line), value in sorted(series.items()):
        family.add_metric((str(account), line), value)
    return family


def _per_account(spec: MetricSpec, values: Mapping[int, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
    for account, value in sorted(values.items()):
        family.add_metric((str(account),), value)
    return family


def _last_events(snapshot: StoreSnapshot) -> GaugeMetricFamily:
    family = GaugeMetricFamily(LAST_EVENT.name, LAST_EVENT.help, labels=LAST_EVENT.labels)
    for (account, service), at in sorted(snapshot.last_events.items()):
        family.add_metric((str(account), service.value), at)
    return family


def _info_families(config: Config) -> Iterator[Metric]:
    extra = sorted(
        {
            label
            for extensions in config.extensions.values()
            for extension in extensions.values()
            for label in extension.labels
        }
    )
    info = GaugeMetricFamily(
        EXTENSION_INFO.name, EXTENSION_INFO.help, labels=("account", "extension", "name", *extra)
    )
    for account, extensions in sorted(config.extensions.items()):
        for number, extension in sorted(extensions.items()):
            values = [extension.labels.get(label, "") for label in extra]
            info.add_metric((str(account), number, extension.name, *values), 1)
    yield info
    build = GaugeMetricFamily(BUILD_INFO.name, BUILD_INFO.help, labels=BUILD_INFO.labels)
    build.add_metric((__version__,), 1)
    yield build


def _accepts_gzip(accept_encoding: str) -> bool:
    for coding in accept_encoding.split(","):
        name, _, params = coding.partition(";")
        if name.strip().lower() == "gzip":
            quality = params.strip().removeprefix("q=").strip()
            return not quality or _positive(quality)
    return False


def _positive(number: str) -> bool:
    try:
        return float(number) > 0
    except ValueError:
        return False


def _readable(path: str) -> bool:
    try:
        for key, _value, _timestamp, _pos in MmapedDict.read_all_values_from_file(path):
            json.loads(key)
    except Exception:
        return False
    return True
