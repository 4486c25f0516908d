"""Webhook bodies in, validated call events out (docs/design.md, "Data path").

Plain Python: no HTTP, no metrics.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

from exporter.rejections import Reason, Rejection

EXTENSION_PATTERN = re.compile(r"[0-9A-Za-z*#+_-]{1,32}")
MAX_BILLSEC = 30 * 24 * 3600
MAX_ACCOUNT_DIGITS = 18
MAX_TEXT_FIELD = 128
UNKNOWN_EVENT = "unknown"


class Service(StrEnum):
    VPBX = "vpbx"
    TELEPHONY = "telephony"


class Direction(StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


class Step(Enum):
    """What an event does to its call leg."""

    START = "start"
    ANSWER = "answer"
    MISS = "miss"  # inbound missed, outbound not answered by the callee
    CLOSE_NOTICE = "close_notice"  # stop ringing: taken elsewhere or abandoned
    END = "end"


@dataclass(frozen=True)
class EventKind:
    service: Service
    direction: Direction
    step: Step


EVENT_KINDS: Mapping[str, EventKind] = {
    "onInCallingStart": EventKind(Service.VPBX, Direction.INBOUND, Step.START),
    "onInCallingAnswered": EventKind(Service.VPBX, Direction.INBOUND, Step.ANSWER),
    "onInCallingEnd": EventKind(Service.VPBX, Direction.INBOUND, Step.END),
    "onInCallingMissed": EventKind(Service.VPBX, Direction.INBOUND, Step.MISS),
    "onCloseIncomingNotice": EventKind(Service.VPBX, Direction.INBOUND, Step.CLOSE_NOTICE),
    "onOutCallingStart": EventKind(Service.VPBX, Direction.OUTBOUND, Step.START),
    "onOutCallingAnswered": EventKind(Service.VPBX, Direction.OUTBOUND, Step.ANSWER),
    "onOutCallingMissed": EventKind(Service.VPBX, Direction.OUTBOUND, Step.MISS),
    "onOutCallingEnd": EventKind(Service.VPBX, Direction.OUTBOUND, Step.END),
    "InboundCallStart": EventKind(Service.TELEPHONY, Direction.INBOUND, Step.START),
    "InboundCallEnd": EventKind(Service.TELEPHONY, Direction.INBOUND, Step.END),
}


@dataclass(frozen=True)
class CallEvent:
    """One accepted webhook. `kind` is None for an event type we do not know."""

    event_type: str  # the provider's name, or "unknown"
    kind: EventKind | None
    account: int
    service: Service
    abon: str  # the extension; "" for telephony
    did: str | None = None  # the other party: the caller inbound, the callee outbound
    call_id: str | None = None
    billsec: int | None = None
    did_mcn: str | None = None  # the company's own number the call came in on

    def __repr__(self) -> str:
        # `did` is a phone number: keep it out of anything that prints events.
        return (
            f"CallEvent({self.event_type}, account={self.account}, abon={self.abon!r}, "
            f"call_id={self.call_id!r}, billsec={self.billsec})"
        )


class WebhookParser:
    """Checks a raw body in the order of docs/design.md, "Validation order": JSON object,
    account, secret, other fields."""

    def __init__(self, secrets: Mapping[int, str]) -> None:
        self._secrets = {account: secret.encode() for account, secret in secrets.items()}

    def parse(self, body: bytes) -> CallEvent:
        document = _decode(body)
        account = _account_id(document)
        expected = self._secrets.get(account)
        if expected is None:
            raise Rejection(
                Reason.UNKNOWN_ACCOUNT,
                f"account_id {account} is not a configured account",
                "account_id",
            )
        _check_secret(document.get("secret"), expected)
        return _event(document, account)


def _decode(body: bytes) -> dict[str, Any]:
    try:
        # UTF-8 only (json.loads would guess UTF-16 or UTF-32 from bytes); a leading UTF-8
        # byte order mark, which JSON allows a reader to ignore, is skipped.
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Rejection(Reason.MALFORMED, "body is not UTF-8") from exc
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad JSON and integers past Python's digit limit.
        raise Rejection(Reason.MALFORMED, "body is not valid JSON") from exc
    if not isinstance(document, dict):
        raise Rejection(Reason.MALFORMED, "body must be a JSON object")
    return document


def _account_id(document: dict[str, Any]) -> int:
    raw = document.get("account_id")
    if raw is None:
        raise Rejection(Reason.INVALID, "account_id is required", "account_id")
    if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= MAX_ACCOUNT_DIGITS:
        return int(raw)
    if type(raw) is int and 0 <= raw < 10**MAX_ACCOUNT_DIGITS:
        return raw
    raise Rejection(
        Reason.INVALID, "account_id must be an integer or a string of digits", "account_id"
    )


def _check_secret(raw: object, expected: bytes) -> None:
    if raw is None:
        raise Rejection(Reason.UNAUTHORIZED, "secret is required", "secret")
    given = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else b""
    # compare_digest takes time that depends on the length only, never on where bytes differ.
    if not isinstance(raw, str) or not hmac.compare_digest(given, expected):
        raise Rejection(Reason.UNAUTHORIZED, "secret does not match", "secret")


def _event(document: dict[str, Any], account: int) -> CallEvent:
    event_type = document.get("event_type")
    if not isinstance(event_type, str) or not event_type:
        raise Rejection(Reason.INVALID, "event_type must be a non-empty string", "event_type")
    kind = EVENT_KINDS.get(event_type)
    if kind is None:
        # Still accepted, so the provider keeps sending; guess the service for the event counter.
        has_abon = document.get("abon") is not None
        service = Service.VPBX if has_abon else Service.TELEPHONY
        return CallEvent(UNKNOWN_EVENT, None, account, service, "")
    did_mcn = _text(document, "did_mcn")  # first: its error comes before the other fields'
    return CallEvent(
        event_type=event_type,
        kind=kind,
        account=account,
        service=kind.service,
        abon=_abon(document.get("abon")) if kind.service is Service.VPBX else "",
        did=_text(document, "did"),
        call_id=_text(document, "call_id"),
        billsec=_billsec(document.get("billsec")),
        did_mcn=did_mcn,
    )


def _abon(raw: object) -> str:
    if raw is None:
        raise Rejection(Reason.INVALID, "abon is required for virtual PBX events", "abon")
    if type(raw) is int:
        raw = str(raw)
    if not isinstance(raw, str) or not EXTENSION_PATTERN.fullmatch(raw):
        raise Rejection(
            Reason.INVALID, "abon must be 1 to 32 characters of 0-9 A-Z a-z * # + _ -", "abon"
        )
    return raw


def _text(document: dict[str, Any], name: str) -> str | None:
    raw = document.get(name)
    if raw is None:
        return None
    if not isinstance(raw, str) or len(raw) > MAX_TEXT_FIELD or not _is_unicode(raw):
        raise Rejection(
            Reason.INVALID, f"{name} must be a string of at most {MAX_TEXT_FIELD} characters", name
        )
    return raw or None


def _is_unicode(text: str) -> bool:
    """False for strings holding lone surrogates ("\ud800"), which JSON allows and UTF-8 not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _billsec(raw: object) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 9:
        raw = int(raw)
    if type(raw) is not int or not 0 <= raw <= MAX_BILLSEC:
        raise Rejection(
            Reason.INVALID, f"billsec must be an integer from 0 to {MAX_BILLSEC} seconds", "billsec"
        )
    return raw
