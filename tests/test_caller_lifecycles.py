"""Callers, not legs: each caller's story gives exactly the caller metrics it implies, through
the HTTP handler (docs/design.md, "Callers and call-backs")."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from exporter.legs import TallyKind
from tests.conftest import ACCOUNT, SECRET, Exporter, Samples, call_totals

CALLER = "0903123456"
CALLER_INTERNATIONAL = "+421 903 123 456"
OTHER_CALLER = "0905654321"
MAIN = "0222202999"
SALES = "0850123456"
LINES = {MAIN: "Main line", SALES: "Sales"}
# Every metric of the caller level, and the samples of its histograms that sum up.
CALLER_METRICS = (
    "mcn_inbound_calls_total",
    "mcn_inbound_call_wait_seconds_count",
    "mcn_inbound_call_wait_seconds_sum",
    "mcn_inbound_calls_ringing",
    "mcn_missed_callers_waiting",
    "mcn_missed_callers_oldest_wait_seconds",
    "mcn_missed_callers_oldest_wait_wall_seconds",
    "mcn_missed_callers_resolved_total",
    "mcn_callback_seconds_count",
    "mcn_callback_seconds_sum",
    "mcn_repeat_missed_calls_total",
    "mcn_callback_attempts_total",
)
SETTLE = 30


def caller_totals(samples: Samples) -> dict[str, dict[str, float]]:
    """The non-zero caller samples, as {metric: {"k=v,k=v": value}}."""
    totals: dict[str, dict[str, float]] = {}
    for name in CALLER_METRICS:
        for labels, value in samples.get(name, {}).items():
            if value:
                totals.setdefault(name, {})[",".join(f"{k}={v}" for k, v in labels)] = value
    return totals


def calls(outcome: str, line: str = "Main line", period: str = "open") -> str:
    return f"account={ACCOUNT},line={line},outcome={outcome},period={period}"


def by_line(line: str = "Main line") -> str:
    return f"account={ACCOUNT},line={line}"


def resolved(resolution: str, line: str = "Main line", period: str = "open") -> str:
    return f"account={ACCOUNT},line={line},period={period},resolution={resolution}"


def wait(outcome: str, seconds: float, line: str = "Main line") -> dict[str, Any]:
    key = calls(outcome, line)
    return {
        "mcn_inbound_call_wait_seconds_count": {key: 1},
        "mcn_inbound_call_wait_seconds_sum": {key: seconds},
    }


def callback(resolution: str, seconds: float) -> dict[str, Any]:
    key = f"account={ACCOUNT},resolution={resolution}"
    return {"mcn_callback_seconds_count": {key: 1}, "mcn_callback_seconds_sum": {key: seconds}}


def legs_ended(samples: Samples) -> dict[str, float]:
    return {
        key.split("extension=")[1]: value
        for key, value in call_totals(samples).get("mcn_calls_ended_total", {}).items()
    }


@pytest.fixture
def phones(make_exporter: Callable[..., Exporter]) -> Exporter:
    """An exporter whose account names its two lines."""
    return make_exporter(accounts=[{"id": ACCOUNT, "secret": SECRET, "lines": LINES}])


def ring(phones: Exporter, *extensions: str, call_id: str | None = None, **fields: Any) -> None:
    for extension in extensions:
        phones.event("onInCallingStart", abon=extension, call_id=call_id, **{**CALL_FROM, **fields})


def event(phones: Exporter, event_type: str, extension: str, **fields: Any) -> None:
    phones.event(event_type, abon=extension, **{**CALL_FROM, **fields})


CALL_FROM = {"did": CALLER, "did_mcn": MAIN}


def missed_call(phones: Exporter, ring_for: float = 20, **fields: Any) -> None:
    """One phone rings, nobody answers; the call settles."""
    ring(phones, "201", **fields)
    phones.clock.advance(ring_for)
    event(phones, "onInCallingMissed", "201", **fields)
    phones.clock.advance(SETTLE)


# -- issue acceptance 1: ring groups --------------------------------------------------------------


@pytest.mark.parametrize("call_id", ["c1", None])
def test_a_ring_group_nobody_answers_is_one_missed_caller_and_three_missed_legs(
    phones: Exporter, call_id: str | None
) -> None:
    ring(phones, "201", "202", "203", call_id=call_id)
    assert caller_totals(phones.samples())["mcn_inbound_calls_ringing"] == {by_line(): 1}
    phones.clock.advance(15)
    for extension in ("201", "202", "203"):
        event(phones, "onInCallingMissed", extension, call_id=call_id)
    phones.clock.advance(SETTLE)

    samples = phones.samples()
    assert legs_ended(samples) == {
        "201,outcome=missed,service=vpbx": 1,
        "202,outcome=missed,service=vpbx": 1,
        "203,outcome=missed,service=vpbx": 1,
    }
    assert caller_totals(samples) == {
        "mcn_inbound_calls_total": {calls("missed"): 1},
        **wait("missed", 15),
        "mcn_missed_callers_waiting": {by_line(): 1},
        "mcn_missed_callers_oldest_wait_seconds": {f"account={ACCOUNT}": SETTLE},
        "mcn_missed_callers_oldest_wait_wall_seconds": {f"account={ACCOUNT}": SETTLE},
    }


def test_a_ring_group_answered_at_202_is_one_answered_caller(phones: Exporter) -> None:
    ring(phones, "201", "202", "203", call_id="c1")
    phones.clock.advance(6)
    event(phones, "onInCallingAnswered", "202", call_id="c1")
    # Counted at the answer: the caller's speed of answer is known then.
    assert caller_totals(phones.samples()) == {
        "mcn_inbound_calls_total": {calls("answered"): 1},
        **wait("answered", 6),
    }
    event(phones, "onCloseIncomingNotice", "201", call_id="c1", did=None)
    event(phones, "onCloseIncomingNotice", "203", call_id="c1", did=None)
    phones.clock.advance(120)
    event(phones, "onInCallingEnd", "202", call_id="c1", billsec=120)
    phones.clock.advance(SETTLE)

    samples = phones.samples()
    assert legs_ended(samples) == {
        "201,outcome=cancelled,service=vpbx": 1,
        "202,outcome=answered,service=vpbx": 1,
        "203,outcome=cancelled,service=vpbx": 1,
    }
    assert caller_totals(samples) == {
        "mcn_inbound_calls_total": {calls("answered"): 1},
        **wait("answered", 6),
    }


def test_a_caller_who_hangs_up_while_one_phone_rings_is_a_missed_caller(
    phones: Exporter,
) -> None:
    ring(phones, "201")
    phones.clock.advance(8)
    event(phones, "onCloseIncomingNotice", "201")
    assert "mcn_inbound_calls_total" not in caller_totals(phones.samples()), "not yet settled"
    phones.clock.advance(SETTLE)

    samples = phones.samples()
    assert legs_ended(samples) == {"201,outcome=cancelled,service=vpbx": 1}
    totals = caller_totals(samples)
    assert totals["mcn_inbound_calls_total"] == {calls("missed"): 1}
    assert totals["mcn_missed_callers_waiting"] == {by_line(): 1}


def test_lines_are_named_and_unknown_or_missing_company_numbers_are_not_labels(
    phones: Exporter,
) -> None:
    missed_call(phones, did_mcn="+421 850 123 456")
    missed_call(phones, did=OTHER_CALLER, did_mcn="0999888777")
    missed_call(phones, did="0911222333", did_mcn=None)

    totals = caller_totals(phones.samples())
    assert totals["mcn_inbound_calls_total"] == {
        calls("missed", "Sales"): 1,
        calls("missed", "other"): 1,
        calls("missed", ""): 1,
    }
    assert totals["mcn_missed_callers_waiting"] == {
        by_line("Sales"): 1,
        by_line("other"): 1,
        by_line(""): 1,
    }


def test_configured_accounts_and_lines_have_zero_series(phones: Exporter) -> None:
    samples = phones.samples()
    for line in ("Main line", "Sales", "", "other"):
        for outcome in ("answered", "missed", "expired"):
            for period in ("open", "closed"):
                key = (
                    ("account", str(ACCOUNT)),
                    ("line", line),
                    ("outcome", outcome),
                    ("period", period),
                )
                assert samples["mcn_inbound_calls_total"][key] == 0
        assert (
            samples["mcn_missed_callers_waiting"][(("account", str(ACCOUNT)), ("line", line))] == 0
        )
        assert (
            samples["mcn_inbound_calls_ringing"][(("account", str(ACCOUNT)), ("line", line))] == 0
        )
        assert (
            samples["mcn_repeat_missed_calls_total"][(("account", str(ACCOUNT)), ("line", line))]
            == 0
        )
    assert samples["mcn_missed_callers_oldest_wait_seconds"] == {(("account", str(ACCOUNT)),): 0}
    assert samples["mcn_callback_attempts_total"] == {
        (("account", str(ACCOUNT)), ("outcome", "answered")): 0,
        (("account", str(ACCOUNT)), ("outcome", "unanswered")): 0,
    }
    assert samples["mcn_callback_seconds_count"] == {
        (("account", str(ACCOUNT)), ("resolution", "called_again")): 0,
        (("account", str(ACCOUNT)), ("resolution", "called_back")): 0,
    }


# -- issue acceptance 2: hunt groups ---------------------------------------------------------------


@pytest.mark.parametrize("call_id", ["c1", None])
def test_a_hunt_group_is_one_answered_caller_whose_wait_spans_both_rings(
    phones: Exporter, call_id: str | None
) -> None:
    ring(phones, "201", call_id=call_id)
    phones.clock.advance(15)
    event(phones, "onInCallingMissed", "201", call_id=call_id)
    phones.clock.advance(5)
    ring(phones, "202", call_id=call_id)
    phones.clock.advance(4)
    event(phones, "onInCallingAnswered", "202", call_id=call_id)
    phones.clock.advance(60)
    event(phones, "onInCallingEnd", "202", call_id=call_id, billsec=60)
    phones.clock.advance(SETTLE)

    samples = phones.samples()
    assert legs_ended(samples) == {
        "201,outcome=missed,service=vpbx": 1,
        "202,outcome=answered,service=vpbx": 1,
    }
    assert caller_totals(samples) == {
        "mcn_inbound_calls_total": {calls("answered"): 1},
        **wait("answered", 24),
    }


# -- issue acceptance 3: call-backs ---------------------------------------------------------------


def test_a_missed_caller_called_back_from_another_extension_in_international_format(
    phones: Exporter,
) -> None:
    missed_call(phones)
    assert caller_totals(phones.samples())["mcn_missed_callers_waiting"] == {by_line(): 1}
    phones.clock.advance(570)  # 600 s after the missed call ended
    phones.event("onOutCallingStart", abon="205", did=CALLER_INTERNATIONAL)
    phones.event("onOutCallingAnswered", abon="205", did=CALLER_INTERNATIONAL)
    phones.clock.advance(90)
    phones.event("onOutCallingEnd", abon="205", did=CALLER_INTERNATIONAL, billsec=90)

    totals = caller_totals(phones.samples())
    assert "mcn_missed_callers_waiting" not in totals
    assert totals["mcn_missed_callers_resolved_total"] == {resolved("called_back"): 1}
    assert totals["mcn_callback_attempts_total"] == {f"account={ACCOUNT},outcome=answered": 1}
    assert {k: v for k, v in totals.items() if k.startswith("mcn_callback_seconds")} == callback(
        "called_back", 600
    )


def test_a_missed_caller_who_calls_again_and_is_answered_is_called_again(
    phones: Exporter,
) -> None:
    missed_call(phones)
    phones.clock.advance(240)
    ring(phones, "202", did="+421903123456")
    phones.clock.advance(3)
    event(phones, "onInCallingAnswered", "202")

    totals = caller_totals(phones.samples())
    assert "mcn_missed_callers_waiting" not in totals
    assert totals["mcn_inbound_calls_total"] == {calls("missed"): 1, calls("answered"): 1}
    assert totals["mcn_missed_callers_resolved_total"] == {resolved("called_again"): 1}
    assert {k: v for k, v in totals.items() if k.startswith("mcn_callback_seconds")} == callback(
        "called_again", SETTLE + 240 + 3
    )


def test_missed_twice_and_never_reached_waits_once_then_gives_up(phones: Exporter) -> None:
    missed_call(phones)
    phones.clock.advance(600)
    missed_call(phones)
    # An outbound call to them nobody answers: an attempt, and they still wait.
    phones.event("onOutCallingStart", abon="205", did=CALLER)
    phones.clock.advance(25)
    phones.event("onOutCallingMissed", abon="205", did=CALLER)
    totals = caller_totals(phones.samples())
    assert totals["mcn_missed_callers_waiting"] == {by_line(): 1}
    assert totals["mcn_repeat_missed_calls_total"] == {by_line(): 1}
    assert totals["mcn_inbound_calls_total"] == {calls("missed"): 2}
    assert totals["mcn_callback_attempts_total"] == {f"account={ACCOUNT},outcome=unanswered": 1}

    phones.clock.advance(72 * 3600)
    totals = caller_totals(phones.samples())
    assert "mcn_missed_callers_waiting" not in totals
    assert totals["mcn_missed_callers_resolved_total"] == {resolved("gave_up"): 1}
    assert "mcn_callback_seconds_count" not in totals, "giving up observes no call-back time"


def test_withheld_callers_are_counted_but_do_not_wait(phones: Exporter) -> None:
    missed_call(phones, did=None)
    totals = caller_totals(phones.samples())
    assert totals["mcn_inbound_calls_total"] == {calls("missed"): 1}
    assert "mcn_missed_callers_waiting" not in totals


def test_outbound_calls_to_anyone_else_count_nowhere(phones: Exporter) -> None:
    missed_call(phones)
    phones.event("onOutCallingStart", abon="205", did=OTHER_CALLER)
    phones.event("onOutCallingAnswered", abon="205", did=OTHER_CALLER)
    totals = caller_totals(phones.samples())
    assert totals["mcn_missed_callers_waiting"] == {by_line(): 1}
    assert "mcn_callback_attempts_total" not in totals


def test_a_call_back_known_only_by_its_end_and_a_lost_start_attempt(phones: Exporter) -> None:
    missed_call(phones)
    # Its start lost, an outbound end with billsec 0: an attempt nobody answered.
    phones.event("onOutCallingEnd", abon="206", did=CALLER_INTERNATIONAL, billsec=0)
    assert caller_totals(phones.samples())["mcn_callback_attempts_total"] == {
        f"account={ACCOUNT},outcome=unanswered": 1
    }
    # No answer event, but an end with billsec: the callee answered.
    phones.event("onOutCallingStart", abon="205", did=CALLER)
    phones.clock.advance(100)
    phones.event("onOutCallingEnd", abon="205", did=CALLER, billsec=60)

    totals = caller_totals(phones.samples())
    assert "mcn_missed_callers_waiting" not in totals
    assert totals["mcn_missed_callers_resolved_total"] == {resolved("called_back"): 1}
    assert totals["mcn_callback_attempts_total"] == {
        f"account={ACCOUNT},outcome=unanswered": 1,
        f"account={ACCOUNT},outcome=answered": 1,
    }


def test_a_call_whose_leg_expired_unanswered_is_expired_and_nobody_waits(
    phones: Exporter,
) -> None:
    ring(phones, "201")
    phones.clock.advance(4 * 3600 + 1)
    assert "mcn_inbound_calls_ringing" not in caller_totals(phones.samples()), "its leg expired"
    phones.clock.advance(SETTLE)

    totals = caller_totals(phones.samples())
    assert totals["mcn_inbound_calls_total"] == {calls("expired"): 1}
    assert "mcn_inbound_call_wait_seconds_count" not in totals
    assert "mcn_missed_callers_waiting" not in totals


# -- issue acceptance 5: no phone number leaves the exporter --------------------------------------


def test_no_phone_number_in_metrics_logs_or_store_file(
    phones: Exporter, caplog: pytest.LogCaptureFixture
) -> None:
    numbers = ("903123456", "222202999", "850123456")
    caplog.set_level(logging.INFO)
    missed_call(phones)
    missed_call(phones, did_mcn=SALES, call_id="c9")
    ring(phones, "202", "203")  # still ringing: its number is in the store, as a digest
    body = phones.client.simulate_get("/metrics").text
    phones.deps.store.close()

    store = Path(phones.deps.config.store.path)
    files = [store, *(Path(f"{store}{suffix}") for suffix in ("-wal", "-shm"))]
    stored = b"".join(path.read_bytes() for path in files if path.exists())
    for number in numbers:
        assert number not in body
        assert number not in caplog.text
        assert number.encode() not in stored
        # Nor in the other text encoding SQLite can store.
        assert number.encode("utf-16-le") not in stored
    assert "Main line" in body, "the line's name is the label"


# -- opening hours: waits in open time ---------------------------------------------------------


FRIDAY_EVENING = datetime(2026, 11, 27, 17, 30, tzinfo=UTC).timestamp()
MONDAY_OPENING = datetime(2026, 11, 30, 8, 0, tzinfo=UTC).timestamp()
HOURS = {"timezone": "UTC", "open": {"mon-fri": "08:00-17:00"}}


def test_a_call_missed_while_closed_waits_only_in_open_time(
    make_exporter: Callable[..., Exporter],
) -> None:
    phones = make_exporter(
        accounts=[{"id": ACCOUNT, "secret": SECRET, "lines": LINES}], hours=HOURS
    )
    phones.clock.now = FRIDAY_EVENING
    missed_call(phones)
    totals = caller_totals(phones.samples())
    assert totals["mcn_inbound_calls_total"] == {calls("missed", period="closed"): 1}
    assert "mcn_missed_callers_oldest_wait_seconds" not in totals, "closed: the wait is 0"

    phones.clock.now = MONDAY_OPENING
    totals = caller_totals(phones.samples())
    assert "mcn_missed_callers_oldest_wait_seconds" not in totals, "still 0 at the opening"
    wall = MONDAY_OPENING - (FRIDAY_EVENING + 20)
    assert totals["mcn_missed_callers_oldest_wait_wall_seconds"] == {f"account={ACCOUNT}": wall}

    phones.clock.advance(600)
    assert caller_totals(phones.samples())["mcn_missed_callers_oldest_wait_seconds"] == {
        f"account={ACCOUNT}": 600
    }
    phones.event("onOutCallingStart", abon="205", did=CALLER)
    phones.event("onOutCallingAnswered", abon="205", did=CALLER)
    samples = phones.samples()
    totals = caller_totals(samples)
    assert totals["mcn_missed_callers_resolved_total"] == {
        resolved("called_back", period="closed"): 1
    }
    assert {k: v for k, v in totals.items() if k.startswith("mcn_callback_seconds")} == callback(
        "called_back", 600
    )
    buckets = {
        dict(labels)["le"]: value
        for labels, value in samples["mcn_callback_seconds_bucket"].items()
        if dict(labels)["resolution"] == "called_back"
    }
    assert buckets["300.0"] == 0
    assert buckets["900.0"] == 1


def test_events_sweep_for_calls_that_are_over_at_most_once_a_second(phones: Exporter) -> None:
    """Between scrapes, events settle callers' calls, but not every one of them sweeps."""

    def missed_callers_in_the_store() -> float:
        counters = phones.deps.store.snapshot().counters.get(TallyKind.INBOUND_CALLS, {})
        return sum(value for labels, value in counters.items() if "missed" in labels)

    ring(phones, "201")
    event(phones, "onInCallingMissed", "201")
    phones.clock.advance(SETTLE - 0.2)
    event(phones, "onOutCallingStart", "301", did=OTHER_CALLER)  # sweeps: nothing is due yet
    phones.clock.advance(0.5)  # the missed call is due now
    event(phones, "onOutCallingMissed", "301", did=OTHER_CALLER)
    assert missed_callers_in_the_store() == 0, "swept again within the second"
    phones.clock.advance(0.6)
    event(phones, "onOutCallingStart", "302", did=OTHER_CALLER)
    assert missed_callers_in_the_store() == 1
