"""The call store in one SQLite file in WAL mode, shared by the workers of one host.

A leg's change and the totals it implies are written in one transaction, so a worker killed at
any instant leaves either both or neither; the workers' changes are committed in groups
(exporter.store.groupcommit), and the totals of a group are added up in Python and written once,
just before its COMMIT.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from exporter.events import Direction, Service
from exporter.legs import CounterRow, Leg, LegLabels, Tally, TallyKind, TallyLayout, TimingRow
from exporter.store.base import (
    SCHEMA_VERSION,
    UPGRADABLE_VERSIONS,
    LegQuery,
    StoreIncompatible,
    StoreSeed,
    StoreSnapshot,
    StoreUnavailable,
)
from exporter.store.digests import new_party_key, party_digest
from exporter.store.groupcommit import FileId, GroupCommit, ProcessLock, _file_id
from exporter.store.rows import (
    LEG_COLUMNS,
    NEW_LEG_COLUMNS,
    Totals,
    _key,
    _labels,
    _leg,
    _timing_series,
    leg_progress,
    new_leg_values,
)
from exporter.store.sqlite_callers import CALLER_SCHEMA, SqliteCallerBook

R = TypeVar("R")
log = logging.getLogger("exporter.store")
BUSY_TIMEOUT_MS = 10_000
LOCK_TIMEOUT = 10.0  # seconds a write waits for its turn, by default
CHECKPOINT_COMMITS = 100  # about as often as SQLite's default of 1,000 WAL pages
WAL_AUTOCHECKPOINT_PAGES = 10_000
WAL_SIZE_LIMIT = 16 * 1024 * 1024  # bytes the WAL file is cut back to after a checkpoint
PROBE_FRESH = 1.0  # seconds a successful write stands for readiness without a write probe
FAILURE_HOLD = 5.0  # seconds a failed write keeps the store unready, unless a write succeeds
JOURNALS = ("-wal", "-shm")  # the files SQLite keeps next to the store, named after it
# Rows of totals one upsert writes at most: a statement per row count is prepared and cached,
# and SQLite's statement cache (128) must keep the ones of every event too.
TOTALS_PER_STATEMENT = 16


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS legs (
    id INTEGER PRIMARY KEY,
    account INTEGER NOT NULL,
    service TEXT NOT NULL,
    direction TEXT NOT NULL,
    abon TEXT NOT NULL,
    extension TEXT NOT NULL,
    party TEXT,
    call_id TEXT,
    opened_at REAL NOT NULL,
    started_at REAL,
    answered_at REAL,
    closed_at REAL,
    outcome TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS legs_by_call_id
    ON legs (account, call_id, abon) WHERE call_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS legs_by_party
    ON legs (account, service, direction, abon, party, opened_at) WHERE call_id IS NULL;
CREATE INDEX IF NOT EXISTS legs_open ON legs (opened_at) WHERE closed_at IS NULL;
CREATE INDEX IF NOT EXISTS legs_closed ON legs (closed_at) WHERE closed_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS active_legs (
    account INTEGER, service TEXT, direction TEXT, extension TEXT, count INTEGER NOT NULL,
    PRIMARY KEY (account, service, direction, extension)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    kind TEXT, labels TEXT, value REAL NOT NULL, PRIMARY KEY (kind, labels)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS timings (
    kind TEXT, labels TEXT, bucket REAL, count INTEGER NOT NULL, total REAL NOT NULL,
    PRIMARY KEY (kind, labels, bucket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS extensions (
    account INTEGER, extension TEXT, PRIMARY KEY (account, extension)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS last_events (
    account INTEGER, service TEXT, at REAL NOT NULL, PRIMARY KEY (account, service)
) WITHOUT ROWID;
"""


class _Checkpointer:
    """Copies the WAL into the database from a thread of its own, every CHECKPOINT_COMMITS.

    Left to SQLite, the checkpoint (two fsyncs, milliseconds) runs inside the COMMIT of
    whichever event filled the WAL, while every worker waits for the write lock. PASSIVE never
    blocks readers or writers; SQLite's own autocheckpoint stays as a safety net.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._due = threading.Event()
        self._commits = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stale = False

    def committed(self) -> None:
        """Called under the store's write lock after each COMMIT."""
        self._commits += 1
        if self._commits < CHECKPOINT_COMMITS or self._stopping:
            return
        self._commits = 0
        if self._thread is None:
            try:
                self._start()
            except RuntimeError as exc:
                # The commit has happened and must be acknowledged: SQLite's autocheckpoint
                # covers until a thread can be started.
                log.warning("cannot start the checkpoint thread: %s", exc)
                return
        self._due.set()

    def reconnect(self) -> None:
        """The store moved to another file: the next round opens a connection to it."""
        self._stale = True

    def stop(self) -> None:
        """Called under the store's write lock: no commit can start a thread behind it."""
        self._stopping = True
        if self._thread is not None:
            self._due.set()
            self._thread.join()
            self._thread = None

    def _start(self) -> None:
        thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        thread.start()
        self._thread = thread

    def _run(self) -> None:
        connection: sqlite3.Connection | None = None
        try:
            while True:
                self._due.wait()
                self._due.clear()
                if self._stopping:
                    return
                if self._stale and connection is not None:
                    self._stale = False
                    connection.close()
                    connection = None
                try:
                    connection = connection or self._connect()
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:
                    pass  # busy or failing now: the next round, or SQLite's own, retries
        finally:
            if connection is not None:
                connection.close()


class SqliteCallStore:
    """A CallStore in one SQLite file: one connection per process writes, one per thread reads.

    Writers queue twice, each time with `lock_timeout` as deadline (GroupCommit): threads on a
    lock of their process, processes on a flock of `<store>.lock`, which the kernel hands over
    the moment it is released. SQLite's own busy handler, which sleeps 1, 2, 5 ... 100 ms
    between tries however soon the lock comes free, is left for writers from outside. The
    threads that queue together share one commit.

    The file is followed by its path: a change is acknowledged only if, after its COMMIT, the
    path still names the file it went to. When the file is deleted or replaced, the next use
    opens what is at the path, or creates a new store there, with `seed`.
    """

    def __init__(
        self,
        path: str | Path,
        layout: TallyLayout,
        seed: StoreSeed | None = None,
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        self.path = Path(path)
        self.layout = layout
        self._seed = seed or StoreSeed()
        # mode=rw: only the writer, under the process lock, may create the file (with our mode).
        self._uri = f"file:{urllib.parse.quote(os.fspath(self.path.absolute()))}?mode=rw"
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        # Which files the writer has open (the store, its -wal and -shm), and how many times
        # the store has moved to another file: readers opened before then reopen.
        self._files: dict[str, FileId | None] = {}
        self._generation = 0
        # Opened in the process that writes: a flock is shared by every copy of its descriptor,
        # so a descriptor inherited through fork would not keep two workers apart.
        self._process_lock = ProcessLock(
            Path(f"{self.path}.lock"), lock_timeout, before_opening=self._make_directory
        )
        self._journal = _SqliteJournal(self)
        self._writes = GroupCommit(self._journal, lock_timeout)
        # SQLite connections and locks do not survive a fork: a store serves one process.
        self._owner_pid = os.getpid()
        self._closed = False
        self._checkpoints = _Checkpointer(self._open)
        self._party_key = b""
        # Readiness: when a write last succeeded and last failed (monotonic), and why.
        self._write_ok_at: float | None = None
        self._write_failed_at: float | None = None
        self._write_error = ""
        self._initialise()

    # -- CallStore -----------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[_SqliteTransaction]:
        """One change, committed with those of other threads when this returns
        (StoreUnavailable if it could not be)."""
        try:
            with self._writes.change():
                yield _SqliteTransaction(
                    self._write_connection(), self.layout, self._party_key, self._journal.change
                )
        except sqlite3.Error as exc:
            self._note_write(exc)
            raise StoreUnavailable(str(exc)) from exc

    def snapshot(self) -> StoreSnapshot:
        self._check_usable()
        self._follow_path()
        return self._guard(self._read_snapshot)

    def ensure_rows(self, rows: Iterable[CounterRow | TimingRow]) -> None:
        with self.transaction() as tx:
            tx.ensure_rows(rows)

    def reserve_extensions(self, account: int, extensions: Iterable[str]) -> None:
        with self.transaction() as tx:
            tx.reserve_extensions(account, extensions)

    def ping(self) -> None:
        """Whether an event could be stored now, in the file at `path`.

        Unready while the last write failed (for FAILURE_HOLD at most, unless one succeeds);
        ready if a write succeeded within PROBE_FRESH; otherwise a probe writes what an event
        writes, through the same indexes, and commits.
        """
        self._check_usable()
        now = time.monotonic()
        failed_at, ok_at = self._write_failed_at, self._write_ok_at
        if failed_at is not None and (ok_at is None or failed_at >= ok_at):
            if now - failed_at < FAILURE_HOLD:
                raise StoreUnavailable(f"{self.path}: the last write failed: {self._write_error}")
        elif ok_at is not None and now - ok_at < PROBE_FRESH and self._is_current():
            return
        with self.transaction() as tx:
            tx.probe()

    def close(self) -> None:
        """Commits the changes already made; later calls raise StoreUnavailable."""
        with self._writes.exclusive(deadline=False):
            if self._closed:
                return
            self._closed = True
            if self._owner_pid != os.getpid():
                return  # the parent's connections: closing them here could delete its WAL
            # Its threads wait for this COMMIT; the next in line will find the store closed.
            self._writes.end_batch(commit=True)
            self._checkpoints.stop()
            self._process_lock.close()
            self._writer = None
            with self._connections_lock:
                for connection in self._connections:
                    connection.close()
                self._connections.clear()

    # -- opening the file ----------------------------------------------------------------------

    def _initialise(self) -> None:
        with self._writes.exclusive():
            self._lock_processes()
            try:
                existed = self.path.exists()
                self._open_file(reopening=False)
            finally:
                self._process_lock.release()
        if existed:
            self._warn_if_readable_by_others()

    def _open_file(self, reopening: bool) -> None:
        """Make the file at `path` this store's, creating it if missing.

        The caller holds both write locks. The file is named before and after SQLite opens it:
        if the two differ, it was replaced meanwhile and which one SQLite has is unknown.
        """
        self._make_directory()
        before = self._create_file()
        try:
            connection = self._open()
        except sqlite3.Error as exc:
            raise self._unusable(exc) from exc
        try:
            meta = self._create_schema(connection, seed=reopening)
            after = _file_id(self.path)
            if after != before:
                raise StoreUnavailable(f"{self.path} was replaced while it was being opened")
        except sqlite3.Error as exc:
            connection.close()
            raise self._unusable(exc) from exc
        except BaseException:
            connection.close()
            raise
        self._party_key = bytes.fromhex(meta["party_key"])
        old, self._writer = self._writer, connection
        with self._connections_lock:
            self._connections.append(connection)
        # Named while the writer holds them open, so no other file can have their numbers.
        self._files = {"": after, **{s: _file_id(f"{self.path}{s}") for s in JOURNALS}}
        self._generation += 1
        self._checkpoints.reconnect()
        if old is not None:
            # SQLite neither checkpoints nor deletes the journals of a file that has moved.
            self._forget(old)

    def _create_schema(self, connection: sqlite3.Connection, seed: bool) -> dict[str, str]:
        self._check_schema_version(connection)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("BEGIN IMMEDIATE")
        try:
            new = not connection.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'meta'"
            ).fetchone()
            for statement in (SCHEMA + CALLER_SCHEMA).split(";"):
                if statement.strip():
                    connection.execute(statement)
            # A new file gets the version; one of an upgradable version now has its tables.
            connection.execute(
                "INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT DO UPDATE"
                " SET value = excluded.value",
                (SCHEMA_VERSION,),
            )
            connection.execute(
                "INSERT OR IGNORE INTO meta VALUES ('party_key', ?)", (new_party_key(),)
            )
            if new or seed:
                # The seed writes its rows itself: nothing is left to totals written at a COMMIT.
                tx = _SqliteTransaction(connection, self.layout, b"", Totals())
                tx.ensure_rows(self._seed.rows)
                for account, extensions in self._seed.extensions:
                    tx.reserve_extensions(account, extensions)
            meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
            connection.execute("COMMIT")
        except BaseException:
            _rollback(connection)
            raise
        return meta

    def _check_schema_version(self, connection: sqlite3.Connection) -> None:
        """Refuse a store of another schema version before writing anything to it.

        Read under the process lock, which every exporter writing the file holds.
        """
        has_meta = connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if not has_meta:
            return
        row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or row[0] == SCHEMA_VERSION or row[0] in UPGRADABLE_VERSIONS:
            return
        version = str(row[0])
        refusal = f"{self.path} holds schema version {version}, this exporter reads version"
        if version.isdigit() and int(version) > int(SCHEMA_VERSION):
            raise StoreIncompatible(
                f"{refusal} {SCHEMA_VERSION}: it was written by a newer exporter; run that one, "
                "or move the file away to start with an empty store"
            )
        raise StoreIncompatible(f"{refusal} {SCHEMA_VERSION}")

    def _make_directory(self) -> None:
        """The store's directory and any missing parent, for the service user only."""
        missing: list[Path] = []
        directory = self.path.parent
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        try:
            for directory in reversed(missing):
                with suppress(FileExistsError):
                    os.mkdir(directory, 0o700)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create {directory}: {exc.strerror}") from exc

    def _create_file(self) -> FileId | None:
        """The file at `path`, created for the service user only if missing.

        SQLite gives the -wal and -shm it creates the mode of the store file. An existing
        file is not opened here: closing a descriptor of a file drops every lock this process
        holds on it, SQLite's included.
        """
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return _file_id(self.path)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create {self.path}: {exc.strerror}") from exc
        try:
            status = os.fstat(fd)
        finally:
            os.close(fd)
        return status.st_dev, status.st_ino

    def _warn_if_readable_by_others(self) -> None:
        with suppress(OSError):
            mode = self.path.stat().st_mode & 0o777
            if mode & 0o077:
                # Left as the operator set it (a backup agent may read it); said at each start.
                log.warning(
                    "%s has mode %03o: it holds the key of the callers' number digests; "
                    "`chmod 600` it so that only the service user can read it",
                    self.path,
                    mode,
                )

    def _unusable(self, exc: sqlite3.Error) -> StoreUnavailable:
        name = getattr(exc, "sqlite_errorname", "")
        if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
            return StoreUnavailable(
                f"{self.path} is not a SQLite database or is corrupt ({exc}): restore it from "
                "a backup, or move it away to start with an empty store"
            )
        return StoreUnavailable(f"cannot open the call store {self.path}: {exc}")

    # -- following the file at `path` ------------------------------------------------------------

    def _is_current(self) -> bool:
        """`path` still names the file the writer has open."""
        return self._writer is not None and _file_id(self.path) == self._files.get("")

    def _follow_path(self) -> None:
        if not self._is_current():
            with self._writes.exclusive():
                self._check_usable()
                if not self._is_current():
                    self._reopen()

    def _reopen(self) -> None:
        """Open what is now at `path`, or a new store there; the caller has the write turn."""
        self._writes.end_batch(commit=True)  # it went to the old file: refused
        self._lock_processes(follow=True)
        try:
            self._discard_old_journals()
            created = not self.path.exists()
            self._open_file(reopening=True)
        finally:
            self._process_lock.release()
        log.warning(
            "%s was deleted or replaced while in use: %s; changes written to the old file "
            "since were refused",
            self.path,
            "created a new, empty store" if created else "opened the file now there",
        )

    def _discard_old_journals(self) -> None:
        """Remove the -wal and -shm of the old file if they are still at their paths.

        SQLite would pair them with the file now at `path` and read the old file's pages as
        its own. They are known for certain: the writer still holds them open.
        """
        for suffix in JOURNALS:
            name = f"{self.path}{suffix}"
            old = self._files.get(suffix)
            if old is not None and _file_id(name) == old:
                with suppress(FileNotFoundError):
                    os.unlink(name)

    # -- writing -------------------------------------------------------------------------------

    def _note_write(self, error: BaseException | None) -> None:
        """What readiness goes by: whether the latest write stored its change."""
        if error is None:
            self._write_ok_at = time.monotonic()
        else:
            self._write_failed_at = time.monotonic()
            self._write_error = str(error)

    def _lock_processes(self, follow: bool = False) -> None:
        """The cross-process write lock; the caller has the write turn."""
        self._process_lock.acquire(follow)

    def _check_usable(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"{self.path}: the store is closed")
        if self._owner_pid != os.getpid():
            # A forked child sharing the parent's SQLite connections and lock state could have
            # SQLite delete the WAL it is writing to when the parent closes.
            raise StoreUnavailable(
                f"{self.path}: store opened in process {self._owner_pid}, used in "
                f"{os.getpid()}; open one store per process"
            )

    def _write_connection(self) -> sqlite3.Connection:
        """The one connection this process writes through; its threads take turns on it.

        Each connection keeps its own page cache, which SQLite empties whenever another
        connection has written: a writer per thread would only multiply resident memory.
        """
        if self._writer is None:
            raise StoreUnavailable(f"{self.path}: the store is not open")
        return self._writer

    # -- reading -------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection for reading, to the file the writer has open."""
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is not None and self._local.generation != self._generation:
            self._forget(connection)
            connection = None
        if connection is None:
            generation = self._generation
            connection = self._open()
            self._local.connection, self._local.generation = connection, generation
            with self._connections_lock:
                self._connections.append(connection)
        return connection

    def _forget(self, connection: sqlite3.Connection) -> None:
        with self._connections_lock, suppress(ValueError):
            self._connections.remove(connection)
        connection.close()

    def _open(self) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self._uri,
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
        try:
            # NORMAL in WAL mode: a killed process loses nothing; only a power cut can lose
            # the last commits, never the file's consistency.
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            connection.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            connection.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        except sqlite3.Error:
            connection.close()
            raise
        return connection

    def _read_snapshot(self) -> StoreSnapshot:
        connection = self._connection()
        connection.execute("BEGIN")
        try:
            counters: dict[TallyKind, dict[tuple[str, ...], float]] = {}
            for kind, labels, value in connection.execute("SELECT * FROM counters"):
                counters.setdefault(TallyKind(kind), {})[_labels(labels)] = value
            buckets: dict[tuple[TallyKind, str], dict[float, int]] = {}
            totals: dict[tuple[TallyKind, str], float] = {}
            for kind, labels, bucket, count, total in connection.execute("SELECT * FROM timings"):
                key = (TallyKind(kind), labels)
                buckets.setdefault(key, {})[bucket] = count
                totals[key] = totals.get(key, 0.0) + total
            active = {
                LegLabels(account, Service(service), Direction(direction), extension): count
                for account, service, direction, extension, count in connection.execute(
                    "SELECT * FROM active_legs"
                )
            }
            last_events = {
                (account, Service(service)): at
                for account, service, at in connection.execute("SELECT * FROM last_events")
            }
            book = SqliteCallerBook(connection)
            ringing, waiting = dict(book.ringing_calls()), dict(book.waiting_callers())
            first_misses = dict(book.first_misses())
        finally:
            connection.execute("COMMIT")
        return StoreSnapshot(
            counters=counters,
            timings=_timing_series(buckets, totals),
            active=active,
            last_events=last_events,
            ringing_calls=ringing,
            waiting_callers=waiting,
            first_misses=first_misses,
        )

    def _guard(self, action: Callable[[], R]) -> R:
        try:
            return action()
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from exc


class _SqliteJournal:
    """The store's write connection as the group-commit writer uses it.

    The totals of the change being made are summed in `change`, and join the batch's when the
    change is kept; the batch's are written just before its COMMIT. A total then costs a
    statement per batch instead of one per event, and each statement gives up the GIL while
    every writer waits for this one.
    """

    def __init__(self, store: SqliteCallStore) -> None:
        self._store = store
        self.change = Totals()
        self._batch = Totals()

    def begin(self) -> None:
        """BEGIN IMMEDIATE in the file at `path`, under the cross-process lock."""
        store = self._store
        self._forget_totals()  # a new batch starts from nothing, whatever ended the last one
        store._check_usable()
        try:
            if not store._is_current():
                store._reopen()
            store._lock_processes()
            try:
                connection = store._write_connection()
                store._guard(lambda: connection.execute("BEGIN IMMEDIATE"))
            except BaseException:
                store._process_lock.release()
                raise
        except StoreUnavailable as exc:
            store._note_write(exc)
            raise

    def savepoint(self) -> None:
        self._store._write_connection().execute("SAVEPOINT change")

    def kept(self) -> None:
        if self._batch:
            self._batch.add(self.change)
            self.change.clear()
        else:  # the first change's sums are the batch's as they are
            self._batch, self.change = self.change, self._batch

    def undo(self) -> bool:
        self.change.clear()
        connection = self._store._write_connection()
        _rollback(connection, "ROLLBACK TO change")
        _rollback(connection, "RELEASE change")
        return connection.in_transaction

    def commit(self) -> None:
        store = self._store
        connection = store._write_connection()
        try:
            _write_totals(connection, self._batch)
            connection.execute("COMMIT")
        finally:
            self._forget_totals()
        store._checkpoints.committed()
        if not store._is_current():
            # Committed to a file no longer at `path`: lost at the next start.
            raise StoreUnavailable(f"{store.path} was deleted or replaced: the change was not kept")

    def rollback(self) -> None:
        self._forget_totals()
        if self._store._writer is not None:
            _rollback(self._store._writer)

    def finish(self) -> None:
        self._store._process_lock.release()

    def settled(self, error: BaseException | None) -> None:
        self._store._note_write(error)

    def _forget_totals(self) -> None:
        self.change.clear()
        self._batch.clear()


def _write_totals(connection: sqlite3.Connection, totals: Totals) -> None:
    """A batch's totals, a statement per table (and TOTALS_PER_STATEMENT rows)."""
    if totals.counters:
        _upsert(connection, _COUNTERS, _flat(totals.counters))
    if totals.timings:
        values: list[object] = []
        for key, count_and_total in totals.timings.items():
            values += key
            values += count_and_total
        _upsert(connection, _TIMINGS, values)
    if totals.active:
        _upsert(connection, _ACTIVE_LEGS, _flat(totals.active))
    if totals.last_events:
        _upsert(connection, _LAST_EVENTS, _flat(totals.last_events))


def _flat(totals: Mapping[tuple[Any, ...], object]) -> list[object]:
    """Rows of (key..., value), one after the other in one list: the parameters of an upsert."""
    values: list[object] = []
    for key, value in totals.items():
        values += key
        values.append(value)
    return values


# Each table's upsert: its name, its column count, what a row already there becomes.
_COUNTERS = ("counters", 3, "value = value + excluded.value")
_TIMINGS = ("timings", 5, "count = count + excluded.count, total = total + excluded.total")
_ACTIVE_LEGS = ("active_legs", 5, "count = count + excluded.count")
_LAST_EVENTS = ("last_events", 3, "at = max(at, excluded.at)")


def _upsert(
    connection: sqlite3.Connection, table: tuple[str, int, str], values: list[object]
) -> None:
    """One multi-row INSERT ... ON CONFLICT DO UPDATE per TOTALS_PER_STATEMENT rows: cheaper
    than executemany, which runs every row on its own (and gives up the GIL for each)."""
    name, columns, update = table
    step = TOTALS_PER_STATEMENT * columns
    for start in range(0, len(values), step):
        chunk = values[start : start + step] if len(values) > step else values
        connection.execute(_upsert_sql(name, columns, update, len(chunk) // columns), chunk)


@functools.cache
def _upsert_sql(name: str, columns: int, update: str, rows: int) -> str:
    values = ", ".join(["(" + ", ".join("?" * columns) + ")"] * rows)
    return f"INSERT INTO {name} VALUES {values} ON CONFLICT DO UPDATE SET {update}"


_STILL_MATCHES = "(closed_at IS NULL OR closed_at >= ? OR outcome = 'expired')"
_LEGS_OF_EXTENSION = (
    f"SELECT {LEG_COLUMNS} FROM legs"
    " WHERE account = ? AND service = ? AND direction = ? AND abon = ? AND call_id IS NULL"
    f" AND {_STILL_MATCHES} ORDER BY opened_at, id"
)
# The same party, or a leg whose party is unknown (either side may lack the number).
_LEGS_OF_PARTY = (
    f"SELECT {LEG_COLUMNS} FROM legs"
    " WHERE account = ? AND service = ? AND direction = ? AND abon = ? AND call_id IS NULL"
    f" AND party = ? AND {_STILL_MATCHES}"
    f" UNION ALL SELECT {LEG_COLUMNS} FROM legs"
    " WHERE account = ? AND service = ? AND direction = ? AND abon = ? AND call_id IS NULL"
    f" AND party IS NULL AND {_STILL_MATCHES}"
    " ORDER BY opened_at, id"
)


class _SqliteTransaction:
    """One change: its legs written at once, its totals summed in `totals` (see _SqliteJournal)."""

    def __init__(
        self, connection: sqlite3.Connection, layout: TallyLayout, key: bytes, totals: Totals
    ) -> None:
        self.connection = connection
        self.layout = layout
        self._party_key = key
        self.totals = totals
        self._callers: SqliteCallerBook | None = None

    @property
    def callers(self) -> SqliteCallerBook:
        if self._callers is None:
            self._callers = SqliteCallerBook(self.connection)
        return self._callers

    def digest(self, number: str) -> str:
        digest = party_digest(self._party_key, number)
        assert digest is not None
        return digest

    def legs_matching(self, query: LegQuery) -> list[Leg]:
        if query.call_id is not None:
            rows = self.connection.execute(
                f"SELECT {LEG_COLUMNS} FROM legs WHERE account = ? AND call_id = ? AND abon = ?",
                (query.account, query.call_id, query.abon),
            )
            return [_leg(row) for row in rows]
        party = self._party(query.party)
        extension = (query.account, query.service.value, query.direction.value, query.abon)
        if party is None:
            rows = self.connection.execute(_LEGS_OF_EXTENSION, (*extension, query.closed_since))
        else:
            # Two seeks in legs_by_party, not a walk over every recent leg of the extension.
            rows = self.connection.execute(
                _LEGS_OF_PARTY,
                (*extension, party, query.closed_since, *extension, query.closed_since),
            )
        return [_leg(row, party) for row in rows]

    def insert_leg(self, leg: Leg, did: str | None) -> None:
        labels = leg.labels
        cursor = self.connection.execute(
            f"INSERT INTO legs ({NEW_LEG_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            new_leg_values(leg, self._party(did)),
        )
        leg.id = cursor.lastrowid
        if leg.is_open:
            self._count_active(labels, +1)

    def save_leg(self, leg: Leg) -> None:
        cursor = self.connection.execute(
            "UPDATE legs SET started_at = ?, answered_at = ?, closed_at = ?, outcome = ?"
            " WHERE id = ? AND closed_at IS NULL",
            (*leg_progress(leg), leg.id),
        )
        if not cursor.rowcount:
            # Closed already: a late start is all that is left to record.
            self.connection.execute(
                "UPDATE legs SET started_at = ? WHERE id = ?", (leg.started_at, leg.id)
            )
        elif not leg.is_open:
            self._count_active(leg.labels, -1)

    def open_legs_before(self, opened_before: float) -> list[Leg]:
        rows = self.connection.execute(
            f"SELECT {LEG_COLUMNS} FROM legs WHERE closed_at IS NULL AND opened_at < ?"
            " ORDER BY opened_at",
            (opened_before,),
        )
        return [_leg(row) for row in rows]

    def forget_closed_legs(self, with_call_id_before: float, without_call_id_before: float) -> None:
        self.connection.execute("DELETE FROM legs WHERE closed_at < ?", (with_call_id_before,))
        # Without a call_id a closed leg only matters for the duplicate window, except an
        # expired one, which absorbs the end of a call that outlived calls.max_duration.
        self.connection.execute(
            "DELETE FROM legs WHERE call_id IS NULL AND closed_at < ? AND outcome != 'expired'",
            (without_call_id_before,),
        )

    def admit_extension(self, account: int, extension: str, limit: int) -> bool:
        known = self.connection.execute(
            "SELECT 1 FROM extensions WHERE account = ? AND extension = ?", (account, extension)
        ).fetchone()
        if known:
            return True
        (used,) = self.connection.execute(
            "SELECT count(*) FROM extensions WHERE account = ?", (account,)
        ).fetchone()
        if used >= limit:
            return False
        self.connection.execute("INSERT INTO extensions VALUES (?, ?)", (account, extension))
        return True

    def touch(self, account: int, service: Service, at: float) -> None:
        self.totals.touch(account, service, at)

    def reserve_extensions(self, account: int, extensions: Iterable[str]) -> None:
        self.connection.executemany(
            "INSERT OR IGNORE INTO extensions VALUES (?, ?)",
            [(account, extension) for extension in extensions],
        )

    def probe(self) -> None:
        """Write what events write, through the indexes they use, and take it back.

        Committed by the caller: the pages it changed go to disk as an event's would.
        """
        for call_id, party in (("probe", None), (None, "probe")):
            self.connection.execute(
                "INSERT INTO legs (account, service, direction, abon, extension, party,"
                " call_id, opened_at) VALUES (-1, '', '', '', '', ?, ?, 0)",
                (party, call_id),
            )
        self.connection.execute("UPDATE legs SET closed_at = 0 WHERE account = -1")
        self.connection.execute("DELETE FROM legs WHERE account = -1")
        self.connection.execute(
            "INSERT INTO counters VALUES ('probe', '[]', 1)"
            " ON CONFLICT DO UPDATE SET value = value + 1"
        )
        self.connection.execute("DELETE FROM counters WHERE kind = 'probe'")

    def ensure_rows(self, rows: Iterable[CounterRow | TimingRow]) -> None:
        counters, timings = [], []
        for row in rows:
            if isinstance(row, CounterRow):
                counters.append((row.kind.value, _key(row.labels)))
            else:
                timings.append((row.kind.value, _key(row.labels), row.bucket))
        self.connection.executemany("INSERT OR IGNORE INTO counters VALUES (?, ?, 0)", counters)
        self.connection.executemany("INSERT OR IGNORE INTO timings VALUES (?, ?, ?, 0, 0)", timings)

    def record(self, tallies: Iterable[Tally]) -> None:
        self.totals.record(self.layout, tallies)

    def _count_active(self, labels: LegLabels, change: int) -> None:
        self.totals.count_active(labels, change)

    def _party(self, did: str | None) -> str | None:
        return party_digest(self._party_key, did)


def _rollback(connection: sqlite3.Connection, statement: str = "ROLLBACK") -> None:
    with suppress(sqlite3.Error):  # a failed COMMIT may already have rolled back
        connection.execute(statement)
