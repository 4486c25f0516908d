"""What every call store implements, and the values it exchanges with the tracker and metrics.

The tracker decides which legs an event acts on; a store only answers a `LegQuery` and writes
what it is told, each change and the totals it implies in one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

# Only the caller level's storage interface and its records, never its rules.
from exporter.callers import CallerBook, CallerScope
from exporter.events import Direction, Service
from exporter.legs import CounterRow, Leg, LegLabels, Tally, TallyKind, TallyLayout, TimingRow


class StoreUnavailable(Exception):
    """The store cannot be read or written right now (locked, disk full, file gone)."""


# The tables' version, the same in every backend. Versions upgraded in place: 1 -> 2 adds the
# caller level's tables (created empty: callers are counted from the upgrade on; legs and totals
# are kept). Any other version is refused before anything is written.
SCHEMA_VERSION = "2"
UPGRADABLE_VERSIONS = frozenset({"1"})


class StoreRetry(StoreUnavailable):
    """The store undid the change, none of it committed, and wants it made again at once (it
    takes wider locks the next time). The tracker makes it again, once."""


class StoreIncompatible(StoreUnavailable):
    """The store was written by another version of the exporter (its schema version differs):
    left untouched; the message says what to do."""


@dataclass(frozen=True)
class StoreSeed:
    """What a new store file starts with: the configured series at zero, the configured
    extensions' places. A worker that finds its file deleted recreates it alone, with these.
    """

    rows: tuple[CounterRow | TimingRow, ...] = ()
    extensions: tuple[tuple[int, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class TimingSeries:
    labels: tuple[str, ...]
    buckets: dict[float, int]  # upper bound -> observations in that bucket alone
    total: float


@dataclass(frozen=True)
class StoreSnapshot:
    """Everything /metrics shows from the store, read in one consistent view."""

    counters: dict[TallyKind, dict[tuple[str, ...], float]] = field(default_factory=dict)
    timings: dict[TallyKind, list[TimingSeries]] = field(default_factory=dict)
    active: dict[LegLabels, int] = field(default_factory=dict)
    last_events: dict[tuple[int, Service], float] = field(default_factory=dict)
    # The caller level's gauges, as its book aggregates them (CallerBook).
    ringing_calls: dict[tuple[int, str], int] = field(default_factory=dict)
    waiting_callers: dict[tuple[int, str], int] = field(default_factory=dict)
    first_misses: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LegQuery:
    """The legs an event may belong to, as the tracker asks for them.

    With a `call_id`: the leg of (account, call_id, abon), open or closed, whatever its service
    and direction. Without: the legs without a call_id of (account, service, direction, abon)
    that are open, closed since `closed_since`, or expired; with a `party`, only those whose
    party is that number or unknown. Each leg comes back with `same_party` set when its party
    is known and is `party`. Oldest first (by opened_at, then id).

    `callers`: the caller records the change may go on to (None: none), for a store that
    locks them with the legs.
    """

    account: int
    service: Service
    direction: Direction
    abon: str
    call_id: str | None
    party: str | None  # the other party's number (the event's did), if it has one
    closed_since: float
    callers: CallerScope | None = None


class StoreTransaction(Protocol):
    def legs_matching(self, query: LegQuery) -> list[Leg]:
        """The legs `query` describes, oldest first, each with `same_party` set."""

    def insert_leg(self, leg: Leg, did: str | None) -> None: ...

    def save_leg(self, leg: Leg) -> None:
        """Write back a leg's start, answer and close times and its outcome."""

    def open_legs_before(self, opened_before: float) -> list[Leg]: ...

    def forget_closed_legs(
        self, with_call_id_before: float, without_call_id_before: float
    ) -> None: ...

    def admit_extension(self, account: int, extension: str, limit: int) -> bool:
        """True if the extension has, or now gets, one of the account's `limit` places."""

    def touch(self, account: int, service: Service, at: float) -> None: ...

    def record(self, tallies: Iterable[Tally]) -> None: ...

    @property
    def callers(self) -> CallerBook:
        """The caller level's book, read and written in this same transaction."""

    def digest(self, number: str) -> str:
        """The keyed digest of a number, by this store's key: the only form it is kept in."""


class CallStore(Protocol):
    layout: TallyLayout

    def transaction(self) -> AbstractContextManager[StoreTransaction]: ...

    def snapshot(self) -> StoreSnapshot: ...

    def ensure_rows(self, rows: Iterable[CounterRow | TimingRow]) -> None:
        """Create these series at zero unless they exist."""

    def reserve_extensions(self, account: int, extensions: Iterable[str]) -> None:
        """Give these extensions their own series, whatever limits.max_extensions says."""

    def ping(self) -> None: ...

    def close(self) -> None: ...
