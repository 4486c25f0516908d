"""Where a request ends in a byte stream, and what is refused before a thread sees it."""

from __future__ import annotations

import json

import pytest

from exporter.framing import (
    Chunks,
    Complete,
    Head,
    Limits,
    Refusal,
    RequestAssembly,
    Step,
    Waiting,
    parse_head,
    scan_chunks,
)

LIMITS = Limits(body=1000)
BODY = b'{"event_type":"onInCallingStart"}'
POST = b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


def chunked(*pieces: bytes, trailers: bytes = b"") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    head = b"POST /webhook HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + body + b"0\r\n" + trailers + b"\r\n"


def byte_by_byte(assembly: RequestAssembly, data: bytes) -> list[Step]:
    return [assembly.add(data[index : index + 1]) for index in range(len(data))]


def test_a_request_is_complete_only_with_its_last_byte() -> None:
    for request in (POST, chunked(BODY[:10], BODY[10:]), b"GET /metrics HTTP/1.1\r\n\r\n"):
        steps = byte_by_byte(RequestAssembly(LIMITS), request)
        assert steps[-1] == Complete(request)
        assert all(step == Waiting() for step in steps[:-1])


def test_pipelined_requests_come_out_one_at_a_time_with_nothing_lost() -> None:
    assembly = RequestAssembly(LIMITS)
    second = chunked(b"abc", trailers=b"X-Checksum: 1\r\n")
    assert assembly.add(POST + second + POST[:5]) == Complete(POST)
    assert assembly.add(b"") == Complete(second)
    assert assembly.add(b"") == Waiting()
    assert assembly.add(POST[5:]) == Complete(POST)
    assert assembly.buffered == 0


def test_expect_continue_is_answered_once_and_removed_before_gunicorn_sees_it() -> None:
    head = b"POST /webhook HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: %d\r\n\r\n"
    assembly = RequestAssembly(LIMITS)
    assert assembly.add(head % len(BODY)) == Waiting(send_continue=True)
    assert assembly.add(BODY[:5]) == Waiting()
    step = assembly.add(BODY[5:])
    assert step == Complete(b"POST /webhook HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (33, BODY))


def test_http_1_0_expects_no_continue() -> None:
    request = b"POST /webhook HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    assert RequestAssembly(LIMITS).add(request) == Waiting()


@pytest.mark.parametrize("expect", [b"", b"Expect: 100-continue\r\n"])
def test_a_declared_body_over_the_limit_is_handed_on_as_its_head_asking_to_close(
    expect: bytes,
) -> None:
    assembly = RequestAssembly(LIMITS)
    step = assembly.add(b"POST /w HTTP/1.1\r\n%sContent-Length: 10000000\r\n\r\nxyz" % expect)
    assert step == Complete(
        b"POST /w HTTP/1.1\r\nContent-Length: 10000000\r\nConnection: close\r\n\r\n"
    )
    assert assembly.buffered == 0  # the body is never read


def test_a_chunked_body_over_the_limit_is_handed_on_as_a_head_declaring_it() -> None:
    request = chunked(b"a" * 600, b"b" * 600)
    steps = byte_by_byte(RequestAssembly(LIMITS), request)
    refused = [step for step in steps if isinstance(step, Complete)]
    assert refused == [
        Complete(b"POST /webhook HTTP/1.1\r\nContent-Length: 1200\r\nConnection: close\r\n\r\n")
    ]
    # Decided by the second chunk's size line, before any of its data.
    assert steps.index(refused[0]) < request.index(b"bbb")


def test_unclear_framing_is_handed_on_as_the_head_alone_for_gunicorn_to_refuse() -> None:
    for fields in (
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Content-Length: -1\r\n",
        b"Transfer-Encoding: gzip\r\n",
    ):
        head = b"POST /w HTTP/1.1\r\n" + fields + b"\r\n"
        assert RequestAssembly(LIMITS).add(head + b"hello") == Complete(head)


def refusal(step: Head | Refusal | Step | None) -> tuple[int, str]:
    assert isinstance(step, Refusal), step
    answer = step.response()
    assert answer.startswith(b"HTTP/1.1 %d " % step.reason.status)
    assert b"\r\nConnection: close\r\n" in answer
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body == {"status": "error", "reason": step.reason, "error": step.message}
    return step.reason.status.value, step.reason.value


def test_a_long_request_line_is_refused_with_414_even_before_it_ends() -> None:
    line = b"GET /" + b"a" * 4090 + b" HTTP/1.1"
    assert refusal(parse_head(line, Limits())) == (414, "uri_too_long")
    assert refusal(parse_head(line + b"\r\n\r\n", Limits())) == (414, "uri_too_long")
    assert parse_head(b"GET /" + b"a" * 4000, Limits()) is None


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 102,  # not even ended
        b"GET / HTTP/1.1\r\nX: " + b"y" * 8190 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: " + b"y" * 8190,
        b"GET / HTTP/1.1\r\n" + (b"X: " + b"y" * 8000 + b"\r\n") * 9,
    ],
)
def test_too_many_or_too_large_header_fields_are_refused_with_431(head: bytes) -> None:
    assert refusal(RequestAssembly(Limits()).add(head)) == (431, "headers_too_large")


def test_the_head_ends_at_the_first_empty_line() -> None:
    head = parse_head(b"GET / HTTP/1.1\r\nA: b\r\n\r\nGET", Limits())
    assert isinstance(head, Head)
    assert (head.end, head.fields, head.content_length) == (24, (b"A: b",), None)
    assert parse_head(b"GET / HTTP/1.1\r\nA: b\r\n", Limits()) is None


def test_chunk_scanning_resumes_where_it_stopped() -> None:
    request = chunked(b"abc", b"defgh")
    start = request.index(b"\r\n\r\n") + 4
    progress = scan_chunks(request[: start + 10], Chunks(start, 0), LIMITS)
    assert (progress.decoded, progress.end) == (3, None)
    assert scan_chunks(request, progress, LIMITS) == Chunks(start + 18, 8, len(request))


def test_a_malformed_chunk_ends_the_scan_so_gunicorn_refuses_it() -> None:
    request = b"POST /w HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n"
    assert RequestAssembly(LIMITS).add(request) == Complete(request)


def test_a_request_cut_short_is_handed_on_as_it_is() -> None:
    assembly = RequestAssembly(LIMITS)
    assert assembly.cut_short() is None
    assembly.add(POST[:-3])
    assert assembly.cut_short() == Complete(POST[:-3])
    assert assembly.buffered == 0
