"""Why a request is refused: one list of reasons, each with the HTTP status it is answered with.

A reason is the `reason` of every error answer and, for a refused webhook, the `reason` label of
mcn_webhook_rejected_total. Plain Python: the HTTP layer turns a Rejection into its answer.
"""

from __future__ import annotations

from enum import StrEnum
from http import HTTPStatus


class Reason(StrEnum):
    """`counted`: a label of mcn_webhook_rejected_total, whose series start at 0."""

    status: HTTPStatus
    counted: bool

    def __new__(cls, label: str, status: HTTPStatus, counted: bool = True) -> Reason:
        reason = str.__new__(cls, label)
        reason._value_ = label
        reason.status = status
        reason.counted = counted
        return reason

    MALFORMED = "malformed", HTTPStatus.BAD_REQUEST
    INVALID = "invalid", HTTPStatus.UNPROCESSABLE_ENTITY
    UNAUTHORIZED = "unauthorized", HTTPStatus.UNAUTHORIZED
    UNKNOWN_ACCOUNT = "unknown_account", HTTPStatus.FORBIDDEN
    TOO_LARGE = "too_large", HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    METHOD_NOT_ALLOWED = "method_not_allowed", HTTPStatus.METHOD_NOT_ALLOWED
    STORE_UNAVAILABLE = "store_unavailable", HTTPStatus.SERVICE_UNAVAILABLE
    # Never counted: a scanner trying paths is not a webhook refused.
    NOT_FOUND = "not_found", HTTPStatus.NOT_FOUND, False
    INTERNAL = "internal", HTTPStatus.INTERNAL_SERVER_ERROR, False
    # Answered by the worker before the app sees the request (anyone can send them).
    URI_TOO_LONG = "uri_too_long", HTTPStatus.REQUEST_URI_TOO_LONG, False
    HEADERS_TOO_LARGE = "headers_too_large", HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, False


COUNTED_REASONS = tuple(reason for reason in Reason if reason.counted)


class Rejection(Exception):
    """A request we refuse, for `reason`; `field` names the offending field of the body."""

    def __init__(self, reason: Reason, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field
