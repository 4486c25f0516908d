"""Slow clients, as scanners and broken senders are: connections that hold on without finishing.

Four kinds, in turn: `idle` connects and sends nothing; `one_byte` sends one byte and stops;
`trickled_headers` sends a webhook's head a byte every `interval` seconds; `slow_body` sends the
head at once and then the body a byte every `interval` seconds. One thread drives them all and
notes when the server closes each. Used by the benchmark and by tests/test_slow_clients.py.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

KINDS = ("idle", "one_byte", "trickled_headers", "slow_body")
BODY = b'{"event_type":"onInCallingStart","account_id":10123,"secret":"x","abon":"101"}'
HEAD = (
    b"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY)
)


@dataclass
class SlowConnection:
    kind: str
    sock: socket.socket
    opened: float
    to_trickle: bytes
    next_send: float
    closed: float | None = None

    @property
    def lifetime(self) -> float:
        return (self.closed or time.monotonic()) - self.opened


def first_bytes(kind: str) -> tuple[bytes, bytes]:
    """What a connection of this kind sends at once, and what it then trickles."""
    return {
        "idle": (b"", b""),
        "one_byte": (b"P", b""),
        "trickled_headers": (HEAD[:1], HEAD[1:]),
        "slow_body": (HEAD, BODY),
    }[kind]


def raise_file_limit(wanted: int) -> None:
    """Room for the slow connections, both ends of them, in one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


@dataclass
class SlowClients:
    """`count` slow connections to host:port while the context is open."""

    host: str
    port: int
    count: int
    interval: float = 2.0
    replenish: bool = False  # open a new one, of the same kind, for each the server closes
    connections: list[SlowConnection] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> SlowClients:
        raise_file_limit(4 * self.count + 256)
        selector = selectors.DefaultSelector()
        for index in range(self.count):
            self._open(selector, KINDS[index % len(KINDS)])
        self._thread = threading.Thread(target=self._drive, args=(selector,), daemon=True)
        self._thread.start()
        return self

    def _open(self, selector: selectors.BaseSelector, kind: str) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=10)
        now = time.monotonic()
        at_once, later = first_bytes(kind)
        sock.sendall(at_once)
        sock.setblocking(False)
        connection = SlowConnection(kind, sock, now, later, now + self.interval)
        self.connections.append(connection)
        selector.register(sock, selectors.EVENT_READ, connection)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        for connection in self.connections:
            connection.sock.close()

    def lifetimes(self) -> dict[str, list[float]]:
        """Seconds from connecting to the server's close, by kind, of those it closed."""
        found: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for connection in self.connections:
            if connection.closed is not None:
                found[connection.kind].append(connection.lifetime)
        return found

    def open_count(self) -> int:
        return sum(1 for c in self.connections if c.closed is None)

    def wait_all_closed(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.open_count():
            time.sleep(0.1)
        return not self.open_count()

    def _drive(self, selector: selectors.BaseSelector) -> None:
        while not self._stop.is_set() and selector.get_map():
            for key, _ in selector.select(timeout=0.1):
                connection: SlowConnection = key.data
                if not _still_open(connection.sock):
                    self._closed(selector, connection)
            now = time.monotonic()
            for connection in list(self.connections):
                due = connection.to_trickle and now >= connection.next_send
                if due and connection.closed is None:
                    self._trickle(selector, connection, now)
        selector.close()

    def _trickle(
        self, selector: selectors.BaseSelector, connection: SlowConnection, now: float
    ) -> None:
        try:
            connection.sock.send(connection.to_trickle[:1])
        except BlockingIOError:
            return
        except OSError:
            self._closed(selector, connection)
            return
        connection.to_trickle = connection.to_trickle[1:]
        connection.next_send = now + self.interval

    def _closed(self, selector: selectors.BaseSelector, connection: SlowConnection) -> None:
        connection.closed = time.monotonic()
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(connection.sock)
        connection.sock.close()
        if self.replenish and not self._stop.is_set():
            with contextlib.suppress(OSError):
                self._open(selector, connection.kind)


def _still_open(sock: socket.socket) -> bool:
    """Readable: an answer (read and ignored) or the server's close."""
    try:
        return bool(sock.recv(65536))
    except BlockingIOError:
        return True
    except OSError:
        return False


# -- the legitimate client, meanwhile ----------------------------------------------------------


@dataclass
class Timings:
    """Latencies (s) of a legitimate client's requests, and those that failed."""

    seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def percentile(self, fraction: float) -> float:
        if not self.seconds:
            return math.nan
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]


def timed_request(
    host: str, port: int, method: str, path: str, body: bytes | None, timings: Timings,
    timeout: float = 10.0, expect: Callable[[int], bool] = lambda status: status == 200,
) -> None:  # fmt: skip
    """One request on a new connection, as Prometheus and the provider make them."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        response.read()
        if not expect(response.status):
            timings.failures.append(f"{method} {path}: {response.status}")
            return
        timings.seconds.append(time.perf_counter() - started)
    except OSError as exc:
        timings.failures.append(f"{method} {path}: {exc!r}")
    finally:
        connection.close()
