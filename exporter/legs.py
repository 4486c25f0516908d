"""Call legs, and the tallies their lives leave behind (docs/design.md, "Legs"), keyed by
`TallyLayout`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from exporter.events import Direction, Service

OTHER_EXTENSION = "other"


class Outcome(StrEnum):
    ANSWERED = "answered"
    MISSED = "missed"
    CANCELLED = "cancelled"
    UNANSWERED = "unanswered"
    COMPLETED = "completed"
    EXPIRED = "expired"


@dataclass(frozen=True)
class LegLabels:
    """Where a leg is counted: its extension is the abon, or `other` past the extension limit."""

    account: int
    service: Service
    direction: Direction
    extension: str


@dataclass
class Leg:
    """One call at one extension (or, for telephony, at the account).

    `opened_at` is when we first heard of the leg; `started_at` is set only when we saw its start
    event, since ring time is measured from there.
    """

    labels: LegLabels
    abon: str
    call_id: str | None
    opened_at: float
    started_at: float | None
    answered_at: float | None = None
    closed_at: float | None = None
    outcome: Outcome | None = None
    id: int | None = None
    # Set by the store on the legs a LegQuery finds: its other party is known and is the query's.
    same_party: bool = field(default=False, compare=False)

    @property
    def is_open(self) -> bool:
        return self.closed_at is None

    @property
    def started_late(self) -> bool:
        """Its start came after its answer or end (which opened it)."""
        return self.started_at is not None and self.started_at > self.opened_at


class TallyKind(StrEnum):
    """The call totals kept beside the legs; metrics.py names each one."""

    EVENTS = "events"
    STARTED = "started"
    ENDED = "ended"
    UNMATCHED = "unmatched"
    OVERFLOW = "overflow"
    RING = "ring"
    TALK = "talk"


@dataclass(frozen=True)
class EventTaken:
    service: Service
    event_type: str


@dataclass(frozen=True)
class LegStarted:
    labels: LegLabels


@dataclass(frozen=True)
class LegEnded:
    labels: LegLabels
    outcome: Outcome
    ring_seconds: float | None
    talk_seconds: float | None


@dataclass(frozen=True)
class EventUnmatched:
    event_type: str


@dataclass(frozen=True)
class ExtensionOverflowed:
    account: int


Tally = EventTaken | LegStarted | LegEnded | EventUnmatched | ExtensionOverflowed


@dataclass(frozen=True)
class CounterRow:
    kind: TallyKind
    labels: tuple[str, ...]


@dataclass(frozen=True)
class TimingRow:
    kind: TallyKind
    labels: tuple[str, ...]
    bucket: float  # the upper bound of the bucket the observation falls in
    seconds: float


LEG_LABELS = ("account", "service", "direction", "extension")


@dataclass(frozen=True)
class TallyLayout:
    """How tallies are keyed: the label names of each kind and the buckets of the timings.

    The store writes rows in this layout and metrics.py reads them back with the same names.
    Timings carry the extension only when `timings_by_extension` is on, so that the number of
    histogram series stays small by default.
    """

    ring_buckets: tuple[float, ...]
    talk_buckets: tuple[float, ...]
    timings_by_extension: bool = False

    def label_names(self, kind: TallyKind) -> tuple[str, ...]:
        extension = ("extension",) if self.timings_by_extension else ()
        return {
            TallyKind.EVENTS: ("service", "event_type"),
            TallyKind.STARTED: LEG_LABELS,
            TallyKind.ENDED: (*LEG_LABELS, "outcome"),
            TallyKind.UNMATCHED: ("event_type",),
            TallyKind.OVERFLOW: ("account",),
            TallyKind.RING: ("account", "service", "direction", "outcome", *extension),
            TallyKind.TALK: ("account", "service", "direction", *extension),
        }[kind]

    def buckets(self, kind: TallyKind) -> tuple[float, ...]:
        return self.ring_buckets if kind is TallyKind.RING else self.talk_buckets

    def rows(self, tally: Tally) -> list[CounterRow | TimingRow]:
        if isinstance(tally, EventTaken):
            return [CounterRow(TallyKind.EVENTS, (tally.service.value, tally.event_type))]
        if isinstance(tally, LegStarted):
            return [CounterRow(TallyKind.STARTED, _leg_values(tally.labels))]
        if isinstance(tally, EventUnmatched):
            return [CounterRow(TallyKind.UNMATCHED, (tally.event_type,))]
        if isinstance(tally, ExtensionOverflowed):
            return [CounterRow(TallyKind.OVERFLOW, (str(tally.account),))]
        return self._ended_rows(tally)

    def _ended_rows(self, tally: LegEnded) -> list[CounterRow | TimingRow]:
        leg = _leg_values(tally.labels)
        extension = leg[3:] if self.timings_by_extension else ()
        rows: list[CounterRow | TimingRow] = [
            CounterRow(TallyKind.ENDED, (*leg, tally.outcome.value))
        ]
        if tally.ring_seconds is not None:
            labels = (*leg[:3], tally.outcome.value, *extension)
            rows.append(self._timing(TallyKind.RING, labels, tally.ring_seconds))
        if tally.talk_seconds is not None:
            rows.append(self._timing(TallyKind.TALK, (*leg[:3], *extension), tally.talk_seconds))
        return rows

    def _timing(self, kind: TallyKind, labels: tuple[str, ...], seconds: float) -> TimingRow:
        bucket = next((bound for bound in self.buckets(kind) if seconds <= bound), math.inf)
        return TimingRow(kind, labels, bucket, seconds)


def _leg_values(labels: LegLabels) -> tuple[str, ...]:
    return (str(labels.account), labels.service.value, labels.direction.value, labels.extension)
