"""The call-leg state machine on its own: a real store in a temporary file, a hand-moved clock."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.calls import CallTracker, Disposition, TrackerSettings
from exporter.events import EVENT_KINDS, CallEvent, Service
from exporter.legs import OTHER_EXTENSION, TallyKind, TallyLayout
from exporter.store import SqliteCallStore
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


def test_limit_is_shared_by_trackers_on_one_store(store: SqliteCallStore, clock: FakeClock) -> None:
    first = CallTracker(store, TrackerSettings(max_extensions=2), clock)
    second = CallTracker(store, TrackerSettings(max_extensions=2), clock)
    first.on_event(event("onInCallingStart", abon="1", call_id="x1"))
    second.on_event(event("onInCallingStart", abon="2", call_id="x2"))
    first.on_event(event("onInCallingStart", abon="3", call_id="x3"))

    extensions = {labels.extension for labels in store.snapshot().active}
    assert extensions == {"1", "2", OTHER_EXTENSION}


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
