"""Rows as every SQL backend reads and writes them: legs, label keys, timing series, and the
totals a batch of changes adds up before its COMMIT."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from typing import Any

from exporter.events import Direction, Service
from exporter.legs import CounterRow, Leg, LegLabels, Outcome, Tally, TallyKind, TallyLayout
from exporter.store.base import TimingSeries

# `party` last: a leg read for a LegQuery compares it with the query's digest.
LEG_COLUMNS = (
    "id, account, service, direction, abon, extension, call_id,"
    " opened_at, started_at, answered_at, closed_at, outcome, party"
)

# A new leg's columns, and `new_leg_values` its values in that order.
NEW_LEG_COLUMNS = (
    "account, service, direction, abon, extension, party, call_id,"
    " opened_at, started_at, answered_at, closed_at, outcome"
)


def new_leg_values(leg: Leg, party: str | None) -> tuple[Any, ...]:
    """A leg's row for NEW_LEG_COLUMNS; `party`, the digest of its other party's number."""
    labels = leg.labels
    return (
        labels.account,
        labels.service.value,
        labels.direction.value,
        leg.abon,
        labels.extension,
        party,
        leg.call_id,
        leg.opened_at,
        *leg_progress(leg),
    )


def leg_progress(leg: Leg) -> tuple[Any, ...]:
    """What a leg's events change: started_at, answered_at, closed_at, outcome."""
    return (
        leg.started_at,
        leg.answered_at,
        leg.closed_at,
        leg.outcome.value if leg.outcome else None,
    )


# Enum(value) costs about a microsecond per call; a dict lookup a tenth of that.
_SERVICES = {member.value: member for member in Service}
_DIRECTIONS = {member.value: member for member in Direction}
_OUTCOMES = {member.value: member for member in Outcome}


def _leg(row: Any, party: str | None = None) -> Leg:
    """A leg from a row of LEG_COLUMNS; `party`, the digest it is matched against, if any."""
    (
        leg_id,
        account,
        service,
        direction,
        abon,
        extension,
        call_id,
        opened_at,
        started_at,
        answered_at,
        closed_at,
        outcome,
        leg_party,
    ) = row
    return Leg(
        labels=LegLabels(account, _SERVICES[service], _DIRECTIONS[direction], extension),
        abon=abon,
        call_id=call_id,
        opened_at=opened_at,
        started_at=started_at,
        answered_at=answered_at,
        closed_at=closed_at,
        outcome=_OUTCOMES[outcome] if outcome else None,
        id=leg_id,
        same_party=party is not None and leg_party == party,
    )


def _timing_series(
    buckets: dict[tuple[TallyKind, str], dict[float, int]],
    totals: dict[tuple[TallyKind, str], float],
) -> dict[TallyKind, list[TimingSeries]]:
    series: dict[TallyKind, list[TimingSeries]] = {}
    for (kind, labels), counts in buckets.items():
        series.setdefault(kind, []).append(
            TimingSeries(_labels(labels), counts, totals[(kind, labels)])
        )
    return series


@functools.lru_cache(maxsize=16384)
def _key(labels: tuple[str, ...]) -> str:
    # The same few label sets come back with every event: encode each once.
    return json.dumps(labels, separators=(",", ":"))


def _labels(key: str) -> tuple[str, ...]:
    return tuple(json.loads(key))


class Totals:
    """What changes add to the totals (counters, timings, active legs, last events), summed in
    Python: a change's, then its batch's once the change is kept.

    Every event adds to the same few totals, so a batch's sums are written with one upsert per
    table and row just before its COMMIT, in the transaction that holds the legs they describe.
    A change rolled back alone is simply not added to its batch.
    """

    __slots__ = ("active", "counters", "last_events", "timings")

    def __init__(self) -> None:
        self.last_events: dict[tuple[int, str], float] = {}  # (account, service): latest
        self.active: dict[tuple[int, str, str, str], int] = {}  # leg labels: legs opened - closed
        self.counters: dict[tuple[str, str], float] = {}  # (kind, label key)
        self.timings: dict[tuple[str, str, float], tuple[int, float]] = {}  # + bucket: count, sum

    def __bool__(self) -> bool:
        return bool(self.last_events or self.active or self.counters or self.timings)

    def touch(self, account: int, service: Service, at: float) -> None:
        key = (account, service.value)
        last_events = self.last_events
        last_events[key] = max(at, last_events.get(key, at))

    def count_active(self, labels: LegLabels, change: int) -> None:
        key = (labels.account, labels.service.value, labels.direction.value, labels.extension)
        active = self.active
        active[key] = active.get(key, 0) + change

    def record(self, layout: TallyLayout, tallies: Iterable[Tally]) -> None:
        counters, timings = self.counters, self.timings
        for tally in tallies:
            for row in layout.rows(tally):
                if isinstance(row, CounterRow):
                    counter = (row.kind.value, _key(row.labels))
                    counters[counter] = counters.get(counter, 0.0) + 1
                else:
                    timing = (row.kind.value, _key(row.labels), row.bucket)
                    count, total = timings.get(timing, (0, 0.0))
                    timings[timing] = (count + 1, total + row.seconds)

    def add(self, other: Totals) -> None:
        for key, at in other.last_events.items():
            self.last_events[key] = max(at, self.last_events.get(key, at))
        for key_a, change in other.active.items():
            self.active[key_a] = self.active.get(key_a, 0) + change
        for key_c, value in other.counters.items():
            self.counters[key_c] = self.counters.get(key_c, 0.0) + value
        for key_t, (count, total) in other.timings.items():
            old_count, old_total = self.timings.get(key_t, (0, 0.0))
            self.timings[key_t] = (old_count + count, old_total + total)

    def clear(self) -> None:
        self.last_events.clear()
        self.active.clear()
        self.counters.clear()
        self.timings.clear()
