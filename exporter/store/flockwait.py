"""Waiting for a flock in the kernel's queue, with a deadline.

`fcntl.flock` has no timeout, and Python retries it whenever a signal interrupts it. Here a
blocked wait is libc's `flock` called through ctypes (the GIL released, no retry on EINTR): the
waiting thread is woken by the kernel the moment the lock is handed to it, with no other thread
in between (docs/performance.md, "Ingest and the PostgreSQL store since the side-by-side
runs"). A watchdog thread interrupts the waits that outlive their deadline with SIGURG aimed at
the waiting thread.

An interrupting signal must have a handler (an ignored signal does not interrupt a system call),
and only the main thread may install one: `enable()` does, when a store is opened in the main
thread, as the server's workers and the command line do. Where it is not enabled, `available()`
is False and the caller waits in another way. SIGURG is ignored by default, so a stray one does
no harm anywhere else, and the exporter has no other use for it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import FrameType
from typing import cast

INTERRUPT = signal.SIGURG
WATCH_PERIOD = 0.05  # seconds between signals to a thread still waiting past its deadline


def _on_interrupt(signum: int, frame: FrameType | None) -> None:
    """Nothing to do: the signal only makes the waiting thread's flock return."""


def _libc_flock() -> Callable[[int, int], int] | None:
    try:
        flock = ctypes.CDLL(None, use_errno=True).flock
    except (OSError, AttributeError):
        return None
    flock.argtypes = [ctypes.c_int, ctypes.c_int]
    flock.restype = ctypes.c_int
    return cast(Callable[[int, int], int], flock)


_flock = _libc_flock()


def enable() -> bool:
    """Install the interrupt's handler if this is the main thread; True if waits can use it."""
    if (
        _flock is not None
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(INTERRUPT) in (signal.SIG_DFL, signal.SIG_IGN, None)
    ):
        signal.signal(INTERRUPT, _on_interrupt)
    return available()


def available() -> bool:
    """Whether `wait` can be given up at its deadline in this process."""
    return _flock is not None and signal.getsignal(INTERRUPT) is _on_interrupt


def wait(fd: int, deadline: float) -> bool:
    """Block until this thread holds the exclusive flock of `fd` (True), or until `deadline`
    on the monotonic clock (False). Other failures raise OSError. Requires `available()`."""
    assert _flock is not None
    with _watchdog.watching(deadline) as expired:
        while not expired.is_set():
            if _flock(fd, fcntl.LOCK_EX) == 0:
                return True
            code = ctypes.get_errno()
            if code != errno.EINTR:  # EINTR: the deadline, or some other signal: look again
                raise OSError(code, os.strerror(code))
    return False


class _Watchdog:
    """Signals every waiting thread past its deadline, again each period until it stops
    waiting: a signal that arrives just before the thread blocks is not lost for good.

    It sleeps until the earliest deadline, not in periods: waits come and go hundreds of times
    a second under load and almost all end long before their deadline, and a thread woken for
    nothing takes the GIL from the one that holds the write turn.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._waits: dict[int, tuple[float, threading.Event]] = {}  # thread ident -> deadline
        self._wake_at = math.inf  # when the watchdog looks next, as it sleeps
        self._pid = -1  # the process whose thread watches; a fork needs its own
        self.looks = 0  # times it woke to look at the waits, for tests
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        """In a forked child: the watchdog and the waiting threads stayed in the parent."""
        self._changed = threading.Condition(threading.Lock())
        self._waits = {}
        self._wake_at = math.inf
        self._pid = -1

    @contextmanager
    def watching(self, deadline: float) -> Iterator[threading.Event]:
        ident, expired = threading.get_ident(), threading.Event()
        with self._changed:
            if self._pid != os.getpid():
                self._start()
            self._waits[ident] = (deadline, expired)
            if deadline < self._wake_at:  # rare: it sleeps until an earlier deadline, or idles
                self._changed.notify()
        try:
            yield expired
        finally:
            # Under the lock: once this returns, the thread is never signalled for this wait.
            with self._changed:
                del self._waits[ident]

    def _start(self) -> None:
        self._pid = os.getpid()
        threading.Thread(target=self._run, name="store-flock-deadline", daemon=True).start()

    def _run(self) -> None:
        with self._changed:
            while True:
                self.looks += 1
                now = time.monotonic()
                for ident, (deadline, expired) in self._waits.items():
                    if now >= deadline:
                        expired.set()
                        _interrupt(ident)
                self._wake_at = min(
                    (max(deadline, now + WATCH_PERIOD) for deadline, _ in self._waits.values()),
                    default=math.inf,
                )
                self._changed.wait(None if self._wake_at == math.inf else self._wake_at - now)
                self._wake_at = -math.inf  # awake: nothing needs to wake it


def _interrupt(ident: int) -> None:
    with suppress(OSError):  # the thread is gone; it can no longer be waiting
        signal.pthread_kill(ident, INTERRUPT)


_watchdog = _Watchdog()
