"""Connections spread over the workers: the shared board, and a real server taking a burst."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from exporter.shares import BOOT_SECONDS, STALE_SECONDS, ConnectionBoard
from tests.conftest import ServerProcess

StartServer = Callable[..., ServerProcess]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_each_worker_created_gets_its_own_slot_until_none_is_left(clock: Clock) -> None:
    board = ConnectionBoard(slots=3, clock=clock)
    assert [board.take_slot() for _ in range(4)] == [0, 1, 2, None]


def test_a_slot_is_kept_while_its_worker_boots_then_given_again_once_stale(clock: Clock) -> None:
    board = ConnectionBoard(slots=2, clock=clock)
    assert board.take_slot() == 0
    clock.now += BOOT_SECONDS  # a slow boot: never written yet, still kept
    assert board.take_slot() == 1
    board.publish(1, 3)
    clock.now += STALE_SECONDS + 0.1  # slot 0 never wrote, slot 1 stopped writing: both stale
    assert board.take_slot() == 0
    assert board.take_slot() == 1


def test_a_worker_is_over_its_share_only_against_a_live_worker_holding_fewer(
    clock: Clock,
) -> None:
    board = ConnectionBoard(slots=3, clock=clock)
    mine, other, third = 0, 1, 2
    assert [board.take_slot() for _ in range(3)] == [mine, other, third]
    assert not board.over_share(mine, 5)  # the others have not written yet: booting
    board.publish(other, 3)
    board.publish(third, 9)
    assert not board.over_share(mine, 4)  # one more than the fewest is within the share
    assert board.over_share(mine, 5)
    board.publish(other, None)  # stopping: takes no connections, so leave none to it
    assert not board.over_share(mine, 5)
    board.publish(other, 0)
    clock.now += STALE_SECONDS + 0.1  # dead or stuck: its count says nothing
    board.publish(mine, 5)
    assert not board.over_share(mine, 5)


def test_a_worker_alone_is_never_over_its_share(clock: Clock) -> None:
    board = ConnectionBoard(slots=4, clock=clock)
    slot = board.take_slot()
    assert slot is not None
    board.publish(slot, 100)
    assert not board.over_share(slot, 100)


def test_the_board_is_shared_with_the_processes_forked_after_it() -> None:
    board = ConnectionBoard(slots=2)
    first, second = 0, 1
    assert [board.take_slot(), board.take_slot()] == [first, second]
    board.publish(first, 9)
    child = os.fork()
    if child == 0:  # the worker: writes its count, as gunicorn's workers do after the fork
        board.publish(second, 2)
        os._exit(0)
    os.waitpid(child, 0)
    assert board.over_share(first, 9)  # the child's count of 2 is seen by the parent


# -- a real server ---------------------------------------------------------------------------


def established_per_worker(server: ServerProcess) -> dict[int, int]:
    """Connections to the server's port each worker holds, from /proc."""
    port_hex = f":{server.port:04X}"
    established: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(port_hex) and fields[3] == "01":  # local port, ESTABLISHED
                established.add(fields[9])  # the socket's inode
    return {pid: len(socket_inodes(pid) & established) for pid in server.worker_pids()}


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile (the previous burst's)
            inodes.add(os.readlink(fd).removeprefix("socket:[").removesuffix("]"))
    return inodes


def request(sock: socket.socket) -> None:
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        assert chunk, "closed before answering"
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer


@pytest.mark.server
def test_connections_opened_in_a_burst_are_spread_over_the_workers(
    start_server: StartServer,
) -> None:
    server = start_server(workers=2)  # started: every worker in its loop
    spreads = [burst_of_kept_alive_connections(server, 16) for _ in range(5)]
    for held in spreads:
        assert sum(held.values()) == 16, spreads
    # Without the board, one worker holds 11 to 16 of them in one burst of five or more.
    assert all(min(held.values()) >= 6 for held in spreads), spreads


def burst_of_kept_alive_connections(server: ServerProcess, count: int) -> dict[int, int]:
    """Opens `count` connections at once, a request answered on each; who holds them."""
    connections = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(count)]
    try:
        for sock in connections:
            request(sock)  # each kept alive, answered by the worker holding it
        return established_per_worker(server)
    finally:
        for sock in connections:
            sock.close()
        deadline = time.monotonic() + 10
        while sum(established_per_worker(server).values()) and time.monotonic() < deadline:
            time.sleep(0.05)  # the workers see the closes before the next burst
