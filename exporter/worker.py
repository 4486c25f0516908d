"""The gunicorn worker: gthread, with each request buffered whole before a thread takes it.

gunicorn's gthread worker hands a connection to a thread as soon as it is readable, and the
thread then blocks until the request is in: a few clients that send a byte and stop hold every
thread. Here the worker's own selector loop reads each connection without blocking until a whole
request is in (framed by exporter.framing), with a deadline (`server.client_timeout`) after which
the connection is closed; only then does a thread parse it, with gunicorn's parser, from memory.
Threads also read and write with that timeout, and connections are closed (lingering to read
what the client still sends, so it gets the answer rather than a reset) by the loop, not a thread.
A worker holding more connections than its share leaves a new one to the others for a moment
(exporter.shares), so that a client opening its connections in a burst gets every worker's core.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import time
from functools import partial
from typing import Any

from gunicorn.workers.gthread import TConn, ThreadWorker

from exporter.config import ServerConfig
from exporter.framing import CONTINUE, Complete, Limits, Refusal, RequestAssembly, Waiting
from exporter.shares import DEFER_SECONDS, ConnectionBoard

RECEIVE_BYTES = 64 * 1024
LINGER_SECONDS = 2.0  # gunicorn's own graceful close: time and bytes read before closing
LINGER_BYTES = 64 * 1024
SWEEP_SECONDS = 0.25  # how often deadlines are checked (and at least once a second)
HEARTBEAT_SECONDS = 1.0


class TimedSocket(socket.socket):
    """A client socket whose blocking reads and writes time out in the kernel (SO_RCVTIMEO,
    SO_SNDTIMEO), so no thread waits on a client forever. A timeout kept by Python would cost a
    poll() before every send and receive, and a wait for the GIL after each.

    While a thread answers (`hold_writes`), what gunicorn writes is gathered and sent at once
    when it is done (`send_held`): the head and body of an answer in one send, not two.
    """

    held: list[bytes] | None = None

    @classmethod
    def adopt(cls, accepted: socket.socket, timeout: float) -> TimedSocket:
        sock = cls(accepted.family, accepted.type, accepted.proto, fileno=accepted.detach())
        limit = struct.pack("ll", int(timeout), round(timeout % 1 * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        return sock

    def sendall(self, data: Any, flags: int = 0) -> None:
        if self.held is None:
            super().sendall(data, flags)
        else:
            self.held.append(bytes(data))

    def hold_writes(self) -> None:
        self.held = []

    def send_held(self) -> bool:
        """Sends what was held; False if the client cannot take it (gone, or timed out)."""
        held, self.held = self.held, None
        try:
            if held:
                super().sendall(b"".join(held))
        except OSError:
            return False
        return True


class BufferedConn(TConn):  # type: ignore[misc]
    """A gthread connection with the bytes of its request, buffered by the worker's loop."""

    def __init__(self, worker: BufferingWorker, sock: TimedSocket, client: Any, server: Any):
        super().__init__(worker.cfg, sock, client, server)
        self.worker = worker
        self.assembly = RequestAssembly(worker.limits)
        self.deadline = 0.0
        self.request = b""

    def close(self, graceful: bool = False) -> None:
        if graceful:
            self.worker.linger(self.sock)
        else:
            super().close()


class BufferingWorker(ThreadWorker):  # type: ignore[misc]
    """gthread that gives a thread only whole requests; see the module's docstring."""

    settings = ServerConfig()
    board = ConnectionBoard(slots=1)  # worker_class() gives each server its own

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # in the master, before the fork
        self.slot = self.board.take_slot()
        self.paused_until = 0.0  # leaving new connections to the other workers until then
        self.owed_accept = False  # the pause is over: the connection still waiting is ours
        self.limits = Limits(
            request_line=self.cfg.limit_request_line,
            header_fields=self.cfg.limit_request_fields,
            header_field_size=self.cfg.limit_request_field_size,
            body=self.settings.max_body_bytes,
        )
        self.reading: set[BufferedConn] = set()
        self.lingering: dict[socket.socket, float] = {}
        self.next_sweep = 0.0
        self.next_heartbeat = 0.0

    # -- the master ----------------------------------------------------------------------------

    def notify(self) -> None:
        """gunicorn's heartbeat to the master, a system call it makes at every turn of the loop
        (a turn per batch of events under load): here at most once a second, and at least twice
        in the time the master gives a worker (`self.timeout` is half of it)."""
        now = time.monotonic()
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + min(HEARTBEAT_SECONDS, self.timeout / 2)
            super().notify()

    # -- connections spread over the workers (exporter.shares) --------------------------------

    def leave_to_others(self) -> bool:
        """Whether to stop taking connections for DEFER_SECONDS, a worker holding fewer being
        there to take the one waiting; after the pause, that one is taken whoever holds what."""
        if self.owed_accept:
            self.owed_accept = False
            return False
        if self.slot is None or not self.board.over_share(self.slot, self.nr_conns):
            return False
        self.paused_until = time.monotonic() + DEFER_SECONDS
        self.set_accept_enabled(False)
        return True

    def set_accept_enabled(self, enabled: bool) -> None:
        """gthread's loop enables accepting at every turn it could: not while paused."""
        paused = time.monotonic() < self.paused_until
        if enabled and not paused and not self._accepting and self.paused_until:
            self.owed_accept, self.paused_until = True, 0.0
        super().set_accept_enabled(enabled and not paused)
        self.publish_share()  # also the first sign of life, as the loop starts

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        pause_left = self.paused_until - time.monotonic()
        if pause_left > 0:  # wake when the pause ends, not at the loop's next second
            timeout = min(timeout, pause_left)
        super().wait_for_and_dispatch_events(timeout)

    def publish_share(self) -> None:
        if self.slot is not None:
            self.board.publish(self.slot, self.nr_conns if self.alive else None)

    # -- connections waiting for a whole request, in the loop --------------------------------

    def accept(self, listener: socket.socket) -> None:
        if self.leave_to_others():
            return
        try:
            accepted, address = listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        self.nr_conns += 1
        self.publish_share()
        sock = TimedSocket.adopt(accepted, self.settings.client_timeout)
        conn = BufferedConn(self, sock, address, listener.getsockname())
        conn.deadline = time.monotonic() + self.settings.client_timeout
        self.keep_reading(conn)

    def on_client_socket_readable(self, conn: BufferedConn, client: socket.socket) -> None:
        """A kept-alive connection starts its next request: it has client_timeout to send it.

        Mostly the whole request is in already: read it before registering the socket again.
        """
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        conn.deadline = time.monotonic() + self.settings.client_timeout
        self.receive(conn, client)

    def keep_reading(self, conn: BufferedConn) -> None:
        if conn not in self.reading:
            self.reading.add(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.receive, conn))

    def stop_reading(self, conn: BufferedConn) -> None:
        if conn in self.reading:
            self.reading.discard(conn)
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.poller.unregister(conn.sock)

    def receive(self, conn: BufferedConn, client: socket.socket) -> None:
        try:
            data = client.recv(RECEIVE_BYTES)
        except (BlockingIOError, InterruptedError):
            self.keep_reading(conn)
            return
        except OSError:
            data = b""
        if not data:
            self.end_of_input(conn)
        else:
            self.advance(conn, data)

    def end_of_input(self, conn: BufferedConn) -> None:
        """The client closed its side, or reset, before its request was whole."""
        self.stop_reading(conn)
        partial_request = conn.assembly.cut_short()
        if partial_request is None:
            self.nr_conns -= 1
            conn.close()
        else:  # the app answers a cut body as malformed, and counts it
            conn.request = partial_request.request
            self.enqueue_req(conn)

    def advance(self, conn: BufferedConn, data: bytes) -> None:
        step = conn.assembly.add(data)
        if isinstance(step, Waiting):
            if step.send_continue:
                self.send_now(conn.sock, CONTINUE)
            self.keep_reading(conn)
        elif isinstance(step, Complete):
            self.stop_reading(conn)
            conn.request = step.request
            self.enqueue_req(conn)
        elif isinstance(step, Refusal):
            self.refuse(conn, step)

    def refuse(self, conn: BufferedConn, refusal: Refusal) -> None:
        # Not a warning: anyone could fill the logs with these (gunicorn's level hides info).
        self.log.info(
            "Invalid request from ip=%s: %s %s",
            conn.client[0] if isinstance(conn.client, tuple) else conn.client,
            refusal.reason.status.value,
            refusal.message,
        )
        self.stop_reading(conn)
        self.send_now(conn.sock, refusal.response())
        self.nr_conns -= 1
        self.linger(conn.sock)

    @staticmethod
    def send_now(sock: socket.socket, data: bytes) -> None:
        """Small answers fit the socket's buffer; a client that fills it gets none."""
        with contextlib.suppress(OSError):
            sock.send(data)

    # -- the thread: gunicorn parses the buffered request -------------------------------------

    def handle(self, conn: BufferedConn) -> Any:
        conn.init()  # the parser, over the socket, on the connection's first request
        conn.parser.unreader.unread(conn.request)
        conn.request = b""
        conn.sock.hold_writes()
        try:
            keep_alive = super().handle(conn)
        finally:
            sent = conn.sock.send_held()
        return keep_alive if sent else False

    def finish_request(self, conn: BufferedConn, fs: Any) -> None:
        super().finish_request(conn, fs)
        # Bytes of a pipelined request are already buffered: the socket will not signal them.
        if conn.assembly.buffered and conn in self.keepalived_conns:
            self.on_client_socket_readable_buffered(conn)

    def on_client_socket_readable_buffered(self, conn: BufferedConn) -> None:
        self.poller.unregister(conn.sock)
        self.keepalived_conns.remove(conn)
        conn.deadline = time.monotonic() + self.settings.client_timeout
        self.advance(conn, b"")

    # -- closing, by the loop ------------------------------------------------------------------

    def linger(self, sock: socket.socket) -> None:
        """Send FIN, read what the client still sends for a while, then close (RFC 9112 9.6)."""
        try:
            sock.setblocking(False)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        self.lingering[sock] = time.monotonic() + LINGER_SECONDS
        self.poller.register(sock, selectors.EVENT_READ, partial(self.drain, [0]))

    def drain(self, drained: list[int], sock: socket.socket) -> None:
        try:
            data = sock.recv(RECEIVE_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        drained[0] += len(data)
        if not data or drained[0] >= LINGER_BYTES:
            self.close_lingering(sock)

    def close_lingering(self, sock: socket.socket) -> None:
        del self.lingering[sock]
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(sock)
        sock.close()

    def murder_pending(self) -> None:
        """gthread's sweep, run every turn of the loop: also requests and closes past due."""
        super().murder_pending()
        self.owed_accept = False  # the turn that took the connection owed is over
        self.publish_share()
        now = time.monotonic()
        if now < self.next_sweep:  # the loop turns once per batch of events: not every time
            return
        self.next_sweep = now + SWEEP_SECONDS
        if not self.alive:  # stopping: a connection that has sent nothing gets no more time
            for conn in self.reading:
                if not conn.assembly.buffered:
                    conn.deadline = min(conn.deadline, now + LINGER_SECONDS)
        for conn in [conn for conn in self.reading if conn.deadline <= now]:
            self.stop_reading(conn)
            self.nr_conns -= 1
            conn.close()
        for sock in [sock for sock, deadline in self.lingering.items() if deadline <= now]:
            self.close_lingering(sock)


def worker_class(settings: ServerConfig) -> type[BufferingWorker]:
    """The worker class gunicorn loads, carrying the server settings it needs."""
    attributes = {"settings": settings, "board": ConnectionBoard()}
    return type("BufferingWorker", (BufferingWorker,), attributes)
