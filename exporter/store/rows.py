"""Rows as every SQL backend reads and writes them: legs, label keys, timing series."""

from __future__ import annotations

import functools
import json
from typing import Any

from exporter.events import Direction, Service
from exporter.legs import Leg, LegLabels, Outcome, TallyKind
from exporter.store.base import TimingSeries

# `party` last: a leg read for a LegQuery compares it with the query's digest.
LEG_COLUMNS = (
    "id, account, service, direction, abon, extension, call_id,"
    " opened_at, started_at, answered_at, closed_at, outcome, party"
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
