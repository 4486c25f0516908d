"""The HTTP interface of the README, through Falcon's test client."""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exporter.app import client_address
from tests.conftest import ACCOUNT, SECRET, Exporter, Samples, ServerProcess, webhook

GOOD = {"event_type": "onInCallingStart", "abon": "108", "secret": SECRET, "account_id": ACCOUNT}


def without(document: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k != key}


def rejected(samples: Samples, reason: str) -> float:
    return samples["mcn_webhook_rejected_total"][(("reason", reason),)]


def assert_only_rejection_changed(before: Samples, after: Samples, reason: str) -> None:
    key = (("reason", reason),)
    assert after["mcn_webhook_rejected_total"][key] == before["mcn_webhook_rejected_total"][key] + 1
    after["mcn_webhook_rejected_total"][key] -= 1
    assert after == before


def _with_literal(field: str, literal: str) -> bytes:
    """GOOD with one field set to a JSON number literal Python's json reads as a float."""
    return json.dumps({**GOOD, field: "@"}).replace('"@"', literal).encode()


BAD_BODIES: list[tuple[str, bytes, int, str, str | None]] = [
    # (name, body, status, reason, field named in the answer)
    ("not json", b"event_type=onInCallingStart", 400, "malformed", None),
    ("empty body", b"", 400, "malformed", None),
    ("json array", b'[{"event_type": "onInCallingStart"}]', 400, "malformed", None),
    ("json string", b'"onInCallingStart"', 400, "malformed", None),
    ("json null", b"null", 400, "malformed", None),
    ("bad utf-8", b'{"event_type": "\xff\xfe"}', 400, "malformed", None),
    *(
        (encoding, json.dumps(GOOD).encode(encoding), 400, "malformed", None)
        for encoding in ("utf-16", "utf-16-le", "utf-32", "utf-32-be")
    ),
    ("deep nesting", b"[" * 30_000 + b"]" * 30_000, 400, "malformed", None),
    ("huge integer", b'{"account_id": 1' + b"0" * 5000 + b"}", 400, "malformed", None),
    (
        "no account_id",
        json.dumps(without(GOOD, "account_id")).encode(),
        422,
        "invalid",
        "account_id",
    ),
    (
        "account_id true",
        json.dumps({**GOOD, "account_id": True}).encode(),
        422,
        "invalid",
        "account_id",
    ),
    (
        "account_id float",
        json.dumps({**GOOD, "account_id": 10123.0}).encode(),
        422,
        "invalid",
        "account_id",
    ),
    (
        "account_id negative",
        json.dumps({**GOOD, "account_id": -10123}).encode(),
        422,
        "invalid",
        "account_id",
    ),
    (
        "account_id letters",
        json.dumps({**GOOD, "account_id": "10123a"}).encode(),
        422,
        "invalid",
        "account_id",
    ),
    (
        "account_id huge",
        json.dumps({**GOOD, "account_id": 10**40}).encode(),
        422,
        "invalid",
        "account_id",
    ),
    (
        "unknown account",
        json.dumps({**GOOD, "account_id": 999}).encode(),
        403,
        "unknown_account",
        "account_id",
    ),
    (
        "wrong secret",
        json.dumps({**GOOD, "secret": "guess"}).encode(),
        401,
        "unauthorized",
        "secret",
    ),
    ("no secret", json.dumps(without(GOOD, "secret")).encode(), 401, "unauthorized", "secret"),
    (
        "secret a number",
        json.dumps({**GOOD, "secret": 1234}).encode(),
        401,
        "unauthorized",
        "secret",
    ),
    (
        "no event_type",
        json.dumps(without(GOOD, "event_type")).encode(),
        422,
        "invalid",
        "event_type",
    ),
    (
        "event_type a list",
        json.dumps({**GOOD, "event_type": ["x"]}).encode(),
        422,
        "invalid",
        "event_type",
    ),
    ("vpbx without abon", json.dumps(without(GOOD, "abon")).encode(), 422, "invalid", "abon"),
    ("abon too long", json.dumps({**GOOD, "abon": "1" * 33}).encode(), 422, "invalid", "abon"),
    ("abon odd characters", json.dumps({**GOOD, "abon": "10 8"}).encode(), 422, "invalid", "abon"),
    ("abon a float", json.dumps({**GOOD, "abon": 108.0}).encode(), 422, "invalid", "abon"),
    ("abon a boolean", json.dumps({**GOOD, "abon": True}).encode(), 422, "invalid", "abon"),
    ("did a number", json.dumps({**GOOD, "did": 421222202999}).encode(), 422, "invalid", "did"),
    (
        "call_id an object",
        json.dumps({**GOOD, "call_id": {"a": 1}}).encode(),
        422,
        "invalid",
        "call_id",
    ),
    ("billsec negative", json.dumps({**GOOD, "billsec": -1}).encode(), 422, "invalid", "billsec"),
    ("billsec a float", json.dumps({**GOOD, "billsec": 1.5}).encode(), 422, "invalid", "billsec"),
    ("billsec huge", json.dumps({**GOOD, "billsec": 10**12}).encode(), 422, "invalid", "billsec"),
    ("billsec text", json.dumps({**GOOD, "billsec": "long"}).encode(), 422, "invalid", "billsec"),
    *(
        (f"{field} {literal}", _with_literal(field, literal), 422, "invalid", field)
        for field in ("billsec", "abon")
        for literal in ("NaN", "Infinity", "-Infinity", "1e400")
    ),
    *(
        (
            f"account_id {literal}",
            _with_literal("account_id", literal),
            422,
            "invalid",
            "account_id",
        )
        for literal in ("NaN", "Infinity", "1e400")
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "reason", "field"),
    [
        pytest.param(body, status, reason, field, id=name)
        for name, body, status, reason, field in BAD_BODIES
    ],
)
def test_bad_input_is_refused_with_a_named_error_and_only_the_rejection_counter_moves(
    exporter: Exporter, body: bytes, status: int, reason: str, field: str | None
) -> None:
    exporter.event("onInCallingStart", abon="101", did="+421900000001")
    before = exporter.samples()
    exporter.clock.advance(10)  # a refusal that dated the feed would show now

    result = exporter.post(body, content_type="application/json")

    assert result.status_code == status
    assert result.json["status"] == "error"
    assert result.json["reason"] == reason
    assert result.json.get("field") == field
    if field:
        assert field in result.json["error"]
    assert_only_rejection_changed(before, exporter.samples(), reason)


def test_checks_run_in_order_so_an_unauthenticated_client_learns_nothing_more(
    exporter: Exporter,
) -> None:
    unknown_account_bad_secret = {**GOOD, "account_id": 999, "secret": "x", "abon": "!"}
    assert exporter.post(unknown_account_bad_secret).status_code == 403
    bad_secret_bad_abon = {**GOOD, "secret": "x", "abon": "!", "billsec": -1}
    assert exporter.post(bad_secret_bad_abon).status_code == 401
    bad_account_bad_secret = {**GOOD, "account_id": "x", "secret": "x"}
    assert exporter.post(bad_account_bad_secret).status_code == 422


def test_body_over_the_limit_gets_413(exporter: Exporter) -> None:
    before = exporter.samples()
    padding = "x" * (64 * 1024)
    result = exporter.post({**GOOD, "padding": padding})
    assert result.status_code == 413
    assert result.json["reason"] == "too_large"
    assert_only_rejection_changed(before, exporter.samples(), "too_large")


def test_body_just_under_the_limit_is_taken(exporter: Exporter) -> None:
    body = json.dumps({**GOOD, "padding": ""})
    body = json.dumps({**GOOD, "padding": "x" * (64 * 1024 - len(body))})
    assert len(body) == 64 * 1024
    assert exporter.post(body).status_code == 200


@pytest.mark.parametrize(
    "content_type", ["application/json", "text/plain", "application/x-www-form-urlencoded", None]
)
def test_body_is_read_as_json_whatever_the_content_type(
    exporter: Exporter, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    result = exporter.post(webhook("vpbx-inbound-start"), headers=headers)
    assert result.status_code == 200
    assert result.json == {"status": "ok"}


def test_webhook_path_with_a_trailing_slash_works_too(exporter: Exporter) -> None:
    result = exporter.client.simulate_post("/webhook/", body=webhook("vpbx-inbound-start"))
    assert result.status_code == 200


def test_unknown_fields_are_ignored(exporter: Exporter) -> None:
    result = exporter.post({**GOOD, "record": True, "who_answered": ["108"], "x": {"y": [1]}})
    assert result.status_code == 200


def test_metrics_in_prometheus_text_format_by_default(exporter: Exporter) -> None:
    result = exporter.client.simulate_get("/metrics")
    assert result.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE mcn_calls_ended_total counter" in result.text


def test_metrics_in_openmetrics_on_request(exporter: Exporter) -> None:
    result = exporter.client.simulate_get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert result.headers["Content-Type"].startswith("application/openmetrics-text")
    assert result.text.endswith("# EOF\n")
    assert "# TYPE mcn_calls_ended counter" in result.text


def test_metrics_gzip_when_asked(exporter: Exporter) -> None:
    import gzip

    result = exporter.client.simulate_get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert result.headers["Content-Encoding"] == "gzip"
    assert b"mcn_active_calls" in gzip.decompress(result.content)


@pytest.mark.parametrize(
    ("accept_encoding", "gzipped"),
    [("gzip", True), ("br, gzip;q=0.5", True), ("gzip;q=0", False), ("identity", False)],
)
def test_metrics_gzip_only_when_acceptable(
    exporter: Exporter, accept_encoding: str, gzipped: bool
) -> None:
    result = exporter.client.simulate_get("/metrics", headers={"Accept-Encoding": accept_encoding})
    assert (result.headers.get("Content-Encoding") == "gzip") is gzipped


def test_healthz(exporter: Exporter) -> None:
    result = exporter.client.simulate_get("/healthz")
    assert (result.status_code, result.json) == (200, {"status": "ok"})


def test_readyz_is_ok_while_the_store_answers(exporter: Exporter) -> None:
    assert exporter.client.simulate_get("/readyz").status_code == 200


def test_readyz_is_503_when_the_store_is_unreadable(exporter: Exporter, tmp_path: Path) -> None:
    exporter.deps.store.close()
    for name in ("calls.sqlite3", "calls.sqlite3-wal", "calls.sqlite3-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    (tmp_path / "calls.sqlite3").write_bytes(b"this is not a database" * 100)

    result = exporter.client.simulate_get("/readyz")
    assert result.status_code == 503
    assert result.json["reason"] == "store_unavailable"
    webhook_result = exporter.post(GOOD)
    assert webhook_result.status_code == 503
    assert webhook_result.headers["Retry-After"] == "5"


def test_landing_page_links_the_endpoints_and_counts_active_calls(exporter: Exporter) -> None:
    exporter.event("onInCallingStart", abon="108", did="+421900000002")
    result = exporter.client.simulate_get("/")
    assert result.status_code == 200
    assert result.headers["Content-Type"].startswith("text/html")
    for link in ("/metrics", "/healthz", "/readyz", "/webhook"):
        assert link in result.text
    assert "Active calls now: <b>1</b>" in result.text


def test_a_utf_8_byte_order_mark_before_the_json_is_accepted(exporter: Exporter) -> None:
    assert exporter.post(json.dumps(GOOD).encode("utf-8-sig")).status_code == 200


# -- methods and paths ----------------------------------------------------------------------------

GET_ROUTES = ("/metrics", "/healthz", "/readyz", "/")
SERVED = {"/webhook": ("POST",), **{route: ("GET", "HEAD") for route in GET_ROUTES}}
METHODS = (
    *("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT"),
    *("PROPFIND", "QUERY", "FOO", "WEBSOCKET"),  # WebDAV, a draft, unknown, Falcon's own
)
# The test client checks requests with wsgiref.validate, which warns about methods it does not know.
any_method = pytest.mark.filterwarnings("ignore::wsgiref.validate.WSGIWarning")
NOT_SERVED = [
    (path, method) for path, served in SERVED.items() for method in METHODS if method not in served
]


@any_method
@pytest.mark.parametrize(("path", "method"), NOT_SERVED)
def test_a_method_a_route_does_not_serve_gets_405_with_allow_counted_only_on_the_webhook(
    exporter: Exporter, path: str, method: str
) -> None:
    before = exporter.samples()
    result = exporter.client.simulate_request(method, path, body=json.dumps(GOOD))
    assert result.status_code == 405
    assert result.headers["Allow"] == ", ".join(SERVED[path])
    assert result.headers["Content-Type"] == "application/json"
    if method != "HEAD":  # a HEAD answer has no body
        assert result.json["status"] == "error"
        assert result.json["reason"] == "method_not_allowed"
    if path == "/webhook":
        assert_only_rejection_changed(before, exporter.samples(), "method_not_allowed")
    else:
        assert exporter.samples() == before


@pytest.mark.parametrize("path", GET_ROUTES)
def test_head_answers_like_get_without_the_body(exporter: Exporter, path: str) -> None:
    got = exporter.client.simulate_get(path)
    head = exporter.client.simulate_head(path)
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["Content-Type"] == got.headers["Content-Type"]
    assert head.headers["Content-Length"] == str(len(got.content))


@any_method
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path", ["/nope", "/webhook/extra", "/metrics.php", "/.env", "/./webhook"])
def test_a_path_that_does_not_exist_is_404_not_found_and_counts_nothing(
    exporter: Exporter, path: str, method: str
) -> None:
    before = exporter.samples()
    result = exporter.client.simulate_request(method, path, body=json.dumps(GOOD))
    assert result.status_code == 404
    if method != "HEAD":
        assert result.json == {
            "status": "error",
            "reason": "not_found",
            "error": "no such path; the endpoints are listed at /",
        }
    assert exporter.samples() == before


@pytest.mark.parametrize("path", ["/webhook/", "//webhook", "/webhook%2F"])
def test_a_refusal_on_a_path_falcon_routes_to_the_webhook_is_counted_too(
    exporter: Exporter, path: str
) -> None:
    before = exporter.samples()
    result = exporter.client.simulate_post(path, body=json.dumps({**GOOD, "secret": "guess"}))
    assert result.status_code == 401
    assert_only_rejection_changed(before, exporter.samples(), "unauthorized")


def test_every_json_answer_is_one_line_ending_with_a_newline(exporter: Exporter) -> None:
    assert exporter.post(GOOD).content == b'{"status":"ok"}\n'
    assert exporter.client.simulate_get("/healthz").content == b'{"status":"ok"}\n'
    assert exporter.client.simulate_get("/readyz").content == b'{"status":"ok"}\n'
    for refused in (
        exporter.post(b"not json"),
        exporter.post({**GOOD, "abon": "!"}),
        exporter.client.simulate_get("/nope"),
        exporter.client.simulate_put("/metrics"),
    ):
        assert refused.status_code >= 400
        assert refused.content.endswith(b"}\n")
        assert refused.content.count(b"\n") == 1


@pytest.mark.server
def test_a_real_server_refuses_methods_it_does_not_serve_with_405(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server(workers=1)
    for method, path, status, allow in (
        ("FOO", "/webhook", 405, "POST"),
        ("PROPFIND", "/metrics", 405, "GET, HEAD"),
        ("WEBSOCKET", "/healthz", 405, "GET, HEAD"),
        ("OPTIONS", "/", 405, "GET, HEAD"),
        ("FOO", "/nope", 404, None),
    ):
        answer = raw_request(server.port, f"{method} {path}")
        head, _, body = answer.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in header_lines)
        assert status_line.startswith(f"HTTP/1.1 {status} "), answer
        assert headers.get("allow") == (allow.lower() if allow else None), answer
        reason = "method_not_allowed" if status == 405 else "not_found"
        assert json.loads(body)["reason"] == reason
    assert rejected(server.samples(), "method_not_allowed") == 1
    assert raw_request(server.port, "HEAD /healthz").startswith(b"HTTP/1.1 200 ")


def raw_request(port: int, request_line: str) -> bytes:
    """One request with a method urllib would not send, answered before the server closes."""
    request = f"{request_line} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request.encode() + b"Connection: close\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


TRUSTED = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.1.0.0/16"))


@pytest.mark.parametrize(
    ("remote", "forwarded", "client"),
    [
        ("203.0.113.7", None, "203.0.113.7"),  # no proxy
        ("203.0.113.7", "198.51.100.1", "203.0.113.7"),  # a client's own header is not believed
        ("127.0.0.1", None, "127.0.0.1"),  # the proxy itself
        ("127.0.0.1", "198.51.100.1", "198.51.100.1"),  # behind the proxy
        ("127.0.0.1", "6.6.6.6, 198.51.100.1", "198.51.100.1"),  # a forged first entry
        ("127.0.0.1", "198.51.100.1, 10.1.2.3", "198.51.100.1"),  # two trusted proxies
        ("127.0.0.1", "10.1.2.3", "10.1.2.3"),  # only proxies: the farthest one
        ("127.0.0.1", "not an address", "not an address"),
    ],
)
def test_the_client_is_the_last_address_a_trusted_proxy_did_not_add(
    remote: str, forwarded: str | None, client: str
) -> None:
    assert client_address(remote, forwarded, TRUSTED) == client


def test_without_trusted_proxies_the_forwarded_header_is_never_believed() -> None:
    assert client_address("127.0.0.1", "198.51.100.1", ()) == "127.0.0.1"


def test_a_refusal_behind_a_trusted_proxy_logs_the_client_address(
    make_exporter: Callable[..., Exporter], caplog: pytest.LogCaptureFixture
) -> None:
    exporter = make_exporter(server={"trusted_proxies": ["127.0.0.1"]})
    with caplog.at_level(logging.WARNING, logger="exporter.http"):
        result = exporter.post(
            {"event_type": "onInCallingStart", "abon": "1", "account_id": ACCOUNT, "secret": "no"},
            remote_addr="127.0.0.1",
            headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.1"},
        )
    assert result.status_code == 401
    (line,) = [r.getMessage() for r in caplog.records if "webhook rejected" in r.getMessage()]
    assert "from 198.51.100.1:" in line
