"""The call store in one SQLite file in WAL mode, shared by the workers of one host.

A leg's change and the totals it implies are written in one transaction, so a worker killed at
any instant leaves either both or neither; the workers' changes are committed in groups
(exporter.store.groupcommit), and the totals of a group are added up in Python and written once,
just before its COMMIT.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import sqlite3
import struct
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
OPEN_ATTEMPTS = 3  # times a file replaced while it is being opened is opened again
# The byte of a -shm every SQLite connection using it holds a shared lock on (its "dead man
# switch"), and struct flock as Linux lays it out (type, whence, start, length, pid).
SHM_DMS_BYTE = 128
FLOCK = "hhqqii"
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
        # Held while the connection is used, so that `disconnect` can close it from another thread.
        self._connection_lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None

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

    def disconnect(self) -> None:
        """The store is reopening its file: the connection is closed now, and the next round
        opens one to the file the writer has then."""
        with self._connection_lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

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
        try:
            while True:
                self._due.wait()
                self._due.clear()
                if self._stopping:
                    return
                with self._connection_lock:
                    try:
                        self._connection = self._connection or self._connect()
                        self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    except (sqlite3.Error, StoreUnavailable):
                        pass  # busy, failing or reopening now: the next round, or SQLite, retries
        finally:
            self.disconnect()


class _MovedWhileOpening(StoreUnavailable):
    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} was replaced while it was being opened")


class _Reader:
    """A thread's connection for reading; its lock is held while it is used, so that a store
    reopening its file can close it from another thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connection: sqlite3.Connection | None = None
        self.generation = -1

    def close(self) -> None:
        with self.lock:
            if self.connection is not None:
                self.connection.close()
                self.connection = None


class SqliteCallStore:
    """A CallStore in one SQLite file: one connection per process writes, one per thread reads.

    Writers queue twice, each time with `lock_timeout` as deadline (GroupCommit): threads on a
    lock of their process, processes on a flock of `<store>.lock`, which the kernel hands over
    the moment it is released. SQLite's own busy handler, which sleeps 1, 2, 5 ... 100 ms
    between tries however soon the lock comes free, is left for writers from outside. The
    threads that queue together share one commit.

    The file is followed by its path: a change is acknowledged only if, after its COMMIT, the
    path and its -wal and -shm still name the files it went through. When one of them is
    deleted or replaced, the next use opens what is at the path, or creates a new store there,
    with `seed`.
    """

    def __init__(
        self,
        path: str | Path,
        layout: TallyLayout,
        seed: StoreSeed | None = None,
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        self.path = Path(path)
        self._wal, self._shm = (f"{self.path}{suffix}" for suffix in JOURNALS)
        self.layout = layout
        self._seed = seed or StoreSeed()
        # mode=rw: only the writer, under the process lock, may create the file (with our mode).
        self._uri = f"file:{urllib.parse.quote(os.fspath(self.path.absolute()))}?mode=rw"
        self._local = threading.local()
        self._readers: list[_Reader] = []
        self._readers_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        # Which files the writer has open (the store "", its -wal and -shm; empty while none
        # or while reopening), and how many times it has opened a file: readers opened before
        # then reopen.
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
        self._checkpoints = _Checkpointer(self._open_current)
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
            self._close_connections()

    # -- opening the file ----------------------------------------------------------------------

    def _initialise(self) -> None:
        with self._writes.exclusive():
            self._lock_processes()
            try:
                existed = self.path.exists()
                self._open_following(reopening=False)
            finally:
                self._process_lock.release()
        if existed:
            self._warn_if_readable_by_others()

    def _open_following(self, reopening: bool) -> None:
        """`_open_file`, again while the file at `path` moves as it is being opened."""
        for attempt in range(OPEN_ATTEMPTS):
            try:
                self._open_file(reopening)
                return
            except _MovedWhileOpening:
                if attempt == OPEN_ATTEMPTS - 1:
                    raise

    def _open_file(self, reopening: bool) -> None:
        """Make the file at `path` this store's, creating it if missing.

        The caller holds both write locks, and this process has no connection open. The file
        is named before and after SQLite opens it: if the two differ, it was replaced meanwhile
        and which one SQLite has is unknown.
        """
        self._make_directory()
        before = self._create_file()
        noted = _noted_files(self._process_lock.note())
        self._remove_journals_of_a_replaced_file(noted, before)
        self._refuse_an_index_without_its_wal(noted)
        try:
            connection = self._open()
        except sqlite3.Error as exc:
            if before is None or _file_id(self.path) != before:
                raise _MovedWhileOpening(self.path) from exc
            raise self._unusable(exc) from exc
        try:
            meta = self._create_schema(connection, seed=reopening)
            after = _file_id(self.path)
            if after != before:
                raise _MovedWhileOpening(self.path)
            # Named while the writer holds them open, so no other file can have their numbers.
            # SQLite opened them by these names just now, under the process lock, and its -shm
            # is this process's first for the file: they are the ones the writer uses.
            files = {"": after, **{s: _file_id(f"{self.path}{s}") for s in JOURNALS}}
        except sqlite3.Error as exc:
            connection.close()
            raise self._unusable(exc) from exc
        except BaseException:
            connection.close()
            raise
        self._party_key = bytes.fromhex(meta["party_key"])
        self._writer = connection
        self._files = files
        self._generation += 1
        self._process_lock.leave_note(json.dumps(files))

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
            try:
                status = os.stat(self.path)
            except OSError:
                return None
        except OSError as exc:
            raise StoreUnavailable(f"cannot create {self.path}: {exc.strerror}") from exc
        else:
            try:
                status = os.fstat(fd)
            finally:
                os.close(fd)
        if status.st_size == 0:
            self._remove_journals_of_another_file()
        return status.st_dev, status.st_ino

    def _remove_journals_of_another_file(self) -> None:
        """The file at `path` is empty: a -wal or -shm at their paths belongs to another file.

        SQLite switches an empty file to WAL by writing its first page, before it opens a -wal
        or -shm: nobody can be using ones of an empty file. Left there, a deleted file's -shm,
        still held by a worker writing to that file, would be shared with this one (SQLite
        resets a -shm only if no other process holds it): two databases through one index.
        """
        for suffix in JOURNALS:
            name = f"{self.path}{suffix}"
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StoreUnavailable(
                    f"cannot remove {name}, left by a file deleted since: {exc.strerror}"
                ) from exc

    def _remove_journals_of_a_replaced_file(
        self, noted: Mapping[str, FileId], store_file: FileId | None
    ) -> None:
        """Remove a -wal and -shm at their paths that belong to a file no longer at `path`.

        The last worker to open the file noted its files in the lock file. If that file is not
        the one at `path` now, while its -shm is still at its path and in use by another
        process, the -wal and -shm there are that file's (replaced, and still written to by a
        worker that has not seen it yet): SQLite would read the old file's pages from them as
        this one's. A worker starting then has no files of its own to compare with.
        """
        if store_file is None or noted.get("", store_file) == store_file:
            return
        shm = noted.get("-shm")
        if shm is None or _file_id(self._shm) != shm or not _in_use_elsewhere(self._shm):
            return
        for suffix in JOURNALS:
            name = f"{self.path}{suffix}"
            if _file_id(name) == noted.get(suffix):
                with suppress(FileNotFoundError):
                    os.unlink(name)

    def _refuse_an_index_without_its_wal(self, noted: Mapping[str, FileId]) -> None:
        """Refuse to open the file while its -shm, in use by another worker, indexes a -wal
        that is no longer at its path (deleted or replaced by hand).

        SQLite would read that -wal's frames from the one now there, and a change written
        through that index would be lost once the worker using it reopens (it copies its -wal
        into the file, then removes that -shm). It does so at its next write.
        """
        if _file_id(self._shm) != noted.get("-shm") or _file_id(self._wal) == noted.get("-wal"):
            return
        if _in_use_elsewhere(self._shm) and _index_without_its_wal(self._wal, self._shm):
            raise StoreUnavailable(
                f"{self.path}-wal was deleted or replaced while another worker uses "
                f"{self.path}-shm: opened once that worker has copied its -wal into the file"
            )

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
        """`path` and its -wal and -shm still name the files the writer has open.

        A change is in the file at `path` for everyone who opens it only if it went through
        the -wal and -shm at their paths too. SQLite never replaces either while a connection
        has it open; a different one is another file's (or one left after its file was
        deleted) and the writer's is not where anyone opening the path will look. Three stats.
        """
        files = self._files
        return (
            self._writer is not None
            and _file_id(self.path) == files.get("")
            and _file_id(self._wal) == files.get("-wal")
            and _file_id(self._shm) == files.get("-shm")
        )

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
            moved = self._writer is None or _file_id(self.path) != self._files.get("")
            if moved:
                self._discard_old_journals()
            else:
                self._keep_a_wal_gone_from_its_path()
            # The file's -wal or -shm at their paths are then other workers': they stay. The
            # writer's are forgotten with every connection of this process to the file, which
            # SQLite would otherwise give the new writer (one -shm per file and process).
            self._close_connections()
            created = not self.path.exists()
            self._open_following(reopening=True)
        finally:
            self._process_lock.release()
        log.warning(
            "%s was deleted or replaced while in use: %s; changes written to the old %s "
            "since were refused",
            self.path if moved else f"{self.path}-wal or -shm",
            "created a new, empty store" if created else "opened the file now there",
            "file" if moved else "ones",
        )

    def _discard_old_journals(self) -> None:
        """Remove the -wal and -shm of the old file if they are still at their paths.

        SQLite would pair them with the file now at `path` and read the old file's pages as
        its own. They are known for certain: the writer still holds them open, so no other
        file can have their numbers yet.
        """
        for suffix in JOURNALS:
            name = f"{self.path}{suffix}"
            old = self._files.get(suffix)
            if old is not None and _file_id(name) == old:
                with suppress(FileNotFoundError):
                    os.unlink(name)

    def _keep_a_wal_gone_from_its_path(self) -> None:
        """The writer's -wal is no longer at its path (deleted or replaced by hand): copy what
        it holds into the file, then remove its -shm from its path, which indexes it and would
        otherwise go on being used, by every worker, as the index of the -wal now there."""
        wal, shm = self._files.get("-wal"), self._files.get("-shm")
        if self._writer is None or wal is None or _file_id(self._wal) == wal:
            return
        try:
            busy = self._writer.execute("PRAGMA wal_checkpoint(FULL)").fetchone()[0]
        except sqlite3.Error as exc:
            busy = exc
        if busy:
            log.error(
                "%s-wal was deleted or replaced: the changes in the one in use could not all be "
                "copied into the file (%s)",
                self.path,
                "readers busy" if busy == 1 else busy,
            )
        if shm is not None and _file_id(self._shm) == shm:
            with suppress(FileNotFoundError):
                os.unlink(self._shm)

    def _close_connections(self) -> None:
        """Close the writer, the readers and the checkpointer's connection; the caller has the
        write turn. Readers and the checkpointer open nothing until the writer has a file."""
        self._files = {}
        self._checkpoints.disconnect()
        with self._readers_lock:
            readers = list(self._readers)
        for reader in readers:
            reader.close()
        writer, self._writer = self._writer, None
        if writer is not None:
            # SQLite neither checkpoints nor deletes the journals of a file that has moved. Of
            # the file still at `path`, it does only if no other process has the file open:
            # its own -wal into the file, then the -wal and -shm at the paths, nobody's then.
            writer.close()

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

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection for reading, to the file the writer has open."""
        reader: _Reader | None = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = _Reader()
            with self._readers_lock:
                self._readers.append(reader)
        with reader.lock:
            if reader.connection is not None and reader.generation != self._generation:
                reader.connection.close()
                reader.connection = None
            if reader.connection is None:
                generation = self._generation
                reader.connection, reader.generation = self._open_current(), generation
            yield reader.connection

    def _open_current(self) -> sqlite3.Connection:
        """A connection to the file the writer has open, for reading or checkpointing.

        Opened without the process lock, so the path is named before and after: a file
        being created, or replaced meanwhile, is not opened (StoreUnavailable).
        """
        file = self._files.get("")
        if file is None or _file_id(self.path) != file:
            raise StoreUnavailable(f"{self.path} is being reopened")
        connection = self._open()
        if _file_id(self.path) != file:
            connection.close()
            raise StoreUnavailable(f"{self.path} is being reopened")
        return connection

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
        with self._reading() as connection:
            return self._read_snapshot_through(connection)

    def _read_snapshot_through(self, connection: sqlite3.Connection) -> StoreSnapshot:
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
            store._lock_processes()
            # Checked under the process lock, which every worker creating, reopening or
            # opening the file holds: none of them moves a -wal or -shm between this and the
            # BEGIN (a write through another worker's -shm could overwrite its frames).
            if not store._is_current():
                store._process_lock.release()
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
            raise StoreUnavailable(
                f"{store.path}, its -wal or its -shm was deleted or replaced: the change was "
                "not kept"
            )

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


def _noted_files(note: str) -> dict[str, FileId]:
    """The files a writer noted in the lock file (nothing if it holds no such note)."""
    try:
        noted = json.loads(note)
        return {key: (int(dev), int(ino)) for key, (dev, ino) in noted.items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def _index_without_its_wal(wal: str, shm: str) -> bool:
    """Whether the -shm `shm` indexes frames that the -wal `wal` does not hold.

    A -shm starts with SQLite's index header (native byte order): the page size at byte 14,
    the frames in use at 16, the -wal's salts at 32; a -wal starts with its own header (32
    bytes), its salts at 16, then frames of a 24-byte header and a page each.
    """
    try:
        with open(shm, "rb") as file:
            index = file.read(48)
    except OSError:
        return False  # unreadable: left to SQLite
    try:
        with open(wal, "rb") as file:
            header = file.read(32)
            size = os.fstat(file.fileno()).st_size
    except FileNotFoundError:
        header, size = b"", 0  # SQLite would create an empty one
    except OSError:
        return False
    if len(index) < 48 or not index[12]:
        return False  # not initialised: the next connection rebuilds it from the -wal
    page_size, frames = struct.unpack_from("=HI", index, 14)
    if frames == 0:
        return False
    page_size = 65536 if page_size == 1 else page_size
    return header[16:24] != index[32:40] or size < 32 + frames * (24 + page_size)


def _in_use_elsewhere(shm: str) -> bool:
    """Whether another process has a connection using the -shm `shm`.

    Opened and closed here, which drops any lock this process holds on it: called only while
    this process has no connection to the file it indexes.
    """
    try:
        fd = os.open(shm, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        query = struct.pack(FLOCK, fcntl.F_WRLCK, os.SEEK_SET, SHM_DMS_BYTE, 1, 0, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
    except OSError:
        return False
    finally:
        os.close(fd)
    return bool(struct.unpack(FLOCK, answer)[0] != fcntl.F_UNLCK)


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
