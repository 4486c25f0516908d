"""Metric declarations and rendering: names, zero series, buckets, the multiprocess merge."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from exporter import __version__
from exporter.config import DEFAULT_RING_BUCKETS, DEFAULT_TALK_BUCKETS
from exporter.legs import TallyKind, TallyLayout
from exporter.metrics import WorkerFilesCollector, initial_rows
from exporter.rejections import COUNTED_REASONS
from exporter.store import SqliteCallStore
from tests.conftest import ACCOUNT, Exporter, Samples, ServerProcess

EXTENSIONS = {
    str(ACCOUNT): {
        "101": "Reception",
        "102": {"name": "Sales", "labels": {"team": "sales", "floor": "2"}},
    }
}


def value(exporter: Exporter, metric: str, **labels: str) -> float | None:
    return exporter.deps.scrape.registry.get_sample_value(metric, labels)


def test_series_of_configured_accounts_and_extensions_start_at_zero(
    make_exporter: Callable[..., Exporter],
) -> None:
    exporter = make_exporter(extensions=EXTENSIONS)
    leg = {"account": str(ACCOUNT), "service": "vpbx", "direction": "inbound", "extension": "102"}
    telephony = {**leg, "service": "telephony", "extension": ""}
    assert value(exporter, "mcn_calls_started_total", **leg) == 0
    assert value(exporter, "mcn_calls_ended_total", **leg, outcome="missed") == 0
    assert value(exporter, "mcn_calls_ended_total", **telephony, outcome="completed") == 0
    assert value(exporter, "mcn_active_calls", **leg) == 0
    ring = {"account": str(ACCOUNT), "service": "vpbx", "direction": "inbound"}
    assert value(exporter, "mcn_call_ring_seconds_count", **ring, outcome="missed") == 0
    telephony = {"account": str(ACCOUNT), "service": "telephony", "direction": "inbound"}
    assert value(exporter, "mcn_call_talk_seconds_count", **telephony) == 0
    # Telephony reports no answer, so it never has a ring time: no series that stays at 0.
    assert value(exporter, "mcn_call_ring_seconds_count", **telephony, outcome="expired") is None
    assert value(exporter, "mcn_call_ring_seconds_bucket", **ring, outcome="missed", le="20.0") == 0
    assert value(exporter, "mcn_extension_overflow_total", account=str(ACCOUNT)) == 0
    assert value(exporter, "mcn_call_events_unmatched_total", event_type="onInCallingEnd") == 0
    assert value(exporter, "mcn_webhook_rejected_total", reason="unauthorized") == 0
    assert (
        value(exporter, "mcn_webhook_events_total", service="vpbx", event_type="onInCallingMissed")
        == 0
    )


CALLER_FAMILIES = {
    "mcn_inbound_calls_total": "counter",
    "mcn_inbound_call_wait_seconds": "histogram",
    "mcn_inbound_calls_ringing": "gauge",
    "mcn_missed_callers_waiting": "gauge",
    "mcn_missed_callers_oldest_wait_seconds": "gauge",
    "mcn_missed_callers_oldest_wait_wall_seconds": "gauge",
    "mcn_missed_callers_resolved_total": "counter",
    "mcn_callback_seconds": "histogram",
    "mcn_repeat_missed_calls_total": "counter",
    "mcn_callback_attempts_total": "counter",
}


def test_the_caller_families_are_declared_once_with_their_types(exporter: Exporter) -> None:
    text = exporter.client.simulate_get("/metrics").text
    types = [line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE ")]
    names = [name for name, _ in types]
    assert len(names) == len(set(names)), "a family is rendered twice"
    assert {name: kind for name, kind in types if name in CALLER_FAMILIES} == CALLER_FAMILIES


def test_caller_histograms_have_the_ring_and_callback_buckets(exporter: Exporter) -> None:
    account = str(ACCOUNT)
    wait = {"account": account, "line": "", "outcome": "missed", "period": "open"}
    for ring_bound in DEFAULT_RING_BUCKETS:
        le = str(ring_bound)
        assert value(exporter, "mcn_inbound_call_wait_seconds_bucket", **wait, le=le) == 0
    callback = {"account": account, "resolution": "called_back"}
    for bound in ("300.0", "900.0", "1800.0", "3600.0", "7200.0", "14400.0", "28800.0"):
        assert value(exporter, "mcn_callback_seconds_bucket", **callback, le=bound) == 0
    for bound in ("86400.0", "259200.0", "+Inf"):
        assert value(exporter, "mcn_callback_seconds_bucket", **callback, le=bound) == 0


def test_no_created_series(exporter: Exporter) -> None:
    exporter.event("onInCallingStart", abon="1")
    text = exporter.client.simulate_get("/metrics").text
    assert "_created" not in text
    assert "mcn_webhook_events_total" in text


def test_ring_time_lands_in_its_bucket_and_the_20s_service_level_is_a_lookup(
    exporter: Exporter,
) -> None:
    exporter.event("onInCallingStart", abon="1", call_id="a")
    exporter.clock.advance(7)
    exporter.event("onInCallingAnswered", abon="1", call_id="a")
    ring = {"account": str(ACCOUNT), "service": "vpbx", "direction": "inbound"}
    ring["outcome"] = "answered"
    exporter.event("onInCallingEnd", abon="1", call_id="a")

    buckets = {
        le: value(exporter, "mcn_call_ring_seconds_bucket", **ring, le=le)
        for le in ("5.0", "10.0", "20.0", "+Inf")
    }
    assert buckets == {"5.0": 0, "10.0": 1, "20.0": 1, "+Inf": 1}


def test_observations_on_a_bucket_bound_count_in_that_bucket(exporter: Exporter) -> None:
    """`le` means at most: a ring of exactly 20 s is answered within 20 s."""
    rings, talks = [5, 20, 60, 61], [5, 30, 3600, 3601]
    for n, (ring, talk) in enumerate(zip(rings, talks, strict=True)):
        exporter.event("onInCallingStart", abon="1", call_id=f"c{n}")
        exporter.clock.advance(ring)
        exporter.event("onInCallingAnswered", abon="1", call_id=f"c{n}")
        exporter.event("onInCallingEnd", abon="1", call_id=f"c{n}", billsec=talk)

    leg = {"account": str(ACCOUNT), "service": "vpbx", "direction": "inbound"}
    for metric, labels, observed, bounds in (
        ("mcn_call_ring_seconds", {**leg, "outcome": "answered"}, rings, DEFAULT_RING_BUCKETS),
        ("mcn_call_talk_seconds", leg, talks, DEFAULT_TALK_BUCKETS),
    ):
        for bound in (*bounds, math.inf):
            le = "+Inf" if bound == math.inf else str(bound)
            expected = sum(1 for seconds in observed if seconds <= bound)
            assert value(exporter, f"{metric}_bucket", **labels, le=le) == expected, (metric, le)
        assert value(exporter, f"{metric}_sum", **labels) == sum(observed)
        assert value(exporter, f"{metric}_count", **labels) == len(observed)


def test_histograms_are_rebinned_when_the_buckets_change(tmp_path: Path) -> None:
    path = tmp_path / "calls.sqlite3"
    old = TallyLayout(ring_buckets=(5.0, 20.0), talk_buckets=(60.0,))
    store = SqliteCallStore(path, old)
    with store.transaction() as tx:
        from exporter.events import Direction, Service
        from exporter.legs import LegEnded, LegLabels, Outcome

        labels = LegLabels(ACCOUNT, Service.VPBX, Direction.INBOUND, "1")
        for seconds in (3.0, 12.0, 50.0):
            tx.record([LegEnded(labels, Outcome.MISSED, seconds, None)])
    store.close()

    from exporter.metrics import StoreCollector

    new = TallyLayout(ring_buckets=(10.0, 30.0, 60.0), talk_buckets=(60.0,))
    reopened = SqliteCallStore(path, new)
    (ring,) = (m for m in StoreCollector(reopened).collect() if m.name == "mcn_call_ring_seconds")
    counts = {s.labels["le"]: s.value for s in ring.samples if s.name.endswith("_bucket")}
    # Kept under the old bounds: 3 s under le=5, 12 s under le=20, 50 s under +Inf. Each counts
    # from the first new bound at or above its old one; precision finer than that is gone.
    assert counts == {"10.0": 1, "30.0": 2, "60.0": 2, "+Inf": 3}
    reopened.close()


def test_extension_label_on_histograms_when_switched_on(
    make_exporter: Callable[..., Exporter],
) -> None:
    exporter = make_exporter(metrics={"histogram_extension_label": True})
    exporter.event("onInCallingStart", abon="7", did="+1")
    exporter.event("onInCallingMissed", abon="7", did="+1")
    labels = {"account": str(ACCOUNT), "service": "vpbx", "direction": "inbound"}
    assert (
        value(exporter, "mcn_call_ring_seconds_count", **labels, outcome="missed", extension="7")
        == 1
    )
    assert value(exporter, "mcn_call_ring_seconds_count", **labels, outcome="missed") is None


def test_active_calls_drop_to_zero_rather_than_vanish(exporter: Exporter) -> None:
    exporter.event("onOutCallingStart", abon="5", did="+1")
    exporter.event("onOutCallingEnd", abon="5", did="+1", billsec=0)
    labels = {"account": str(ACCOUNT), "service": "vpbx", "direction": "outbound", "extension": "5"}
    assert value(exporter, "mcn_active_calls", **labels) == 0


def test_last_event_timestamp_is_the_receipt_time(exporter: Exporter) -> None:
    exporter.event("InboundCallStart", did="+1")
    labels = {"account": str(ACCOUNT), "service": "telephony"}
    assert value(exporter, "mcn_last_event_timestamp_seconds", **labels) == exporter.clock.now
    assert (
        value(exporter, "mcn_last_event_timestamp_seconds", account=str(ACCOUNT), service="vpbx")
        is None
    )


def test_extension_info_carries_names_and_the_union_of_extra_labels(
    make_exporter: Callable[..., Exporter],
) -> None:
    exporter = make_exporter(extensions=EXTENSIONS)
    assert (
        value(
            exporter,
            "mcn_extension_info",
            account=str(ACCOUNT),
            extension="102",
            name="Sales",
            team="sales",
            floor="2",
        )
        == 1
    )
    assert (
        value(
            exporter,
            "mcn_extension_info",
            account=str(ACCOUNT),
            extension="101",
            name="Reception",
            team="",
            floor="",
        )
        == 1
    )
    assert value(exporter, "mcn_exporter_build_info", version=__version__) == 1


def test_initial_rows_cover_every_outcome_of_each_configured_leg(tmp_path: Path) -> None:
    from exporter.config import parse_config
    from tests.conftest import base_config

    config = parse_config(base_config(tmp_path, extensions={str(ACCOUNT): {"9": "Nine"}}))
    layout = TallyLayout((20.0,), (60.0,))
    ended = {row.labels for row in initial_rows(config, layout) if row.kind is TallyKind.ENDED}
    assert {labels[4] for labels in ended if labels[3] == "9" and labels[2] == "inbound"} == {
        "answered",
        "missed",
        "cancelled",
        "expired",
    }
    assert {labels[4] for labels in ended if labels[3] == "9" and labels[2] == "outbound"} == {
        "answered",
        "unanswered",
        "expired",
    }


def write_counter_file(path: Path, reason: str, count: float) -> None:
    values = MmapedDict(str(path))
    key = mmap_key(
        "mcn_webhook_rejected",
        "mcn_webhook_rejected_total",
        ["reason"],
        [reason],
        "Webhook requests refused.",
    )
    values.write_value(key, count, 0)
    values.close()


def test_worker_files_are_summed_and_broken_ones_skipped(tmp_path: Path) -> None:
    write_counter_file(tmp_path / "counter_100.db", "invalid", 2)
    write_counter_file(tmp_path / "counter_101.db", "invalid", 3)
    (tmp_path / "counter_102.db").write_bytes(b"\x40\x00\x00\x00" + b"\x00" * 60)  # short
    (tmp_path / "counter_103.db").write_bytes(b"")

    (metric,) = WorkerFilesCollector(str(tmp_path)).collect()
    assert [(s.name, s.labels, s.value) for s in metric.samples] == [
        ("mcn_webhook_rejected_total", {"reason": "invalid"}, 5.0)
    ]
    assert not math.isnan(metric.samples[0].value)


def test_rejection_series_are_the_counted_reasons_and_start_at_zero(exporter: Exporter) -> None:
    series = exporter.samples()["mcn_webhook_rejected_total"]
    assert series == {(("reason", str(reason)),): 0 for reason in COUNTED_REASONS}
    assert {labels[0][1] for labels in series} == {
        *("malformed", "invalid", "unauthorized", "unknown_account", "too_large"),
        *("method_not_allowed", "store_unavailable"),
    }


# -- opening hours -------------------------------------------------------------------------------

OFFICE = ZoneInfo("Europe/Bratislava")
OFFICE_HOURS = {
    "timezone": "Europe/Bratislava",
    "open": {"mon-fri": "08:00-12:00, 12:30-17:00", "sat": "09:00-12:00"},
    "holidays": {"country": "SK"},
}
SECOND_ACCOUNT = 20456


def office_time(year: int, month: int, day: int, hour: int, minute: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=OFFICE).timestamp()


def opening(samples: Samples, account: int = ACCOUNT) -> tuple[float | None, float | None]:
    """mcn_open and mcn_open_next_change_timestamp_seconds of an account (None: absent)."""
    key = (("account", str(account)),)
    return (
        samples.get("mcn_open", {}).get(key),
        samples.get("mcn_open_next_change_timestamp_seconds", {}).get(key),
    )


@pytest.fixture
def office(make_exporter: Callable[..., Exporter]) -> Exporter:
    return make_exporter(hours=OFFICE_HOURS)


def test_without_hours_an_account_is_open_with_no_next_change(exporter: Exporter) -> None:
    samples = exporter.samples()
    assert opening(samples) == (1, None)
    assert "mcn_open_next_change_timestamp_seconds" not in samples


def test_closed_on_friday_evening_until_saturday_morning(office: Exporter) -> None:
    office.clock.now = office_time(2026, 11, 27, 18, 30)
    assert opening(office.samples()) == (0, office_time(2026, 11, 28, 9))


def test_closed_on_saturday_afternoon_until_monday_morning(office: Exporter) -> None:
    office.clock.now = office_time(2026, 11, 28, 12)
    assert opening(office.samples()) == (0, office_time(2026, 11, 30, 8))


def test_open_on_monday_morning_until_the_lunch_break(office: Exporter) -> None:
    office.clock.now = office_time(2026, 11, 30, 9, 15)
    assert opening(office.samples()) == (1, office_time(2026, 11, 30, 12))


def test_the_gauge_follows_the_clock_of_each_scrape(office: Exporter) -> None:
    office.clock.now = office_time(2026, 11, 30, 7, 59)
    assert opening(office.samples()) == (0, office_time(2026, 11, 30, 8))
    office.clock.advance(60)
    assert opening(office.samples()) == (1, office_time(2026, 11, 30, 12))


def test_closed_on_a_public_holiday_until_after_christmas(office: Exporter) -> None:
    # Christmas Eve, a Thursday; then Christmas Day, St Stephen's on the Saturday, and Sunday.
    office.clock.now = office_time(2026, 12, 24, 10)
    assert opening(office.samples()) == (0, office_time(2026, 12, 28, 8))


def test_each_account_has_its_series_from_the_first_scrape(
    make_exporter: Callable[..., Exporter],
) -> None:
    night = {"timezone": "UTC", "open": {"mon-sun": "22:00-06:00"}}
    exporter = make_exporter(
        hours=OFFICE_HOURS,
        accounts=[
            {"id": ACCOUNT, "secret": "SecretToken"},
            {"id": SECOND_ACCOUNT, "secret": "other", "hours": night},
        ],
    )
    exporter.clock.now = office_time(2026, 11, 27, 18, 30)  # 17:30 UTC
    samples = exporter.samples()
    assert opening(samples, ACCOUNT) == (0, office_time(2026, 11, 28, 9))
    assert opening(samples, SECOND_ACCOUNT) == (
        0,
        datetime(2026, 11, 27, 22, tzinfo=UTC).timestamp(),
    )


@pytest.mark.server
def test_every_worker_of_a_real_server_reports_the_hours(
    start_server: Callable[..., ServerProcess],
) -> None:
    # Open round the clock but for one closed day some months ahead: the next change is known
    # and cannot come during the test.
    closed_day = datetime.now(UTC).date() + timedelta(days=200)
    hours = {"timezone": "UTC", "open": {"mon-sun": "00:00-24:00"}}
    server = start_server(workers=2, hours={**hours, "holidays": {"closed": [str(closed_day)]}})
    closes = datetime.combine(closed_day, time(), UTC).timestamp()
    # Each scrape may land on either worker: every one must have the series.
    for _ in range(6):
        assert opening(server.samples()) == (1, closes)
