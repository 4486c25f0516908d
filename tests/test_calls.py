"""The call-leg state machine on its own: a real store in a temporary file, a hand-moved clock."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.calls import CallTracker, Disposition, TrackerSettings
from exporter.events import EVENT_KINDS, CallEvent, Service
from exporter.legs import OTHER_EXTENSION, TallyKind, TallyLayout
from exporter.store import SqliteCallStore, StoreUnavailable
from exporter.store.sqlite import _SqliteTransaction
from tests.conftest import ACCOUNT, Exporter, FakeClock, call_totals

LAYOUT = TallyLayout(ring_buckets=(5.0, 20.0), talk_buckets=(60.0,))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteCallStore]:
    store = SqliteCallStore(tmp_path / "calls.sqlite3", LAYOUT)
    yield store
    store.close()


@pytest.fixture
def tracker(store: SqliteCallStore, clock: FakeClock) -> CallTracker:
    return CallTracker(store, TrackerSettings(max_extensions=3), clock)


def event(event_type: str, abon: str = "108", **fields: Any) -> CallEvent:
    kind = EVENT_KINDS[event_type]
    return CallEvent(
        event_type=event_type,
        kind=kind,
        account=ACCOUNT,
        service=kind.service,
        abon=abon if kind.service is Service.VPBX else "",
        **fields,
    )


def ended(store: SqliteCallStore) -> dict[tuple[str, ...], float]:
    return {k: v for k, v in store.snapshot().counters.get(TallyKind.ENDED, {}).items() if v}


def test_dispositions_of_a_plain_answered_call(tracker: CallTracker) -> None:
    assert tracker.on_event(event("onInCallingStart", call_id="a")) is Disposition.OPENED
    assert tracker.on_event(event("onInCallingAnswered", call_id="a")) is Disposition.ANSWERED
    assert tracker.on_event(event("onInCallingAnswered", call_id="a")) is Disposition.DUPLICATE
    assert tracker.on_event(event("onInCallingEnd", call_id="a")) is Disposition.CLOSED
    assert tracker.on_event(event("onInCallingEnd", call_id="a")) is Disposition.DUPLICATE


def test_event_of_unknown_type_is_ignored_but_dates_the_feed(
    tracker: CallTracker, store: SqliteCallStore, clock: FakeClock
) -> None:
    unknown = CallEvent("unknown", None, ACCOUNT, Service.VPBX, "108")
    assert tracker.on_event(unknown) is Disposition.IGNORED
    assert store.snapshot().last_events == {(ACCOUNT, Service.VPBX): clock.now}
    assert store.snapshot().active == {}


def test_close_notice_after_the_answer_changes_nothing(
    tracker: CallTracker, store: SqliteCallStore
) -> None:
    tracker.on_event(event("onInCallingStart", call_id="b"))
    tracker.on_event(event("onInCallingAnswered", call_id="b"))
    assert tracker.on_event(event("onCloseIncomingNotice", call_id="b")) is Disposition.DUPLICATE
    assert sum(store.snapshot().active.values()) == 1


def test_start_copy_without_call_id_inside_the_window_opens_no_second_leg(
    tracker: CallTracker, store: SqliteCallStore, clock: FakeClock
) -> None:
    assert tracker.on_event(event("onInCallingStart", did="1")) is Disposition.OPENED
    clock.advance(59)
    assert tracker.on_event(event("onInCallingStart", did="1")) is Disposition.DUPLICATE
    clock.advance(2)
    assert tracker.on_event(event("onInCallingStart", did="1")) is Disposition.OPENED
    assert sum(store.snapshot().active.values()) == 2


def test_a_start_with_a_number_is_no_copy_of_an_open_start_from_a_withheld_number(
    tracker: CallTracker, store: SqliteCallStore, clock: FakeClock
) -> None:
    assert tracker.on_event(event("onInCallingStart")) is Disposition.OPENED
    clock.advance(5)
    assert tracker.on_event(event("onInCallingStart", did="1")) is Disposition.OPENED
    assert sum(store.snapshot().active.values()) == 2
    assert started(store) == 2


def test_caller_calling_back_right_after_a_missed_call_is_a_new_call(
    tracker: CallTracker, store: SqliteCallStore, clock: FakeClock
) -> None:
    tracker.on_event(event("onInCallingStart", did="1"))
    tracker.on_event(event("onInCallingMissed", did="1"))
    clock.advance(5)
    assert tracker.on_event(event("onInCallingStart", did="1")) is Disposition.OPENED
    assert tracker.on_event(event("onInCallingMissed", did="1")) is Disposition.CLOSED
    assert ended(store) == {(str(ACCOUNT), "vpbx", "inbound", "108", "missed"): 2}


def test_extensions_past_the_limit_are_counted_as_other(
    tracker: CallTracker, store: SqliteCallStore
) -> None:
    for extension in ("1", "2", "3", "4", "5"):
        tracker.on_event(event("onInCallingStart", abon=extension, call_id=extension))
        tracker.on_event(event("onInCallingEnd", abon=extension, call_id=extension))
    tracker.on_event(event("onInCallingStart", abon="1", call_id="again"))

    snapshot = store.snapshot()
    started = {k[3]: v for k, v in snapshot.counters[TallyKind.STARTED].items() if v}
    assert started == {"1": 2, "2": 1, "3": 1, OTHER_EXTENSION: 2}
    assert snapshot.counters[TallyKind.OVERFLOW] == {(str(ACCOUNT),): 4}


def test_expire_stale_closes_only_legs_past_max_duration(
    tracker: CallTracker, store: SqliteCallStore, clock: FakeClock
) -> None:
    tracker.on_event(event("onInCallingStart", call_id="old"))
    clock.advance(3 * 3600)
    tracker.on_event(event("onInCallingStart", call_id="new"))
    clock.advance(3600 + 1)

    assert tracker.expire_stale() == 1
    assert tracker.expire_stale() == 0
    assert ended(store) == {(str(ACCOUNT), "vpbx", "inbound", "108", "expired"): 1}
    assert sum(store.snapshot().active.values()) == 1


def test_closed_legs_are_forgotten_after_a_day(
    tracker: CallTracker, store: SqliteCallStore, clock: FakeClock
) -> None:
    tracker.on_event(event("onInCallingStart", call_id="z"))
    tracker.on_event(event("onInCallingEnd", call_id="z"))
    clock.advance(25 * 3600)
    tracker.expire_stale()
    # Forgotten: a copy this late is taken as an unmatched end.
    assert tracker.on_event(event("onInCallingEnd", call_id="z")) is Disposition.UNMATCHED


def test_fifty_extensions_with_a_limit_of_ten_give_ten_series_plus_other(
    make_exporter: Callable[..., Exporter],
) -> None:
    exporter = make_exporter(limits={"max_extensions": 10})
    for n in range(50):
        exporter.event("onInCallingStart", abon=str(200 + n), call_id=f"c{n}")
        exporter.event("onInCallingEnd", abon=str(200 + n), call_id=f"c{n}", billsec=1)

    samples = exporter.samples()
    extensions = {dict(labels)["extension"] for labels in samples["mcn_calls_started_total"]} - {""}
    assert len(extensions) == 11
    assert OTHER_EXTENSION in extensions
    totals = call_totals(samples)
    assert totals["mcn_extension_overflow_total"] == {f"account={ACCOUNT}": 80}
    started = totals["mcn_calls_started_total"]
    other = f"account={ACCOUNT},direction=inbound,extension=other,service=vpbx"
    assert started[other] == 40
    assert sum(started.values()) == 50


def test_an_extension_admitted_by_another_worker_keeps_its_own_series(
    store: SqliteCallStore, clock: FakeClock
) -> None:
    first = CallTracker(store, TrackerSettings(max_extensions=2), clock)
    second = CallTracker(store, TrackerSettings(max_extensions=2), clock)
    first.on_event(event("onInCallingStart", abon="201", call_id="a"))
    first.on_event(event("onInCallingStart", abon="202", call_id="b"))
    second.on_event(event("onInCallingStart", abon="999", call_id="c"))  # full: other
    second.on_event(event("onInCallingStart", abon="201", call_id="d"))

    started = store.snapshot().counters[TallyKind.STARTED]
    assert {labels[3]: n for labels, n in started.items()} == {"201": 2, "202": 1, "other": 1}


def test_an_admission_rolled_back_gives_its_place_to_the_next_extension(
    store: SqliteCallStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = CallTracker(store, TrackerSettings(max_extensions=1), clock)
    second = CallTracker(store, TrackerSettings(max_extensions=1), clock)

    def fail(*_: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(_SqliteTransaction, "record", fail)
        with pytest.raises(StoreUnavailable):
            first.on_event(event("onInCallingStart", abon="101", call_id="a"))
    second.on_event(event("onInCallingStart", abon="102", call_id="b"))
    first.on_event(event("onInCallingStart", abon="101", call_id="c"))

    started = store.snapshot().counters[TallyKind.STARTED]
    assert {labels[3]: n for labels, n in started.items()} == {"102": 1, OTHER_EXTENSION: 1}


def test_configured_extensions_keep_their_places_in_the_limit(
    make_exporter: Callable[..., Exporter],
) -> None:
    exporter = make_exporter(
        limits={"max_extensions": 2}, extensions={str(ACCOUNT): {"101": "A", "102": "B"}}
    )
    for extension in ("201", "202", "101", "102"):
        exporter.event("onInCallingStart", abon=extension, call_id=extension)

    started = call_totals(exporter.samples())["mcn_calls_started_total"]
    extensions = {key.split(",")[2].split("=")[1]: n for key, n in started.items()}
    assert extensions == {"101": 1, "102": 1, OTHER_EXTENSION: 2}


def test_ring_group_without_call_id_closes_legs_on_notices_without_the_caller(
    tracker: CallTracker, store: SqliteCallStore
) -> None:
    for extension in ("108", "109"):
        tracker.on_event(event("onInCallingStart", abon=extension, did="+421900111222"))
    tracker.on_event(event("onInCallingAnswered", abon="108", did="+421900111222"))
    assert tracker.on_event(event("onCloseIncomingNotice", abon="109")) is Disposition.CLOSED
    assert {labels.extension: n for labels, n in store.snapshot().active.items() if n} == {"108": 1}


def test_concurrent_calls_from_withheld_numbers_are_separate_calls(
    tracker: CallTracker, store: SqliteCallStore, clock: FakeClock
) -> None:
    assert tracker.on_event(event("InboundCallStart")) is Disposition.OPENED
    clock.advance(1)
    assert tracker.on_event(event("InboundCallStart")) is Disposition.OPENED
    assert tracker.on_event(event("InboundCallEnd")) is Disposition.CLOSED
    assert tracker.on_event(event("InboundCallEnd")) is Disposition.CLOSED
    snapshot = store.snapshot()
    assert sum(snapshot.active.values()) == 0
    assert snapshot.counters[TallyKind.ENDED] == {
        (str(ACCOUNT), "telephony", "inbound", "", "completed"): 2
    }


def started(store: SqliteCallStore) -> float:
    return sum(store.snapshot().counters.get(TallyKind.STARTED, {}).values())


def test_start_arriving_after_its_end_is_counted_once_and_opens_no_phantom_leg(
    tracker: CallTracker, store: SqliteCallStore, clock: FakeClock
) -> None:
    assert tracker.on_event(event("onInCallingEnd", did="+1", billsec=4)) is Disposition.UNMATCHED
    clock.advance(1)
    assert tracker.on_event(event("onInCallingStart", did="+1")) is Disposition.STARTED_LATE
    assert tracker.on_event(event("onInCallingStart", did="+1")) is Disposition.DUPLICATE
    assert sum(store.snapshot().active.values()) == 0
    assert started(store) == 1


@pytest.mark.parametrize("call_id", ["late", None])
def test_start_arriving_after_its_answer_counts_as_started_without_a_ring_time(
    tracker: CallTracker, store: SqliteCallStore, clock: FakeClock, call_id: str | None
) -> None:
    tracker.on_event(event("onInCallingAnswered", did="+1", call_id=call_id))
    clock.advance(0.5)
    assert tracker.on_event(event("onInCallingStart", did="+1", call_id=call_id)) is (
        Disposition.STARTED_LATE
    )
    clock.advance(30)
    assert tracker.on_event(event("onInCallingEnd", did="+1", call_id=call_id)) is (
        Disposition.CLOSED
    )

    assert started(store) == 1
    assert ended(store) == {(str(ACCOUNT), "vpbx", "inbound", "108", "answered"): 1}
    assert not store.snapshot().timings.get(TallyKind.RING)
    (talk,) = store.snapshot().timings[TallyKind.TALK]
    assert talk.total == 30.5


def test_an_old_leg_that_never_started_does_not_swallow_a_new_call(
    tracker: CallTracker, store: SqliteCallStore, clock: FakeClock
) -> None:
    tracker.on_event(event("onInCallingAnswered", did="+1"))  # its start and end never come
    clock.advance(4 * 3600 + 1)
    assert tracker.expire_stale() == 1
    clock.advance(600)
    assert tracker.on_event(event("onInCallingStart", did="+1")) is Disposition.OPENED
    assert sum(store.snapshot().active.values()) == 1


def test_a_closed_leg_with_call_id_absorbs_a_late_copy_after_23_hours_of_cleanups(
    tracker: CallTracker, store: SqliteCallStore, clock: FakeClock
) -> None:
    tracker.on_event(event("onInCallingStart", call_id="late"))
    tracker.on_event(event("onInCallingEnd", call_id="late", billsec=30))
    for _ in range(23):
        clock.advance(3600)
        tracker.expire_stale()  # each scrape runs the hourly-due cleanup first
    assert tracker.on_event(event("onInCallingEnd", call_id="late", billsec=30)) is (
        Disposition.DUPLICATE
    )
    assert tracker.on_event(event("onInCallingStart", call_id="late")) is Disposition.DUPLICATE
    assert ended(store) == {(str(ACCOUNT), "vpbx", "inbound", "108", "answered"): 1}
    assert not store.snapshot().counters.get(TallyKind.UNMATCHED, {}).get(("onInCallingEnd",))


def test_an_expired_leg_without_call_id_absorbs_its_end_after_cleanups(
    tracker: CallTracker, store: SqliteCallStore, clock: FakeClock
) -> None:
    tracker.on_event(event("onInCallingStart", did="+1"))
    clock.advance(4 * 3600 + 60)
    assert tracker.expire_stale() == 1
    for _ in range(3):
        # Past the cleanup interval and the duplicate window: cleanups run before the end.
        clock.advance(3600)
        assert tracker.expire_stale() == 0
    assert tracker.on_event(event("onInCallingEnd", did="+1", billsec=20000)) is (
        Disposition.DUPLICATE
    )
    assert ended(store) == {(str(ACCOUNT), "vpbx", "inbound", "108", "expired"): 1}
    assert not store.snapshot().counters.get(TallyKind.UNMATCHED, {}).get(("onInCallingEnd",))


def test_end_of_a_call_that_outlived_max_duration_changes_nothing_more(
    tracker: CallTracker, store: SqliteCallStore, clock: FakeClock
) -> None:
    tracker.on_event(event("onInCallingStart", did="+1"))
    clock.advance(4 * 3600 + 60)
    assert tracker.expire_stale() == 1
    clock.advance(3600)
    assert tracker.on_event(event("onInCallingEnd", did="+1", billsec=5000)) is (
        Disposition.DUPLICATE
    )
    assert ended(store) == {(str(ACCOUNT), "vpbx", "inbound", "108", "expired"): 1}


@pytest.mark.parametrize("call_id", ["long", None])
def test_end_after_max_duration_expires_its_leg_even_with_no_scrape_between(
    tracker: CallTracker, store: SqliteCallStore, clock: FakeClock, call_id: str | None
) -> None:
    tracker.on_event(event("onInCallingStart", did="+1", call_id=call_id))
    clock.advance(4 * 3600 + 1)
    assert tracker.on_event(event("onInCallingEnd", did="+1", call_id=call_id, billsec=14401)) is (
        Disposition.DUPLICATE
    )
    assert ended(store) == {(str(ACCOUNT), "vpbx", "inbound", "108", "expired"): 1}
    assert not store.snapshot().timings.get(TallyKind.TALK)
    assert tracker.expire_stale() == 0


def test_events_are_dated_by_the_clock_inside_the_transaction(
    store: SqliteCallStore, clock: FakeClock
) -> None:
    readings: list[float] = []

    def clock_with_lock_check() -> float:
        # The store's write lock is held while the tracker reads the clock.
        readings.append(float(store._writes.locked))
        return clock()

    CallTracker(store, TrackerSettings(), clock_with_lock_check).on_event(
        event("onInCallingStart", call_id="t")
    )
    assert readings == [1.0]
