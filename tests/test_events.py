"""Webhook parsing and validation (docs/design.md, "Data path"), on its own: no HTTP, no store."""

from __future__ import annotations

import json
from typing import Any

import pytest

from exporter.events import (
    EVENT_KINDS,
    CallEvent,
    Direction,
    Service,
    Step,
    WebhookParser,
)
from exporter.rejections import Rejection
from tests.conftest import ACCOUNT, SECRET, all_webhooks, webhook

parser = WebhookParser({ACCOUNT: SECRET, 555: "other-secret"})


def parse(**fields: Any) -> CallEvent:
    return parser.parse(json.dumps(fields).encode())


def rejection(body: bytes | dict[str, Any]) -> Rejection:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    with pytest.raises(Rejection) as caught:
        parser.parse(raw)
    return caught.value


def test_every_sample_parses() -> None:
    for path in all_webhooks():
        event = parser.parse(path.read_bytes())
        assert event.account == ACCOUNT
        assert event.kind is EVENT_KINDS[event.event_type]


def test_documented_inbound_start() -> None:
    event = parser.parse(webhook("vpbx-inbound-start"))
    assert event == CallEvent(
        event_type="onInCallingStart",
        kind=EVENT_KINDS["onInCallingStart"],
        account=ACCOUNT,
        service=Service.VPBX,
        abon="108",
        did="0222202999",
    )


def test_observed_end_with_billsec_and_numeric_abon() -> None:
    event = parser.parse(webhook("vpbx-inbound-end-with-billsec"))
    assert event.abon == "108"
    assert event.billsec == 74
    assert event.call_id == "5f1c2a7e-3b1d-4c55-9a0e-2f7d1e8b9c01"


def test_telephony_event_has_no_extension_even_if_abon_is_sent() -> None:
    event = parse(event_type="InboundCallStart", abon="5", secret=SECRET, account_id=ACCOUNT)
    assert (event.service, event.abon) == (Service.TELEPHONY, "")


def test_all_eleven_event_types_are_known() -> None:
    assert len(EVENT_KINDS) == 11
    steps = {(kind.service, kind.direction, kind.step) for kind in EVENT_KINDS.values()}
    assert (Service.VPBX, Direction.INBOUND, Step.CLOSE_NOTICE) in steps
    assert (Service.VPBX, Direction.OUTBOUND, Step.MISS) in steps


def test_fields_an_event_does_not_use_are_not_checked() -> None:
    telephony = parse(
        event_type="InboundCallEnd", abon="odd abon!", secret=SECRET, account_id=ACCOUNT
    )
    assert telephony.abon == ""
    unknown = parse(event_type="onFuture", abon=["x"], call_id=5, secret=SECRET, account_id=ACCOUNT)
    assert (unknown.kind, unknown.service) == (None, Service.VPBX)


def test_unknown_event_type_is_accepted_without_a_kind() -> None:
    event = parse(event_type="onFutureThing", abon="7", secret=SECRET, account_id=ACCOUNT)
    assert (event.event_type, event.kind, event.service) == ("unknown", None, Service.VPBX)
    event = parse(event_type="FutureTelephony", secret=SECRET, account_id=ACCOUNT)
    assert event.service is Service.TELEPHONY


@pytest.mark.parametrize("account_id", [ACCOUNT, str(ACCOUNT)])
def test_account_id_as_integer_or_digits(account_id: object) -> None:
    assert (
        parse(event_type="InboundCallEnd", secret=SECRET, account_id=account_id).account == ACCOUNT
    )


@pytest.mark.parametrize(("billsec", "expected"), [(0, 0), (74, 74), ("74", 74), (None, None)])
def test_billsec_forms(billsec: object, expected: int | None) -> None:
    event = parse(
        event_type="onInCallingEnd", abon="1", secret=SECRET, account_id=ACCOUNT, billsec=billsec
    )
    assert event.billsec == expected


def test_empty_optional_strings_count_as_absent() -> None:
    event = parse(
        event_type="onInCallingEnd", abon="1", secret=SECRET, account_id=ACCOUNT, did="", call_id=""
    )
    assert (event.did, event.call_id) == (None, None)


def test_secret_of_another_account_is_refused() -> None:
    refused = rejection(
        {"event_type": "InboundCallEnd", "secret": "other-secret", "account_id": ACCOUNT}
    )
    assert (refused.reason, refused.field) == ("unauthorized", "secret")


def test_extension_characters_of_the_spec_are_allowed() -> None:
    event = parse(
        event_type="onInCallingStart", abon="*12#+_-aZ", secret=SECRET, account_id=ACCOUNT
    )
    assert event.abon == "*12#+_-aZ"


def test_the_company_number_is_carried_for_the_line_label() -> None:
    event = parser.parse(webhook("vpbx-inbound-answered"))
    assert event.did_mcn is not None
    assert event.did_mcn.endswith("233005500")
    assert (
        parse(event_type="onInCallingStart", abon="1", secret=SECRET, account_id=ACCOUNT).did_mcn
        is None
    )


def test_phone_numbers_stay_out_of_the_event_repr() -> None:
    event = parser.parse(webhook("vpbx-inbound-answered"))
    assert "421222202999" not in repr(event)
    assert "421233005500" not in repr(event)


@pytest.mark.parametrize(
    ("body", "reason", "field"),
    [
        (b"{", "malformed", None),
        (b"\x00\x01", "malformed", None),
        (b"[]", "malformed", None),
        (b'{"account_id": NaN}', "invalid", "account_id"),
        ({"account_id": 1.5}, "invalid", "account_id"),
        ({"account_id": "\uff11\uff12\uff13"}, "invalid", "account_id"),  # full-width digits
        ({"account_id": 999, "secret": SECRET}, "unknown_account", "account_id"),
        ({"account_id": ACCOUNT, "secret": "\ud800"}, "unauthorized", "secret"),
        ({"account_id": ACCOUNT, "secret": SECRET}, "invalid", "event_type"),
        ({"account_id": ACCOUNT, "secret": SECRET, "event_type": ""}, "invalid", "event_type"),
        (
            {"account_id": ACCOUNT, "secret": SECRET, "event_type": "onInCallingEnd", "abon": ""},
            "invalid",
            "abon",
        ),
        (
            {
                "account_id": ACCOUNT,
                "secret": SECRET,
                "event_type": "onInCallingEnd",
                "abon": "1",
                "billsec": True,
            },
            "invalid",
            "billsec",
        ),
        (
            {
                "account_id": ACCOUNT,
                "secret": SECRET,
                "event_type": "onInCallingEnd",
                "abon": "1",
                "did": "9" * 129,
            },
            "invalid",
            "did",
        ),
    ],
)
def test_rejections_name_their_reason_and_field(
    body: bytes | dict[str, Any], reason: str, field: str | None
) -> None:
    refused = rejection(body)
    assert (refused.reason, refused.field) == (reason, field)
    if field:
        assert field in refused.message


START = {"event_type": "InboundCallStart", "secret": SECRET, "account_id": ACCOUNT}


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-be"])
def test_only_utf_8_is_json_so_utf_16_and_utf_32_are_malformed(encoding: str) -> None:
    body = json.dumps(START).encode(encoding)
    refused = rejection(body)
    assert (refused.reason, refused.field) == ("malformed", None)


def test_a_utf_8_byte_order_mark_is_skipped() -> None:
    body = json.dumps(START).encode("utf-8-sig")
    assert body.startswith(b"\xef\xbb\xbf")
    assert parser.parse(body).account == ACCOUNT


def test_utf_8_encoded_surrogates_are_malformed() -> None:
    # "\ud800" written as UTF-8 bytes (CESU-8): not UTF-8, though JSON could carry it escaped.
    refused = rejection(b'{"secret": "\xed\xa0\x80", "account_id": 10123}')
    assert (refused.reason, refused.message) == ("malformed", "body is not UTF-8")
