"""Group commit: changes of several threads in one transaction, one COMMIT for all of them.

Writers queue twice: threads on a lock of their process, processes on a flock of a lock file
(`ProcessLock`). While other threads of the process wait for the lock, the transaction stays
open and they add their changes to it, each in a savepoint of its own; the last of them, or the
one that fills the batch to MAX_BATCH, commits for all. No thread returns before the COMMIT
that holds its change, so a killed process loses only changes nobody was told about.

Both waits have a deadline: a stalled peer (a process stopped while holding the flock, a
thread stuck in a COMMIT) gives StoreUnavailable, never a request waiting forever.

The database is reached through a `Journal`, so the rules here are tested on their own.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from exporter.store import flockwait
from exporter.store.base import StoreUnavailable

MAX_BATCH = 32  # changes committed together at most
NOTE_LIMIT = 4096  # bytes of a lock file's note read at most


class Journal(Protocol):
    """The database as the group-commit writer needs it: one transaction at a time."""

    def begin(self) -> None:
        """Take the process lock and open a transaction (StoreUnavailable if it cannot)."""

    def savepoint(self) -> None:
        """A savepoint named for changes. Never released: the next change's nests in it, one
        statement less per change, and ROLLBACK TO goes back to the latest of the name."""

    def kept(self) -> None:
        """The change just made is the batch's now: what it left for the COMMIT joins the
        batch's."""

    def undo(self) -> bool:
        """Roll back to the savepoint, with what the change left for the COMMIT; False if the
        database gave up the whole transaction."""

    def commit(self) -> None:
        """Write what the batch's changes left for it, then COMMIT; raises if the batch's
        changes were not kept."""

    def rollback(self) -> None:
        """Roll back whatever is open, with what the batch's changes left for the COMMIT;
        never raises."""

    def finish(self) -> None:
        """Release the process lock, after the COMMIT or ROLLBACK."""

    def settled(self, error: BaseException | None) -> None:
        """A write ended: its changes were kept (None) or not."""


class Batch:
    """The changes of one transaction, and how its commit went."""

    def __init__(self) -> None:
        self.size = 0
        self.error: BaseException | None = None
        # Held until the batch ends; its members wait by taking it in turn (cheaper than an Event).
        self.done = threading.Lock()
        self.done.acquire()

    def wait(self) -> None:
        with self.done:
            pass


class GroupCommit:
    """The write queue of one process: `change()` once per change, from any thread."""

    def __init__(self, journal: Journal, lock_timeout: float) -> None:
        self._journal = journal
        self.lock_timeout = lock_timeout
        self._lock = threading.Lock()
        self._batch: Batch | None = None
        self._waiting = 0
        self._waiting_lock = threading.Lock()

    @property
    def waiting(self) -> int:
        """Threads waiting to add their change."""
        return self._waiting

    @property
    def locked(self) -> bool:
        return self._lock.locked()

    @contextmanager
    def exclusive(self, deadline: bool = True) -> Iterator[None]:
        """This process's write turn; StoreUnavailable past `lock_timeout` with `deadline`."""
        self._take_turn(deadline)
        try:
            yield
        finally:
            self._lock.release()

    @contextmanager
    def change(self) -> Iterator[None]:
        """One change, committed when this returns (StoreUnavailable if it was not).

        A change that raises is rolled back alone and its exception re-raised as it is.
        """
        failure: BaseException | None = None
        self._take_turn(deadline=True)
        try:
            batch = self._join()
            first = batch.size == 0  # the first change has the whole transaction to itself
            try:
                if not first:
                    self._journal.savepoint()
                yield
                batch.size += 1
                self._journal.kept()
            except BaseException as exc:
                failure = exc
                self._undo(batch, first, exc)
            if self._batch is batch and (batch.size >= MAX_BATCH or not self._waiting):
                self.end_batch(commit=True)
        finally:
            self._lock.release()
        if failure is not None:
            raise failure
        batch.wait()
        if batch.error is not None:
            if isinstance(batch.error, StoreUnavailable):
                raise batch.error
            raise StoreUnavailable(str(batch.error)) from batch.error

    def _take_turn(self, deadline: bool) -> None:
        with self._waiting_lock:
            self._waiting += 1
        try:
            taken = self._lock.acquire(timeout=self.lock_timeout if deadline else -1)
        finally:
            with self._waiting_lock:
                self._waiting -= 1
        if not taken:
            raise StoreUnavailable(
                f"no turn to write within {self.lock_timeout:g} s: another write is stalled"
            )

    def end_batch(self, commit: bool, error: BaseException | None = None) -> None:
        """End the open batch, if any; the caller has the write turn."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        batch.error = error
        try:
            if commit:
                self._journal.commit()
            else:
                self._journal.rollback()
        except Exception as exc:
            batch.error = exc
            self._journal.rollback()
        finally:
            if commit or batch.error is not None:
                self._journal.settled(batch.error)
            try:
                self._journal.finish()
            finally:
                batch.done.release()

    def _join(self) -> Batch:
        if self._batch is None:
            self._journal.begin()
            self._batch = Batch()
        return self._batch

    def _undo(self, batch: Batch, first: bool, exc: BaseException) -> None:
        if first:
            self.end_batch(commit=False)
        elif not self._journal.undo():
            # The whole transaction is gone (disk full, I/O error): the changes before this
            # one are lost too, and their threads must hear it.
            self.end_batch(commit=False, error=exc)


class ProcessLock:
    """An exclusive flock of `path`, shared by every process writing one store.

    Tried at once without blocking; when busy, the caller waits in the kernel's queue for it,
    so that the kernel hands the lock over the moment it is released (a poller would only see
    it free between another process's batches and could wait forever), until `timeout`. The
    caller blocks in flock itself where `flockwait` can interrupt it at the deadline (a store
    opened in the main thread); elsewhere a helper thread blocks in flock while the caller
    waits for it, which costs two more thread wake-ups at every hand-over. A wait given up
    leaves its helper blocked: the next wait takes it over, or the helper releases the lock as
    soon as it gets it. The lock is used under the process's write turn, so one caller at a
    time. Opened in the process that uses it: a descriptor inherited through fork shares its
    lock.
    """

    def __init__(
        self, path: Path, timeout: float, before_opening: Callable[[], None] = lambda: None
    ) -> None:
        self.path = path
        self.timeout = timeout
        self._before_opening = before_opening  # such as creating a directory deleted meanwhile
        self._fd = -1
        self._state = threading.Condition(threading.Lock())
        self._blocked_fd = -1  # the descriptor a helper is blocked on, if any
        self._wanted = False  # a caller waits for that helper
        self._granted = False  # the helper took the lock for that caller
        self._failure: OSError | None = None
        flockwait.enable()

    def acquire(self, follow: bool = False) -> None:
        """With `follow`, a lock file deleted or replaced since it was opened is reopened, so
        that processes recreating the store take the same lock."""
        deadline = time.monotonic() + self.timeout
        for _ in range(10):
            if self._fd < 0:
                self._before_opening()
                try:
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                except OSError as exc:
                    raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc
            self._take(deadline)
            if not follow or _file_id(self.path) == _fd_id(self._fd):
                return
            self.close()  # also unlocks it
        raise StoreUnavailable(f"{self.path} keeps being replaced")

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def note(self) -> str:
        """What the holders of the lock leave in its file for each other; read holding it."""
        try:
            return os.pread(self._fd, NOTE_LIMIT, 0).decode(errors="replace")
        except OSError:
            return ""

    def leave_note(self, note: str) -> None:
        """Replace the note, holding the lock; none is left if it cannot be written whole."""
        data = note.encode()
        try:
            os.ftruncate(self._fd, 0)
            if os.pwrite(self._fd, data, 0) != len(data):
                os.ftruncate(self._fd, 0)
        except OSError:
            pass  # a lock file that cannot be written (disk full) holds no note, or a partial one

    def close(self) -> None:
        with self._state:
            # A blocked helper closes its descriptor itself once flock returns.
            if self._fd >= 0 and self._fd != self._blocked_fd:
                os.close(self._fd)
            self._fd = -1

    def _take(self, deadline: float) -> None:
        # Read without `_state`: only callers start a helper, one at a time, and a helper only
        # ever clears it.
        if self._blocked_fd < 0:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            if flockwait.available():
                self._wait_in_kernel(deadline)
                return
        with self._state:
            if self._blocked_fd < 0:
                self._wait_in_helper(self._fd)
            elif self._blocked_fd != self._fd:
                raise StoreUnavailable(f"{self.path}: still waiting for a lock file replaced since")
            self._wanted, self._failure = True, None
            try:
                granted = self._state.wait_for(
                    lambda: self._granted or self._failure is not None,
                    timeout=max(deadline - time.monotonic(), 0.0),
                )
            finally:
                self._wanted = False
            if self._failure is not None:
                raise StoreUnavailable(f"cannot lock {self.path}: {self._failure}")
            if not granted:
                raise StoreUnavailable(
                    f"{self.path} has been held by another process for {self.timeout:g} s"
                )
            self._granted = False

    def _wait_in_kernel(self, deadline: float) -> None:
        try:
            taken = flockwait.wait(self._fd, deadline)
        except OSError as exc:
            raise StoreUnavailable(f"cannot lock {self.path}: {exc}") from exc
        if not taken:
            raise StoreUnavailable(
                f"{self.path} has been held by another process for {self.timeout:g} s"
            )

    def _wait_in_helper(self, fd: int) -> None:
        """Start a thread blocking in flock for `fd`; the caller holds `_state`."""
        thread = threading.Thread(target=self._block, args=(fd,), name="store-flock", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:
            raise StoreUnavailable(f"cannot wait for {self.path}: {exc}") from exc
        self._blocked_fd = fd

    def _block(self, fd: int) -> None:
        failure: OSError | None = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            failure = exc
        with self._state:
            self._blocked_fd = -1
            if failure is not None:
                self._failure = failure
            elif self._wanted:
                self._granted = True
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)  # its caller gave up waiting
            if fd != self._fd:
                os.close(fd)  # closed while it was blocked
            self._state.notify_all()


FileId = tuple[int, int]  # (st_dev, st_ino): which file a path names


def _file_id(path: str | Path) -> FileId | None:
    """Which file `path` names now, or None if none (or it cannot be looked up)."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _fd_id(fd: int) -> FileId:
    status = os.fstat(fd)
    return status.st_dev, status.st_ino
