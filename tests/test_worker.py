"""The worker's client socket, on a socket pair: kernel timeouts and an answer sent at once."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from exporter.worker import TimedSocket


def pair(timeout: float = 0.3) -> tuple[TimedSocket, socket.socket]:
    server_side, client = socket.socketpair()
    return TimedSocket.adopt(server_side, timeout), client


def test_writes_held_while_answering_go_out_together_once_sent() -> None:
    sock, client = pair()
    with sock, client:
        client.setblocking(False)
        sock.hold_writes()
        sock.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        sock.sendall(memoryview(b"body"))
        with pytest.raises(BlockingIOError):  # nothing on the wire yet
            client.recv(64)
        assert sock.send_held()
        assert client.recv(64) == b"HTTP/1.1 200 OK\r\n\r\nbody"
        sock.sendall(b"next")  # not held any more
        assert client.recv(64) == b"next"


def test_the_client_timeout_is_the_kernels_for_blocking_reads_and_writes() -> None:
    sock, client = pair(timeout=2.25)
    with sock, client:
        size = struct.calcsize("ll")
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            raw = sock.getsockopt(socket.SOL_SOCKET, option, size)
            seconds, microseconds = struct.unpack("ll", raw)
            assert seconds + microseconds / 1e6 == pytest.approx(2.25, abs=0.02)  # in ticks


def test_an_answer_the_client_does_not_take_is_given_up_after_the_timeout() -> None:
    sock, client = pair(timeout=0.3)
    with sock, client:
        sock.setblocking(True)  # as a thread answering has it
        sock.hold_writes()
        sock.sendall(b"x" * 16 * 1024 * 1024)  # more than the pair's buffers hold
        started = time.monotonic()
        assert not sock.send_held()
        assert time.monotonic() - started < 5  # a few sends, each waiting 0.3 s at most


def test_an_answer_to_a_client_gone_is_not_sent() -> None:
    sock, client = pair()
    client.close()
    with sock:
        sock.hold_writes()
        sock.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        assert not sock.send_held()
