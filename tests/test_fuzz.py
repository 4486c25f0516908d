"""Generated bodies: whatever a client sends, never a 5xx, and a refusal changes nothing else."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from exporter.events import EVENT_KINDS
from exporter.rejections import Reason
from tests.conftest import ACCOUNT, SECRET, Exporter, Samples

GOOD = {"event_type": "onInCallingStart", "abon": "108", "secret": SECRET, "account_id": ACCOUNT}
FIELDS = ("event_type", "abon", "did", "did_mcn", "call_id", "billsec", "secret", "account_id")

# Any code point, lone surrogates included: JSON can carry them, UTF-8 cannot.
odd_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=40) | st.sampled_from(
    [
        "",
        " ",
        "\u0000",
        "\ud800",
        "\u202e108",
        "\u0661\u0660\u0668",
        "108\n",
        "${HOME}",
        "\U0001d7d9\U0001d7d8\U0001d7e0",
    ]
)
numbers = (
    st.integers()
    | st.integers(min_value=10**17, max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, -1, 2**63, 2**64, 1e308, -0.0])
)
special_numbers = st.sampled_from(
    [math.nan, math.inf, -math.inf, 1.5, -1, 10**400, 2**63, 1e308, -0.0, 74.0]
)
scalars = st.none() | st.booleans() | numbers | odd_text
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
    max_leaves=12,
)
plausible = {
    "event_type": st.sampled_from([*EVENT_KINDS, "onSomethingNew"]) | junk,
    "abon": st.sampled_from(["108", 108, "*1#", "x" * 33]) | junk,
    "did": st.sampled_from(["+421222202999", "0222202999"]) | junk,
    "did_mcn": junk,
    "call_id": st.sampled_from(["c-1", "c-2"]) | junk,
    "billsec": st.sampled_from([0, 74, "74"]) | junk,
    "secret": st.sampled_from([SECRET, SECRET + " ", "secrettoken"]) | junk,
    "account_id": st.sampled_from([ACCOUNT, str(ACCOUNT), 1, "010123"]) | junk,
}


@st.composite
def mutated_event(draw: st.DrawFn) -> bytes:
    """A valid-looking event with some fields dropped, replaced by junk, or added."""
    body: dict[str, Any] = {}
    for name in FIELDS:
        if draw(st.integers(0, 5)):
            body[name] = draw(plausible[name])
    body.update(draw(st.dictionaries(odd_text, junk, max_size=3)))
    return json.dumps(body, allow_nan=True).encode()


@st.composite
def authenticated_event_with_one_bad_field(draw: st.DrawFn) -> bytes:
    """Past the secret check, so every later check and the store see the junk."""
    event_type = draw(st.sampled_from(sorted(EVENT_KINDS)))
    body: dict[str, Any] = {
        "event_type": event_type,
        "abon": "108",
        "did": "+421222202999",
        "call_id": "c-1",
        "secret": SECRET,
        "account_id": ACCOUNT,
    }
    field = draw(st.sampled_from(["abon", "did", "did_mcn", "call_id", "billsec", "event_type"]))
    body[field] = draw(odd_text | junk | special_numbers)
    return json.dumps(body, allow_nan=True).encode()


bodies = (
    authenticated_event_with_one_bad_field()
    | authenticated_event_with_one_bad_field()  # twice: the deepest checks get the most tries
    | mutated_event()
    | junk.map(lambda value: json.dumps(value, allow_nan=True).encode())
    | st.binary(max_size=200)
    | st.builds(lambda n: b"[" * n + b"]" * n, st.integers(1, 20_000))
    | st.builds(
        lambda d: b'{"account_id": ' + d.encode() + b"}",
        st.from_regex(r"\d{1,6000}", fullmatch=True),
    )
)


def rejection_delta(before: Samples, after: Samples) -> dict[str, float]:
    """Which samples changed; the rejection counter is reported by reason."""
    changed = {}
    for name in before.keys() | after.keys():
        old, new = before.get(name, {}), after.get(name, {})
        for labels in old.keys() | new.keys():
            if old.get(labels) != new.get(labels):
                changed[f"{name}{dict(labels)}"] = new.get(labels, 0) - old.get(labels, 0)
    return changed


@settings(
    max_examples=1200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bodies)
def test_no_body_gets_a_5xx_and_a_refusal_only_moves_the_rejection_counter(
    exporter: Exporter, body: bytes
) -> None:
    # So that a refusal dating the feed would show; before the first scrape, so that what time
    # alone moves (the waits of callers waiting for a call back) is the same in both.
    exporter.clock.advance(1)
    before = exporter.samples()
    result = exporter.post(body, content_type="application/json")
    assert result.status_code < 500, result.text
    event(f"HTTP {result.status_code}")
    if result.status_code == 200:
        assert result.json == {"status": "ok"}
        return
    reason = result.json["reason"]
    assert result.json["status"] == "error"
    assert result.json["error"]
    assert rejection_delta(before, exporter.samples()) == {
        f"mcn_webhook_rejected_total{{'reason': '{reason}'}}": 1
    }


# -- any method, path and headers ------------------------------------------------------------------

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT"]
# What gunicorn lets through: an RFC 9110 token of 3 to 20 characters without lower case or "#".
method_tokens = (
    st.sampled_from(["GET", "POST"])  # what the routes serve, so their refusals get tried too
    | st.sampled_from([*METHODS, "PROPFIND", "QUERY", "WEBSOCKET"])
    | st.from_regex(r"[A-Z0-9!$%&'*+.^_`|~-]{3,20}", fullmatch=True)
)
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60)
path_text = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
paths = (
    st.sampled_from(["/webhook", "/metrics", "/healthz", "/readyz", "/"])
    | st.sampled_from(
        [
            *("/webhook/", "//webhook", "/webhook%2F", "/nope", "/%ff", "/%00", "/..", "/?"),
            *("/webhook/..", "/metrics?x=%zz&x", "/metrics?name[]=x", "/readyz/"),
        ]
    )
    | path_text.map(lambda text: "/" + text)
)
header_values = header_text | st.sampled_from(
    [
        *("", "-1", "abc", "1e3", " 5", "99999999999999999999", "0", "chunked", "100-continue"),
        *("gzip;q=x", "gzip;q=-1", "*;q=1", "application/openmetrics-text; version=99"),
        *("application/openmetrics-text; version=1.0.0; escaping=x", "*/*;q=abc"),
        *("text/plain; charset=utf-16", "application/json; charset=latin-1", "bytes=0-1"),
    ]
)
headers = st.dictionaries(
    st.sampled_from(
        [
            # No Host: the test client parses it into the port it simulates. Content-Length
            # below: it must be digits for the test client (gunicorn answers the others itself).
            *("Content-Type", "Accept", "Accept-Encoding", "Accept-Charset"),
            *("Transfer-Encoding", "Expect", "Connection", "X-Forwarded-For", "Range"),
            *("If-None-Match", "If-Modified-Since", "Cookie", "Authorization", "Forwarded"),
        ]
    ),
    header_values,
    max_size=4,
)
content_lengths = st.none() | st.from_regex(r"[0-9]{1,20}", fullmatch=True)
STATUS_OF_REASON = {str(reason): reason.status for reason in Reason}
request_bodies = st.sampled_from([b"", json.dumps(GOOD).encode()]) | st.binary(max_size=100)


@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=method_tokens,
    path=paths,
    headers=headers,
    content_length=content_lengths,
    body=request_bodies,
)
@pytest.mark.filterwarnings("ignore::wsgiref.validate.WSGIWarning")  # about unknown methods
def test_no_method_path_or_header_gets_a_5xx_and_every_error_has_the_one_shape(
    exporter: Exporter,
    method: str,
    path: str,
    headers: dict[str, str],
    content_length: str | None,
    body: bytes,
) -> None:
    if content_length is not None:
        headers["Content-Length"] = content_length
    result = exporter.client.simulate_request(method, path, headers=headers, body=body)
    assert result.status_code < 500, result.text
    event(f"HTTP {result.status_code}")
    if result.status_code < 400 or method == "HEAD":
        return
    assert result.headers["Content-Type"] == "application/json"
    assert result.content.endswith(b"}\n")
    answer = result.json
    assert answer["status"] == "error"
    assert STATUS_OF_REASON[answer["reason"]] == result.status_code
    if result.status_code == 405:
        assert result.headers["Allow"] in ("POST", "GET, HEAD")
