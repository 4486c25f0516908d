"""How many connections each worker holds, on a board in memory the master's workers share.

Every worker waits on the same listening socket, and the first awake takes each new connection.
A client that opens its connections in a burst and keeps them alive (a load tester, a provider
posting over a few kept-alive connections) can so end up with all of them on one worker: one
process, one core, serving everything while the other idles (docs/performance.md, "Connections
spread over the workers"). With the board, a worker holding more than its share leaves a new
connection to a worker holding fewer for a moment (`DEFER_SECONDS`) before it takes it itself.

The board is an anonymous shared mapping made by the master before it forks; each worker writes
its own slot (its count and when it last wrote) and reads the others'. A slot not written for
`STALE_SECONDS` (a worker dead, stopping or stuck) counts for nothing and may be given again.
No locks: a slot has one writer, and a count read while it changes is only a hint.
"""

from __future__ import annotations

import mmap
import struct
import time
from collections.abc import Callable

SLOTS = 64  # more than the workers alive at once, a reload's old and new ones included
STALE_SECONDS = 2.0  # a live worker writes at every turn of its loop, at least once a second
BOOT_SECONDS = 30.0  # a slot given to a worker is kept this long for it to start writing
DEFER_SECONDS = 0.01  # how long a worker over its share leaves a new connection to the others
SHARE_SLACK = 1  # connections a worker may hold beyond the fewest any other holds
_SLOT = struct.Struct("=qd")  # connections held (-1: not taking any), when written (monotonic)


class ConnectionBoard:
    """The workers' connection counts. Made in the master; slots are given in the master too,
    as it creates each worker (before the fork), so no two live workers get the same one."""

    def __init__(self, slots: int = SLOTS, clock: Callable[[], float] = time.monotonic) -> None:
        self._memory = mmap.mmap(-1, _SLOT.size * slots)  # MAP_SHARED: children see the writes
        self._slots = slots
        self._clock = clock

    def take_slot(self) -> int | None:
        """A slot for a new worker: one never written, or left stale; None if all are live."""
        now = self._clock()
        for slot in range(self._slots):
            _, written = self._read(slot)
            if written == 0.0 or now - written > STALE_SECONDS:
                # Kept while the worker boots (loading the app can take seconds), so that the
                # next worker created meanwhile gets another slot.
                self._write(slot, -1, now + BOOT_SECONDS)
                return slot
        return None

    def publish(self, slot: int, held: int | None) -> None:
        """The worker's count of connections, or None while it takes none (stopping)."""
        self._write(slot, -1 if held is None else held, self._clock())

    def over_share(self, slot: int, held: int) -> bool:
        """Whether a worker holding `held` should leave a new connection to another: some live
        worker taking connections holds fewer than `held - SHARE_SLACK`."""
        now = self._clock()
        for other in range(self._slots):
            if other == slot:
                continue
            count, written = self._read(other)
            if written and now - written <= STALE_SECONDS and 0 <= count < held - SHARE_SLACK:
                return True
        return False

    def _write(self, slot: int, held: int, written: float) -> None:
        _SLOT.pack_into(self._memory, slot * _SLOT.size, held, written)

    def _read(self, slot: int) -> tuple[int, float]:
        held, written = _SLOT.unpack_from(self._memory, slot * _SLOT.size)
        return int(held), float(written)
