"""Each call lifecycle (docs/design.md, "Legs") gives exactly the metrics it implies, through
the HTTP handler."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import ACCOUNT, Exporter, all_webhooks, call_totals

CALLER = "+421222202999"
OTHER_CALLER = "+421905123456"


def leg(direction: str = "inbound", extension: str = "108", service: str = "vpbx") -> str:
    return f"account={ACCOUNT},direction={direction},extension={extension},service={service}"


def ended(
    outcome: str, direction: str = "inbound", extension: str = "108", service: str = "vpbx"
) -> str:
    return (
        f"account={ACCOUNT},direction={direction},extension={extension},"
        f"outcome={outcome},service={service}"
    )


def timing(direction: str = "inbound", service: str = "vpbx", outcome: str | None = None) -> str:
    middle = f",outcome={outcome}" if outcome else ""
    return f"account={ACCOUNT},direction={direction}{middle},service={service}"


def ring(
    outcome: str, seconds: float, count: int = 1, direction: str = "inbound"
) -> dict[str, Any]:
    key = timing(direction, outcome=outcome)
    return {
        "mcn_call_ring_seconds_count": {key: count},
        "mcn_call_ring_seconds_sum": {key: seconds},
    }


def talk(seconds: float, direction: str = "inbound", service: str = "vpbx") -> dict[str, Any]:
    key = timing(direction, service)
    return {"mcn_call_talk_seconds_count": {key: 1}, "mcn_call_talk_seconds_sum": {key: seconds}}


def active(exporter: Exporter) -> dict[str, float]:
    return call_totals(exporter.samples()).get("mcn_active_calls", {})


def test_every_sample_webhook_is_taken(exporter: Exporter) -> None:
    for path in all_webhooks():
        result = exporter.post(path.read_bytes(), content_type="text/plain")
        assert result.status_code == 200, (path.name, result.text)
        assert result.json == {"status": "ok"}


def test_inbound_call_answered_gives_ring_time_and_talk_time_from_billsec(
    exporter: Exporter,
) -> None:
    exporter.event("onInCallingStart", abon="108", did=CALLER, call_id="c1")
    assert active(exporter) == {leg(): 1}
    exporter.clock.advance(7)
    exporter.event("onInCallingAnswered", abon=108, did=CALLER, call_id="c1")
    exporter.clock.advance(60)
    exporter.event("onInCallingEnd", abon="108", did=CALLER, call_id="c1", billsec=58)

    assert call_totals(exporter.samples()) == {
        "mcn_calls_started_total": {leg(): 1},
        "mcn_calls_ended_total": {ended("answered"): 1},
        **ring("answered", 7),
        **talk(58),
    }


def test_answered_call_without_billsec_talks_from_answer_to_end(exporter: Exporter) -> None:
    exporter.event("onInCallingStart", abon="108", did=CALLER)
    exporter.clock.advance(4)
    exporter.event("onInCallingAnswered", abon="108", did=CALLER)
    exporter.clock.advance(30)
    exporter.event("onInCallingEnd", abon="108", did=CALLER)

    assert call_totals(exporter.samples()) == {
        "mcn_calls_started_total": {leg(): 1},
        "mcn_calls_ended_total": {ended("answered"): 1},
        **ring("answered", 4),
        **talk(30),
    }


def test_end_without_answered_event_counts_as_answered_and_billsec_dates_the_answer(
    exporter: Exporter,
) -> None:
    exporter.event("onInCallingStart", abon="108", did=CALLER)
    exporter.clock.advance(50)
    exporter.event("onInCallingEnd", abon="108", did=CALLER, billsec=40)

    assert call_totals(exporter.samples()) == {
        "mcn_calls_started_total": {leg(): 1},
        "mcn_calls_ended_total": {ended("answered"): 1},
        **ring("answered", 10),
        **talk(40),
    }


def test_end_without_answered_event_or_billsec_talks_from_start_and_has_no_ring_time(
    exporter: Exporter,
) -> None:
    exporter.event("onInCallingStart", abon="108", did=CALLER)
    exporter.clock.advance(30)
    exporter.event("onInCallingEnd", abon="108", did=CALLER)

    assert call_totals(exporter.samples()) == {
        "mcn_calls_started_total": {leg(): 1},
        "mcn_calls_ended_total": {ended("answered"): 1},
        **talk(30),
    }


def test_inbound_end_with_zero_billsec_and_no_answer_is_a_missed_call(exporter: Exporter) -> None:
    exporter.event("onInCallingStart", abon="108", did=CALLER)
    exporter.clock.advance(25)
    exporter.event("onInCallingEnd", abon="108", did=CALLER, billsec=0)

    assert call_totals(exporter.samples()) == {
        "mcn_calls_started_total": {leg(): 1},
        "mcn_calls_ended_total": {ended("missed"): 1},
        **ring("missed", 25),
    }


def test_missed_call(exporter: Exporter) -> None:
    exporter.event("onInCallingStart", abon="104", did=CALLER)
    exporter.clock.advance(12)
    exporter.event("onInCallingMissed", abon="104", did=CALLER)

    assert call_totals(exporter.samples()) == {
        "mcn_calls_started_total": {leg(extension="104"): 1},
        "mcn_calls_ended_total": {ended("missed", extension="104"): 1},
        **ring("missed", 12),
    }


def test_ring_group_one_extension_answers_the_others_are_cancelled(exporter: Exporter) -> None:
    for extension in ("108", "109", "110"):
        exporter.event("onInCallingStart", abon=extension, did=CALLER, call_id="rg")
    exporter.clock.advance(5)
    exporter.event("onInCallingAnswered", abon="108", did=CALLER, call_id="rg")
    exporter.event("onCloseIncomingNotice", abon=109, call_id="rg")
    exporter.event("onCloseIncomingNotice", abon=110, call_id="rg")
    assert active(exporter) == {leg(): 1}
    exporter.clock.advance(31)
    exporter.event("onInCallingEnd", abon="108", did=CALLER, call_id="rg", billsec=30)

    assert call_totals(exporter.samples()) == {
        "mcn_calls_started_total": {leg(extension=e): 1 for e in ("108", "109", "110")},
        "mcn_calls_ended_total": {
            ended("answered"): 1,
            ended("cancelled", extension="109"): 1,
            ended("cancelled", extension="110"): 1,
        },
        "mcn_call_ring_seconds_count": {
            timing(outcome="answered"): 1,
            timing(outcome="cancelled"): 2,
        },
        "mcn_call_ring_seconds_sum": {
            timing(outcome="answered"): 5,
            timing(outcome="cancelled"): 10,
        },
        **talk(30),
    }


def test_outbound_call_answered(exporter: Exporter) -> None:
    exporter.event("onOutCallingStart", abon="108", did=OTHER_CALLER, call_id="o1")
    exporter.clock.advance(4)
    exporter.event("onOutCallingAnswered", abon=108, did=OTHER_CALLER, call_id="o1")
    exporter.clock.advance(100)
    exporter.event("onOutCallingEnd", abon="108", did=OTHER_CALLER, call_id="o1", billsec=100)

    assert call_totals(exporter.samples()) == {
        "mcn_calls_started_total": {leg("outbound"): 1},
        "mcn_calls_ended_total": {ended("answered", "outbound"): 1},
        **ring("answered", 4, direction="outbound"),
        **talk(100, direction="outbound"),
    }


def test_outbound_call_not_answered_by_the_callee(exporter: Exporter) -> None:
    exporter.event("onOutCallingStart", abon="108", did=OTHER_CALLER, call_id="o2")
    exporter.clock.advance(20)
    exporter.event("onOutCallingMissed", abon="108", did=OTHER_CALLER, call_id="o2")

    assert call_totals(exporter.samples()) == {
        "mcn_calls_started_total": {leg("outbound"): 1},
        "mcn_calls_ended_total": {ended("unanswered", "outbound"): 1},
        **ring("unanswered", 20, direction="outbound"),
    }


def test_outbound_end_with_zero_billsec_is_unanswered(exporter: Exporter) -> None:
    exporter.event("onOutCallingStart", abon="108", did=OTHER_CALLER)
    exporter.clock.advance(15)
    exporter.event("onOutCallingEnd", abon="108", did=OTHER_CALLER, billsec=0)

    assert call_totals(exporter.samples()) == {
        "mcn_calls_started_total": {leg("outbound"): 1},
        "mcn_calls_ended_total": {ended("unanswered", "outbound"): 1},
        **ring("unanswered", 15, direction="outbound"),
    }


def test_telephony_call_is_completed_with_no_extension(exporter: Exporter) -> None:
    exporter.event("InboundCallStart", did=CALLER)
    assert active(exporter) == {leg(extension="", service="telephony"): 1}
    exporter.clock.advance(90)
    exporter.event("InboundCallEnd", did=CALLER)

    assert call_totals(exporter.samples()) == {
        "mcn_calls_started_total": {leg(extension="", service="telephony"): 1},
        "mcn_calls_ended_total": {ended("completed", extension="", service="telephony"): 1},
        **talk(90, service="telephony"),
    }


def test_end_with_no_start_is_unmatched_and_still_counted(exporter: Exporter) -> None:
    exporter.event("onInCallingEnd", abon="108", did=CALLER, billsec=20)
    exporter.event("onInCallingMissed", abon="104", did=CALLER)

    assert call_totals(exporter.samples()) == {
        "mcn_calls_ended_total": {ended("answered"): 1, ended("missed", extension="104"): 1},
        "mcn_call_events_unmatched_total": {
            "event_type=onInCallingEnd": 1,
            "event_type=onInCallingMissed": 1,
        },
        **talk(20),
    }


def test_answered_event_with_no_start_opens_the_leg_that_its_end_closes(
    exporter: Exporter,
) -> None:
    exporter.event("onInCallingAnswered", abon="108", did=CALLER, call_id="late")
    assert active(exporter) == {leg(): 1}
    exporter.clock.advance(45)
    exporter.event("onInCallingEnd", abon="108", did=CALLER, call_id="late")

    assert call_totals(exporter.samples()) == {
        "mcn_calls_ended_total": {ended("answered"): 1},
        "mcn_call_events_unmatched_total": {"event_type=onInCallingAnswered": 1},
        **talk(45),
    }


@pytest.mark.parametrize("call_id", ["c-retry", None])
def test_missed_call_counts_once_even_after_retry(exporter: Exporter, call_id: str | None) -> None:
    ids = {"call_id": call_id} if call_id else {}
    exporter.event("onInCallingStart", abon="108", did=CALLER, **ids)
    exporter.event("onInCallingStart", abon="108", did=CALLER, **ids)
    exporter.clock.advance(10)
    exporter.event("onInCallingMissed", abon="108", did=CALLER, **ids)
    exporter.clock.advance(5)
    exporter.event("onInCallingMissed", abon="108", did=CALLER, **ids)
    exporter.event("onInCallingEnd", abon="108", did=CALLER, **ids)

    assert call_totals(exporter.samples()) == {
        "mcn_calls_started_total": {leg(): 1},
        "mcn_calls_ended_total": {ended("missed"): 1},
        **ring("missed", 10),
    }


def test_late_copy_with_call_id_is_recognised_long_after_the_close(exporter: Exporter) -> None:
    exporter.event("onInCallingStart", abon="108", call_id="c9")
    exporter.event("onInCallingEnd", abon="108", call_id="c9", billsec=3)
    exporter.clock.advance(3 * 3600)
    exporter.event("onInCallingEnd", abon="108", call_id="c9", billsec=3)

    totals = call_totals(exporter.samples())
    assert totals["mcn_calls_ended_total"] == {ended("answered"): 1}
    assert "mcn_call_events_unmatched_total" not in totals


def test_without_call_id_a_copy_after_the_duplicate_window_is_a_new_unmatched_event(
    exporter: Exporter,
) -> None:
    exporter.event("onInCallingStart", abon="108", did=CALLER)
    exporter.event("onInCallingMissed", abon="108", did=CALLER)
    exporter.clock.advance(61)
    exporter.event("onInCallingMissed", abon="108", did=CALLER)

    totals = call_totals(exporter.samples())
    assert totals["mcn_calls_ended_total"] == {ended("missed"): 2}
    assert totals["mcn_call_events_unmatched_total"] == {"event_type=onInCallingMissed": 1}


def test_two_concurrent_calls_on_one_extension_without_call_id(exporter: Exporter) -> None:
    exporter.event("onInCallingStart", abon="108", did=CALLER)
    exporter.clock.advance(2)
    exporter.event("onInCallingStart", abon="108", did=OTHER_CALLER)
    assert active(exporter) == {leg(): 2}
    exporter.clock.advance(3)
    exporter.event("onInCallingMissed", abon="108", did=OTHER_CALLER)
    assert active(exporter) == {leg(): 1}
    exporter.clock.advance(10)
    exporter.event("onInCallingEnd", abon="108", did=CALLER, billsec=9)

    assert call_totals(exporter.samples()) == {
        "mcn_calls_started_total": {leg(): 2},
        "mcn_calls_ended_total": {ended("missed"): 1, ended("answered"): 1},
        "mcn_call_ring_seconds_count": {
            timing(outcome="missed"): 1,
            timing(outcome="answered"): 1,
        },
        "mcn_call_ring_seconds_sum": {
            timing(outcome="missed"): 3,
            timing(outcome="answered"): 6,
        },
        **talk(9),
    }


def test_same_caller_twice_on_one_extension_is_matched_oldest_first(exporter: Exporter) -> None:
    exporter.event("onInCallingStart", abon="108", did=CALLER)
    exporter.clock.advance(120)  # past the duplicate window: a second call, not a copy
    exporter.event("onInCallingStart", abon="108", did=CALLER)
    exporter.clock.advance(1)
    exporter.event("onInCallingMissed", abon="108", did=CALLER)

    assert call_totals(exporter.samples()) == {
        "mcn_active_calls": {leg(): 1},
        "mcn_calls_started_total": {leg(): 2},
        "mcn_calls_ended_total": {ended("missed"): 1},
        **ring("missed", 121),
    }


def test_unknown_event_type_is_taken_and_changes_no_call(exporter: Exporter) -> None:
    result = exporter.event("onSomethingNew", abon="108", did=CALLER, call_id="u1")
    assert result.json == {"status": "ok"}

    samples = exporter.samples()
    assert call_totals(samples) == {}
    events = samples["mcn_webhook_events_total"]
    assert events[(("event_type", "unknown"), ("service", "vpbx"))] == 1


@pytest.mark.parametrize(("start_abon", "end_abon"), [(108, "108"), ("108", 108)])
def test_abon_as_number_or_string_is_the_same_extension(
    exporter: Exporter, start_abon: object, end_abon: object
) -> None:
    exporter.event("onInCallingStart", abon=start_abon, did=CALLER)
    exporter.event("onInCallingEnd", abon=end_abon, did=CALLER, billsec=5)

    totals = call_totals(exporter.samples())
    assert totals["mcn_calls_ended_total"] == {ended("answered"): 1}
    assert "mcn_call_events_unmatched_total" not in totals


def test_account_id_as_string_of_digits(exporter: Exporter) -> None:
    result = exporter.post(
        {"event_type": "InboundCallStart", "secret": "SecretToken", "account_id": str(ACCOUNT)}
    )
    assert result.status_code == 200
    assert active(exporter) == {leg(extension="", service="telephony"): 1}


def test_leg_left_open_past_max_duration_expires_and_leaves_the_gauge(exporter: Exporter) -> None:
    exporter.event("onInCallingStart", abon="108", did=CALLER)
    exporter.clock.advance(3)
    exporter.event("onInCallingAnswered", abon="108", did=CALLER)
    exporter.event("onOutCallingStart", abon="109", did=OTHER_CALLER)
    exporter.clock.advance(4 * 3600 - 10)
    assert active(exporter) == {leg(): 1, leg("outbound", "109"): 1}
    exporter.clock.advance(11)

    assert call_totals(exporter.samples()) == {
        "mcn_calls_started_total": {leg(): 1, leg("outbound", "109"): 1},
        "mcn_calls_ended_total": {
            ended("expired"): 1,
            ended("expired", "outbound", "109"): 1,
        },
        **ring("expired", 3),
    }


def test_an_end_after_expiry_changes_nothing(exporter: Exporter) -> None:
    exporter.event("onInCallingStart", abon="108", call_id="gone")
    exporter.clock.advance(4 * 3600 + 1)
    exporter.samples()
    exporter.event("onInCallingEnd", abon="108", call_id="gone", billsec=60)

    totals = call_totals(exporter.samples())
    assert totals["mcn_calls_ended_total"] == {ended("expired"): 1}
    assert "mcn_call_talk_seconds_count" not in totals
