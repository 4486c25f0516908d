"""Slow, silent and oversized clients against a real server: none holds a worker thread.

The slow-client kinds come from bench/slowclients.py, shared with the benchmark.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ACCOUNT, SECRET, ServerProcess

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from slowclients import KINDS, SlowClients, Timings, timed_request

pytestmark = pytest.mark.server
StartServer = Callable[..., ServerProcess]
CLIENT_TIMEOUT = 2.0
SLOW_CONNECTIONS = 200
# The worker sweeps once a second; the rest is for a loaded machine.
CLOSE_MARGIN = 3.0


def start_event(call: int) -> bytes:
    return json.dumps(
        {
            "event_type": "onInCallingStart",
            "secret": SECRET,
            "account_id": ACCOUNT,
            "abon": "101",
            "call_id": f"slow-{call}",
        }
    ).encode()


def test_slow_clients_neither_block_others_nor_stay_connected(
    start_server: StartServer,
) -> None:
    server = start_server(workers=2, server={"client_timeout": f"{CLIENT_TIMEOUT:g}s"})
    webhooks = 60
    timings = Timings()
    with SlowClients("127.0.0.1", server.port, SLOW_CONNECTIONS, 0.5, replenish=True) as slow:
        for call in range(webhooks):
            timed_request("127.0.0.1", server.port, "POST", "/webhook", start_event(call), timings)
            if call % 10 == 0:
                timed_request("127.0.0.1", server.port, "GET", "/metrics", None, timings)
            assert not timings.failures, timings.failures  # stop at the first, not after 60
        assert slow.open_count() == SLOW_CONNECTIONS  # they were all there meanwhile
        slow.replenish = False
        stopped_replenishing = time.monotonic()
        assert slow.wait_all_closed(timeout=CLIENT_TIMEOUT + CLOSE_MARGIN + 10)
        last_opened = max(c.opened for c in slow.connections)
        lifetimes = slow.lifetimes()

    assert len(timings.seconds) == webhooks + webhooks // 10
    assert max(timings.seconds) < 5.0  # a functional check that nothing was blocked
    for kind in KINDS:
        assert lifetimes[kind], kind
        assert max(lifetimes[kind]) < CLIENT_TIMEOUT + CLOSE_MARGIN, (kind, lifetimes[kind])
    assert last_opened < stopped_replenishing
    events = server.samples()["mcn_webhook_events_total"]
    assert sum(events.values()) == webhooks


def exchange(port: int, data: bytes, wait: float = 10.0) -> tuple[bytes, bool]:
    """Sends `data`, reads until the server closes (True) or stays silent for `wait` s."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            return answer, False
        except ConnectionResetError:
            pass
        return answer, True


def json_body(answer: bytes) -> dict[str, str]:
    body: dict[str, str] = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    return body


@pytest.mark.parametrize("expect", [True, False])
def test_a_body_declared_too_large_is_refused_before_it_is_read_and_closed(
    start_server: StartServer, expect: bool
) -> None:
    server = start_server(workers=1)
    head = b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n"
    # Without Expect the client starts sending; it never sends the rest.
    request = head + (b"Expect: 100-continue\r\n\r\n" if expect else b"\r\n" + b"x" * 10_000)
    started = time.monotonic()
    answer, closed = exchange(server.port, request)

    assert closed, answer
    assert time.monotonic() - started < 5.0  # it did not wait for the body
    assert b"100 Continue" not in answer
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"\r\nConnection: close\r\n" in answer
    assert json_body(answer)["reason"] == "too_large"
    rejected = server.samples()["mcn_webhook_rejected_total"]
    assert rejected[(("reason", "too_large"),)] == 1


def test_a_chunked_body_over_the_limit_is_refused_counted_and_closed(
    start_server: StartServer,
) -> None:
    server = start_server(workers=1, server={"max_body_bytes": 1024})
    chunk = b"400\r\n" + b"a" * 1024 + b"\r\n"
    head = b"POST /webhook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer, closed = exchange(server.port, head + chunk * 2)  # and never the last chunk

    assert closed, answer
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"\r\nConnection: close\r\n" in answer
    rejected = server.samples()["mcn_webhook_rejected_total"]
    assert rejected[(("reason", "too_large"),)] == 1


def test_a_body_that_fits_gets_100_continue_once(start_server: StartServer) -> None:
    server = start_server(workers=1)
    body = start_event(1)
    head = b"POST /webhook HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert b"100 Continue" not in answer


@pytest.mark.parametrize(
    ("request_head", "status", "reason"),
    [
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long"),
        (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431, "headers_too_large"),
        (b"GET / HTTP/1.1\r\nX-A: " + b"b" * 9000 + b"\r\n\r\n", 431, "headers_too_large"),
    ],
)
def test_a_request_line_or_headers_over_the_limits_get_json_414_or_431(
    start_server: StartServer, request_head: bytes, status: int, reason: str
) -> None:
    server = start_server(workers=1)
    answer, closed = exchange(server.port, request_head)
    assert closed, answer
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer
    assert b"\r\nContent-Type: application/json\r\n" in answer
    assert json_body(answer)["reason"] == reason


def test_pipelined_chunked_and_kept_alive_requests_are_all_answered(
    start_server: StartServer,
) -> None:
    server = start_server(workers=1)
    first, second, third = start_event(1), start_event(2), start_event(3)
    plain = b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
    chunked = (
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, second[:10], len(second) - 10, second[10:])
    )
    closing = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(plain % (len(first), first) + chunked)  # two requests in one write
        time.sleep(0.5)
        sock.sendall(plain % (len(third), third) + closing)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert answer.count(b"HTTP/1.1 200 OK") == 4, answer
    events = server.samples()["mcn_webhook_events_total"]
    assert sum(events.values()) == 3


def test_a_stopping_server_does_not_wait_on_slow_clients(start_server: StartServer) -> None:
    server = start_server(workers=2, server={"client_timeout": "5s"})
    with SlowClients("127.0.0.1", server.port, 40, 0.5):
        time.sleep(1.0)
        started = time.monotonic()
        assert server.stop(signal.SIGTERM) == 0
        # Silent ones are dropped within 2 s, the others at their deadline: not graceful_timeout.
        assert time.monotonic() - started < 5.0 + CLOSE_MARGIN + 5.0


def test_a_client_that_stops_reading_its_answers_holds_a_thread_until_client_timeout(
    start_server: StartServer,
) -> None:
    """A thread writing answers nobody reads gives up once a write waits client_timeout."""
    client_timeout, scrapes = 1.0, 400  # each answer some 40 KB: 16 MB, past any buffer
    server = start_server(
        workers=1, server={"client_timeout": f"{client_timeout:g}s", "threads": 2}
    )
    pipelined = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * scrapes
    stalled = []
    for _ in range(2):  # one per thread
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(pipelined)  # and reads nothing for now: both threads end up blocked
        stalled.append(sock)
    stalled_at = time.monotonic()
    time.sleep(0.5)
    assert server.post(start_event(1))[0] == 200  # whenever a thread comes free
    # Answers fill the buffers (a few MB), then a write waits: up to client_timeout per send.
    time.sleep(max(0.0, stalled_at + 6 * client_timeout - time.monotonic()))
    for sock in stalled:
        answered = read_until_closed(sock, timeout=10)
        assert 0 < answered.count(b"HTTP/1.1 200") < scrapes  # given up on, not to the end
        sock.close()
    assert server.post(start_event(2))[0] == 200


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    received = bytearray()
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return bytes(received)
