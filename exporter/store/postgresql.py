"""The call store in PostgreSQL, shared by exporter replicas on several hosts.

Same tables and semantics as the SQLite store: each change and the totals it implies are
committed before `transaction()` returns, so an event is acknowledged only once it is durable
(synchronous_commit as the server has it, on by default).

Group commit, as in the SQLite store: the changes of a process's threads go through one
writer connection (`GroupCommit`), and those queued together share one transaction, each in a
savepoint of its own (a failing change rolls back alone), and one COMMIT, that is one WAL flush
for up to MAX_BATCH events. Every thread waits for the COMMIT that holds its change.

Locking, so that replicas never both act on one leg:
- An event first takes a transaction-scoped advisory lock on its matching key, (account,
  call_id, abon) or, without a call_id, (account, service, direction, abon); then reads its
  candidate legs `FOR UPDATE`. Copies of one event reaching two replicas at once are thereby
  handled one after the other, and the second sees the leg the first opened; legs without a
  call_id are taken FIFO by one transaction at a time.
- Locks are held until the batch commits. A change never waits for a lock while its batch holds
  other changes' locks: it tries the lock (and its rows, NOWAIT), and if either is taken, the
  batch's other changes are committed first and it goes on alone in a new transaction. Two
  processes' batches therefore never wait for each other in a cycle.
- Expiry and cleanup lock the legs they change `FOR UPDATE SKIP LOCKED`: a leg an event holds
  is left to that event (which expires it itself if it is overdue), and one another replica's
  expiry holds or closed is not taken again. Each leg expires once; expiry never waits for legs.
- An extension's admission takes an advisory lock per account, so the limit holds across
  replicas. Admissions are never taken back: once committed, the writer remembers them.
- The caller level's records (`pgcallers`) are under advisory locks per caller (and call_id),
  and per account in share mode; an event takes those of the callers it may reach (the caller
  level's `CallerScope`, in its `LegQuery`) right after its legs' lock and in the same way, or
  the account's exclusive lock when it cannot tell which caller. Lock order: legs, the callers'
  keys ascending, the account's; after legs_matching a change waits for none of them: a record
  outside its locks makes it undone and made again with the whole account (StoreRetry), so no
  change waits holding a lock later in the order. Expiry tries the accounts' exclusive locks and
  leaves the legs of an account held elsewhere; settle sweeps only try them, and not in an
  event's change before its legs are locked (see `may_sweep`).
- Totals (counters, timings, active legs, last events) are accumulated in Python during the
  batch and written before its COMMIT with `INSERT ... ON CONFLICT DO UPDATE SET value = value
  + excluded.value`, tables in one fixed order and rows in key order, so two transactions never
  wait on each other in a cycle. Each total is kept in SHARDS rows, one per connection's shard,
  summed when read: two replicas' batches then lock different rows.
- Changes lock tables only in modes that never conflict (ACCESS SHARE, ROW SHARE, ROW
  EXCLUSIVE). The schema's statements lock more (CREATE INDEX IF NOT EXISTS takes its table's SHARE
  lock even when the index exists), so a process starting on a current schema runs none of them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from typing import Any, NamedTuple

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from exporter.events import Direction, Service
from exporter.legs import CounterRow, Leg, LegLabels, Tally, TallyKind, TallyLayout, TimingRow
from exporter.store.base import (
    SCHEMA_VERSION,
    UPGRADABLE_VERSIONS,
    LegQuery,
    StoreIncompatible,
    StoreRetry,
    StoreSnapshot,
    StoreUnavailable,
)
from exporter.store.digests import new_party_key, party_digest
from exporter.store.groupcommit import MAX_BATCH
from exporter.store.pgcallers import (
    CALLER_SCHEMA,
    LOCK_CALLERS,
    LOCK_SOME_CALLERS,
    TRY_ALL_CALLERS,
    TRY_LOCK_CALLERS,
    TRY_SOME_CALLERS,
    PostgresCallerBook,
    scope_keys,
)
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

# Advisory lock classes: a constant of our own, so that other users of the database are not hit.
LEG_LOCKS = 0x6D636E01
EXTENSION_LOCKS = 0x6D636E02
SCHEMA_LOCK = 0x6D636E03
# Totals are kept in this many rows each, summed when read: every event adds to the same few
# totals, and a single row would make concurrent transactions wait for each other's COMMIT.
SHARDS = 16

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS legs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account bigint NOT NULL,
    service text NOT NULL,
    direction text NOT NULL,
    abon text NOT NULL,
    extension text NOT NULL,
    party text,
    call_id text,
    opened_at double precision NOT NULL,
    started_at double precision,
    answered_at double precision,
    closed_at double precision,
    outcome text
);
CREATE UNIQUE INDEX IF NOT EXISTS legs_by_call_id
    ON legs (account, call_id, abon) WHERE call_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS legs_by_party
    ON legs (account, service, direction, abon, party, opened_at) WHERE call_id IS NULL;
CREATE INDEX IF NOT EXISTS legs_open ON legs (opened_at) WHERE closed_at IS NULL;
CREATE INDEX IF NOT EXISTS legs_closed ON legs (closed_at) WHERE closed_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS active_legs (
    account bigint, service text, direction text, extension text, shard smallint,
    count bigint NOT NULL, PRIMARY KEY (account, service, direction, extension, shard)
);
CREATE TABLE IF NOT EXISTS counters (
    kind text, labels text, shard smallint, value double precision NOT NULL,
    PRIMARY KEY (kind, labels, shard)
);
CREATE TABLE IF NOT EXISTS timings (
    kind text, labels text, bucket double precision, shard smallint, count bigint NOT NULL,
    total double precision NOT NULL, PRIMARY KEY (kind, labels, bucket, shard)
);
CREATE TABLE IF NOT EXISTS extensions (
    account bigint, extension text, PRIMARY KEY (account, extension)
);
CREATE TABLE IF NOT EXISTS last_events (
    account bigint, service text, shard smallint, at double precision NOT NULL,
    PRIMARY KEY (account, service, shard)
);
"""

_STILL_MATCHES = "(closed_at IS NULL OR closed_at >= %s OR outcome = 'expired')"
_LEGS_OF_CALL = (
    f"SELECT {LEG_COLUMNS} FROM legs WHERE account = %s AND call_id = %s AND abon = %s FOR UPDATE"
)
_LEGS_OF_EXTENSION = (
    f"SELECT {LEG_COLUMNS} FROM legs"
    " WHERE account = %s AND service = %s AND direction = %s AND abon = %s AND call_id IS NULL"
    f" AND {_STILL_MATCHES} ORDER BY opened_at, id FOR UPDATE"
)
# The same party, or a leg whose party is unknown (either side may lack the number).
_LEGS_OF_PARTY = (
    f"SELECT {LEG_COLUMNS} FROM legs"
    " WHERE account = %s AND service = %s AND direction = %s AND abon = %s AND call_id IS NULL"
    f" AND (party = %s OR party IS NULL) AND {_STILL_MATCHES} ORDER BY opened_at, id FOR UPDATE"
)


class PostgresCallStore:
    """A CallStore in a PostgreSQL database, through a small pool of connections.

    Changes go through one writer per process (`GroupCommit`): the changes of threads arriving
    together share one transaction and one COMMIT, as the SQLite store's do. Snapshots and
    pings read over the other pooled connections.

    `connect_timeout` bounds the wait for a connection (the server down or restarting gives
    StoreUnavailable after it), `statement_timeout` each statement, lock waits included: keep
    both well below the HTTP server's timeout. The pool reconnects on its own.
    """

    def __init__(
        self,
        url: str,
        layout: TallyLayout,
        *,
        connect_timeout: float = 2.0,
        statement_timeout: float = 5.0,
        max_connections: int = 8,
    ) -> None:
        self.layout = layout
        self._connect_timeout = connect_timeout
        self._statement_timeout_ms = max(1, round(statement_timeout * 1000))
        self._owner_pid = os.getpid()
        self._closed = False
        # Extensions whose admission has committed: never taken back, so never asked again.
        self._admitted: set[tuple[int, str]] = set()
        # Per thread: its last change was undone to be made again with whole accounts locked.
        self._again = threading.local()
        # Over a connection of its own, so that a wrong URL, password or database name is
        # reported as libpq words it, not as a pool waiting in vain.
        self._party_key = self._initialise(url)
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs=self._connection_options(),
            configure=self._configure,
            timeout=connect_timeout,
            # Give up a failing reconnection soon: the next request starts a fresh one, so the
            # store is back as soon as the server is, not after an ever longer backoff.
            reconnect_timeout=connect_timeout,
            name="mcn-exporter",
            open=True,
        )
        self.writer = GroupCommit(
            begin=lambda: self._connection_in_transaction("BEGIN"),
            release=self._release,
            before_commit=lambda batch: batch.totals.write(batch.connection),
            after_commit=lambda batch: self._admitted.update(batch.admitted),
            # A turn waits for the changes queued before it: a few statements each at most.
            queue_timeout=connect_timeout + 2 * statement_timeout,
        )

    # -- CallStore -----------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[_PostgresTransaction]:
        """One change, committed (with the changes of other threads) when this returns."""
        self._check_usable()
        whole_accounts = self._again.__dict__.pop("whole_accounts", False)
        with self.writer.change() as change:
            try:
                yield _PostgresTransaction(
                    change, self.layout, self._party_key, self._admitted, whole_accounts
                )
            except StoreRetry:
                self._again.whole_accounts = True
                raise

    def snapshot(self) -> StoreSnapshot:
        with self._begun("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY") as connection:
            snapshot = _read_snapshot(connection)
            connection.execute("COMMIT")
        return snapshot

    def ensure_rows(self, rows: Iterable[CounterRow | TimingRow]) -> None:
        counters: set[tuple[str, str]] = set()
        timings: set[tuple[str, str, float]] = set()
        for row in rows:
            if isinstance(row, CounterRow):
                counters.add((row.kind.value, _key(row.labels)))
            else:
                timings.add((row.kind.value, _key(row.labels), row.bucket))
        with self.transaction() as tx:
            # In the order tallies are written in, so that neither waits on the other for long.
            if counters:
                tx.connection.cursor().executemany(
                    "INSERT INTO counters VALUES (%s, %s, 0, 0) ON CONFLICT DO NOTHING",
                    sorted(counters),
                )
            if timings:
                tx.connection.cursor().executemany(
                    "INSERT INTO timings VALUES (%s, %s, %s, 0, 0, 0) ON CONFLICT DO NOTHING",
                    sorted(timings),
                )

    def reserve_extensions(self, account: int, extensions: Iterable[str]) -> None:
        rows = [(account, extension) for extension in sorted(set(extensions))]
        with self.transaction() as tx:
            if rows:
                tx.lock_account(account)
                tx.connection.cursor().executemany(
                    "INSERT INTO extensions VALUES (%s, %s) ON CONFLICT DO NOTHING", rows
                )

    def ping(self) -> None:
        """Whether an event could be written now: a write, rolled back (a standby after a
        failover, or a read-only database, refuses it)."""
        with self._begun("BEGIN") as connection:
            connection.execute("UPDATE meta SET value = value WHERE key = 'schema_version'")
            connection.execute("ROLLBACK")

    def close(self) -> None:
        """Later calls raise StoreUnavailable; transactions under way finish first."""
        if self._closed:
            return
        self._closed = True
        if self._owner_pid == os.getpid():
            self.writer.close()
            self._pool.close()

    # -- inside --------------------------------------------------------------------------------

    def _connection_options(self) -> dict[str, Any]:
        return {
            "autocommit": True,  # transactions are begun explicitly: see _begun
            # libpq counts whole seconds, and takes 1 as 2.
            "connect_timeout": max(2, math.ceil(self._connect_timeout)),
            # A server that vanished without closing the connection (host down, network cut)
            # fails the statement waiting for it, instead of leaving it hang forever.
            "tcp_user_timeout": self._statement_timeout_ms + 1000,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "application_name": "mcn-exporter",
        }

    def _configure(self, connection: psycopg.Connection[Any]) -> None:
        # Set per session rather than in the URL's `options`, which stay the operator's. A
        # replica stopped in the middle of a transaction loses it, and the locks it held, after
        # twice the statement timeout.
        connection.execute(
            "SELECT set_config('statement_timeout', %s, false),"
            " set_config('idle_in_transaction_session_timeout', %s, false)",
            (str(self._statement_timeout_ms), str(2 * self._statement_timeout_ms)),
        )

    def _initialise(self, url: str) -> bytes:
        """Creates the schema unless it exists, refusing one of another version untouched;
        returns the key of the party digests."""
        try:
            with psycopg.connect(url, **self._connection_options()) as connection:
                self._configure(connection)
                meta = self._create_schema(connection)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"PostgreSQL: {exc}") from exc
        return bytes.fromhex(meta["party_key"])

    def _create_schema(self, connection: psycopg.Connection[Any]) -> dict[str, str]:
        with connection.transaction():
            # Replicas starting together would otherwise race on CREATE TABLE IF NOT EXISTS.
            connection.execute("SELECT pg_advisory_xact_lock(%s, 0)", (SCHEMA_LOCK,))
            version = _schema_version(connection)
            if version not in (None, SCHEMA_VERSION, *UPGRADABLE_VERSIONS):
                raise StoreIncompatible(
                    f"the PostgreSQL database holds schema version {version}, this exporter "
                    f"reads version {SCHEMA_VERSION}: it was written by another exporter "
                    "version; run that one, or point store.url at an empty database"
                )
            if version != SCHEMA_VERSION:
                _create_tables(connection)
            return dict(connection.execute("SELECT key, value FROM meta").fetchall())

    @contextmanager
    def _begun(self, begin: str) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection inside a transaction begun with `begin`, rolled back unless the
        caller committed; database errors become StoreUnavailable."""
        self._check_usable()
        connection = self._connection_in_transaction(begin)
        try:
            yield connection
        except psycopg.Error as exc:
            raise StoreUnavailable(f"PostgreSQL: {exc}") from exc
        finally:
            self._release(connection)

    def _release(self, connection: psycopg.Connection[Any]) -> None:
        """Back to the pool, rolled back unless committed; a broken one is replaced."""
        if connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            with suppress(psycopg.Error):  # a broken connection has nothing to roll back
                connection.execute("ROLLBACK")
        self._pool.putconn(connection)

    def _connection_in_transaction(self, begin: str) -> psycopg.Connection[Any]:
        """BEGIN doubles as the check that a pooled connection still works: one that died with
        a server restart is dropped and the next tried, since nothing was done on it yet."""
        deadline = time.monotonic() + self._connect_timeout
        while True:
            try:
                connection = self._pool.getconn(timeout=max(deadline - time.monotonic(), 0.0))
            except PoolTimeout as exc:
                raise StoreUnavailable(
                    f"PostgreSQL: no connection within {self._connect_timeout:g} s"
                ) from exc
            try:
                connection.execute(begin)
                return connection
            except psycopg.Error as exc:
                self._pool.putconn(connection)
                if not connection.broken or time.monotonic() >= deadline:
                    raise StoreUnavailable(f"PostgreSQL: {exc}") from exc

    def _check_usable(self) -> None:
        if self._closed:
            raise StoreUnavailable("PostgreSQL: the store is closed")
        if self._owner_pid != os.getpid():
            # The pool's threads and sockets stay with the process that opened it.
            raise StoreUnavailable(
                f"PostgreSQL store opened in process {self._owner_pid}, used in {os.getpid()};"
                " open one store per process"
            )


# -- group commit ------------------------------------------------------------------------------


class Batch:
    """Changes of several threads in one PostgreSQL transaction, and how its commit went.

    Its connection stays in pipeline mode while it is open: statements are queued and sent
    together, and a change waits for the server only where it reads and at its end.
    """

    def __init__(
        self, connection: psycopg.Connection[Any], pipeline: psycopg.Pipeline, exits: ExitStack
    ) -> None:
        self.connection = connection
        self.pipeline = pipeline
        self.exits = exits  # leaves pipeline mode
        self.size = 0  # changes in it that succeeded
        self.error: BaseException | None = None
        # What its changes leave to the commit, and what it holds until then.
        self.totals = PostgresTotals()
        self.locks: set[int] = set()  # advisory leg locks: re-entrant, taken once a batch
        self.caller_locks: set[int] = set()  # accounts whose caller records it holds
        self.some_callers: set[int] = set()  # accounts whose lock it holds in share mode
        self.caller_keys: set[int] = set()  # and the callers' and call_ids' keys under them
        self.admitted: set[tuple[int, str]] = set()  # extensions known admitted
        # Held until the batch ends; its members wait by taking it in turn.
        self.done = threading.Lock()
        self.done.acquire()

    def sync(self) -> None:
        """Sends what is queued and waits for it: raises the first error among it."""
        self.pipeline.sync()

    def wait(self) -> None:
        with self.done:
            pass


class Change:
    """One thread's change inside a batch."""

    def __init__(self, batch: Batch, group: GroupCommit) -> None:
        self.batch = batch
        self.connection = batch.connection
        self._group = group
        self._on_success: list[Callable[[], None]] = []

    @property
    def may_wait(self) -> bool:
        """Whether this change may wait for a lock: not while its batch holds those of other
        changes, which another process's batch may be waiting for in turn."""
        return self.batch.size == 0

    def commit_the_others(self) -> None:
        """Commits the batch's other changes and goes on alone in a new transaction: for a
        change about to wait for a lock, before it has written anything."""
        self._group.commit_the_others(self)

    def on_success(self, action: Callable[[], None]) -> None:
        """Runs `action` once every statement of this change has succeeded."""
        self._on_success.append(action)

    def succeeded(self) -> None:
        for action in self._on_success:
            action()


class GroupCommit:
    """The changes of a process's threads, queued on one connection and committed together.

    A WAL flush per event would cap the store at a few hundred events per second. While other
    threads wait for their turn, the transaction stays open and they add their changes to it,
    each in a savepoint of its own, so that a failing change rolls back alone; the last of them,
    or the `max_batch`-th, commits for all. No thread returns before the COMMIT that holds its
    change, and a failed COMMIT fails every change of the batch.

    A change's statements are pipelined and synced at its end (and wherever it reads): its
    errors are its own, never a later change's.

    Locks a batch takes are held until it commits. A change that would wait for a lock while
    its batch holds other changes' locks has those committed first (`commit_the_others`), so
    that two processes' batches never wait for each other in a cycle; `statement_timeout`
    bounds every wait for a lock, and `queue_timeout` the wait for a turn.
    """

    def __init__(
        self,
        begin: Callable[[], psycopg.Connection[Any]],
        release: Callable[[psycopg.Connection[Any]], None],
        before_commit: Callable[[Batch], None],
        after_commit: Callable[[Batch], None],
        queue_timeout: float,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._begin = begin  # a connection inside a transaction
        self._release = release  # gives it back, rolled back unless committed
        self._before_commit = before_commit
        self._after_commit = after_commit
        self._queue_timeout = queue_timeout
        self.max_batch = max_batch
        self.commits = 0
        self._turn = threading.Lock()
        self._batch: Batch | None = None
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self._closed = False

    @property
    def waiting(self) -> int:
        """Threads waiting for their turn."""
        return self._waiting

    @contextmanager
    def change(self) -> Iterator[Change]:
        """One change, committed when this returns; StoreUnavailable if it could not be."""
        self._take_turn()
        failure: BaseException | None = None
        try:
            if self._closed:
                raise StoreUnavailable("PostgreSQL: the store is closed")
            change = Change(self._batch or self._open_batch(), self)
            try:
                change.connection.execute("SAVEPOINT change")
                yield change
                # Not released, one statement less: each change's savepoint nests in the one
                # before, and ROLLBACK TO goes back to the latest of the name.
                change.batch.sync()
                change.succeeded()
                change.batch.size += 1
            except BaseException as exc:
                failure = exc
                self._undo_change(change.batch)
            batch = change.batch  # a new one if the change committed the others
            if self._batch is batch and (batch.size >= self.max_batch or not self._waiting):
                self._end_batch(batch)
        finally:
            self._turn.release()
        if failure is not None:
            if isinstance(failure, psycopg.Error):
                raise StoreUnavailable(f"PostgreSQL: {failure}") from failure
            raise failure
        batch.wait()
        if batch.error is not None:
            raise StoreUnavailable(f"PostgreSQL: {batch.error}") from batch.error

    def close(self) -> None:
        """Commits the open batch; later changes raise StoreUnavailable."""
        turn = self._turn.acquire(timeout=self._queue_timeout)
        self._closed = True
        if not turn:
            return  # a change still holds the batch: its owner ends it, and no later one joins
        try:
            if self._batch is not None:
                self._end_batch(self._batch)
        finally:
            self._turn.release()

    def commit_the_others(self, change: Change) -> None:
        """See Change.commit_the_others."""
        batch, connection = change.batch, change.connection
        assert self._batch is batch
        with suppress(psycopg.Error):  # the error that brought us here, if any, once more
            batch.sync()
        connection.execute("ROLLBACK TO change")
        self._batch = change.batch = Batch(connection, batch.pipeline, batch.exits)
        try:
            self._before_commit(batch)
            connection.execute("COMMIT")
            batch.sync()
            self.commits += 1
            self._after_commit(batch)
        except psycopg.Error as exc:
            batch.error = exc
        finally:
            batch.done.release()
        connection.execute("BEGIN")
        connection.execute("SAVEPOINT change")

    def _take_turn(self) -> None:
        with self._waiting_lock:
            self._waiting += 1
        try:
            taken = self._turn.acquire(timeout=self._queue_timeout)
        finally:
            with self._waiting_lock:
                self._waiting -= 1
        if not taken:
            self._end_batch_left_for_nobody()
            raise StoreUnavailable(f"PostgreSQL: no turn to write within {self._queue_timeout:g} s")

    def _end_batch_left_for_nobody(self) -> None:
        """The last change may have left the batch open for this thread, which gave up: its
        changes' threads would wait for a COMMIT nobody sends."""
        if self._turn.acquire(blocking=False):
            try:
                if self._batch is not None and not self._waiting:
                    self._end_batch(self._batch)
            finally:
                self._turn.release()

    def _open_batch(self) -> Batch:
        connection = self._begin()
        exits = ExitStack()
        try:
            pipeline = exits.enter_context(connection.pipeline())
        except BaseException:
            self._release(connection)
            raise
        self._batch = Batch(connection, pipeline, exits)
        return self._batch

    def _undo_change(self, batch: Batch) -> None:
        with suppress(psycopg.Error):  # the change's own error, raised already
            batch.sync()
        try:
            batch.connection.execute("ROLLBACK TO change")
            batch.connection.execute("RELEASE change")
            batch.sync()
        except psycopg.Error as exc:
            # The transaction or the connection is gone, and the batch's other changes with it.
            self._end_batch(batch, error=exc)

    def _end_batch(self, batch: Batch, error: BaseException | None = None) -> None:
        self._batch = None
        batch.error = error
        try:
            if error is None and batch.size:
                self._before_commit(batch)
                batch.connection.execute("COMMIT")
                batch.exits.close()  # sends all, waits for all: one round trip
                self.commits += 1
                self._after_commit(batch)
        except psycopg.Error as exc:
            batch.error = exc
        finally:
            try:
                with suppress(psycopg.Error):  # an error of the batch's, already kept
                    batch.exits.close()
                self._release(batch.connection)
            finally:
                batch.done.release()


class PostgresTotals(Totals):
    """A batch's totals, written at its COMMIT."""

    __slots__ = ()

    def write(self, connection: psycopg.Connection[Any]) -> None:
        """Each table's rows in key order, and tables in a fixed order.

        Into this connection's shard: transactions on other connections write other rows.
        """
        shard = connection.info.backend_pid % SHARDS
        # Each table's rows as one JSON parameter: psycopg's array dumping costs more than
        # the statement itself.
        if self.last_events:
            rows: list[Any] = [[*key, at] for key, at in sorted(self.last_events.items())]
            connection.execute(_WRITE_LAST_EVENTS, (shard, json.dumps(rows)))
        if self.active:
            rows = [[*key, count] for key, count in sorted(self.active.items())]
            connection.execute(_WRITE_ACTIVE_LEGS, (shard, json.dumps(rows)))
        if self.counters:
            rows = [[*key, value] for key, value in sorted(self.counters.items())]
            connection.execute(_WRITE_COUNTERS, (shard, json.dumps(rows)))
        if self.timings:
            # The bucket as text: JSON has no Infinity, PostgreSQL's float8 reads "inf".
            rows = [
                [kind, labels, repr(bucket), *value]
                for (kind, labels, bucket), value in sorted(self.timings.items())
            ]
            connection.execute(_WRITE_TIMINGS, (shard, json.dumps(rows)))


_FROM_ROWS = " FROM json_array_elements(%s::json) AS row_(r)"
_WRITE_LAST_EVENTS = (
    "INSERT INTO last_events (shard, account, service, at)"
    " SELECT %s, (r->>0)::bigint, r->>1, (r->>2)::float8"
    f"{_FROM_ROWS} ON CONFLICT (account, service, shard)"
    " DO UPDATE SET at = greatest(last_events.at, excluded.at)"
)
_WRITE_ACTIVE_LEGS = (
    "INSERT INTO active_legs (shard, account, service, direction, extension, count)"
    " SELECT %s, (r->>0)::bigint, r->>1, r->>2, r->>3, (r->>4)::bigint"
    f"{_FROM_ROWS} ON CONFLICT (account, service, direction, extension, shard)"
    " DO UPDATE SET count = active_legs.count + excluded.count"
)
_WRITE_COUNTERS = (
    "INSERT INTO counters (shard, kind, labels, value)"
    " SELECT %s, r->>0, r->>1, (r->>2)::float8"
    f"{_FROM_ROWS} ON CONFLICT (kind, labels, shard)"
    " DO UPDATE SET value = counters.value + excluded.value"
)
_WRITE_TIMINGS = (
    "INSERT INTO timings (shard, kind, labels, bucket, count, total)"
    " SELECT %s, r->>0, r->>1, (r->>2)::float8, (r->>3)::bigint, (r->>4)::float8"
    f"{_FROM_ROWS} ON CONFLICT (kind, labels, bucket, shard) DO UPDATE"
    " SET count = timings.count + excluded.count, total = timings.total + excluded.total"
)


# -- one change --------------------------------------------------------------------------------


class _PostgresTransaction:
    """One change. Statements whose results are not needed at once are only queued: they
    reach the server with the change's next read, or at its end."""

    def __init__(
        self,
        change: Change,
        layout: TallyLayout,
        party_key: bytes,
        admitted: set[tuple[int, str]],
        whole_accounts: bool = False,
    ) -> None:
        self.connection = change.connection
        self.layout = layout
        self._change = change
        self._party_key = party_key
        self._admitted = admitted
        self._totals = Totals()
        self._locks: set[int] = set()
        self._known_extensions: set[tuple[int, str]] = set()
        # Whether each leg read or written under this change's locks is open: nobody else can
        # close it meanwhile, so saving it needs no answer from the server.
        self._open: dict[int, bool] = {}
        self._inserted: list[tuple[Leg, psycopg.Cursor[Any]]] = []
        # Whether it has taken a lock, read under one or written: see _must_not_wait.
        self._begun = False
        self._caller_locks: set[int] = set()  # accounts whose caller lock this change took
        self._some_callers: set[int] = set()  # ... in share mode, with the keys below
        self._caller_keys: set[int] = set()
        # Made again after reaching caller records outside its scope: lock whole accounts.
        self._whole_accounts = whole_accounts
        self._event = False  # an event's change: see may_sweep
        self._callers: PostgresCallerBook | None = None
        change.on_success(self._succeeded)

    @property
    def callers(self) -> PostgresCallerBook:
        if self._callers is None:
            self._callers = PostgresCallerBook(self.connection, self, one_change=True)
        return self._callers

    def digest(self, number: str) -> str:
        digest = self._party(number)
        assert digest is not None
        return digest

    def legs_matching(self, query: LegQuery) -> list[Leg]:
        lock, sql, parameters, party = self._legs_query(query)
        # The caller records the change may go on to are locked here, right after the legs,
        # so that no lock is waited for later in the change.
        claim = self._claim(query)
        held = self._holds_legs(lock) and (claim is None or self._holds_claim(claim))
        if not held and self._must_not_wait():
            rows = self._read_all_without_waiting(lock, claim, sql, parameters)
            if rows is not None:
                return self._known_legs(rows, party)
            self._change.commit_the_others()
        self._lock_legs(lock)
        if claim is not None:
            self._take_claim(claim)
        # Sent with the lock, run after it: the SELECT reads what its last holder committed.
        return self._known_legs(self.connection.execute(sql, parameters).fetchall(), party)

    def insert_leg(self, leg: Leg, did: str | None) -> None:
        labels = leg.labels
        if leg.call_id is not None:
            self._lock_legs(_call_lock(labels.account, leg.call_id, leg.abon))
        else:
            self._lock_legs(
                _abon_lock(labels.account, labels.service.value, labels.direction.value, leg.abon)
            )
        cursor = self.connection.execute(
            f"INSERT INTO legs ({NEW_LEG_COLUMNS})"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            new_leg_values(leg, self._party(did)),
        )
        self._begun = True
        self._inserted.append((leg, cursor))  # its id is read with the change's next answer
        if labels.service is Service.VPBX and labels.direction is Direction.INBOUND:
            self._read_inserted_ids()  # now: the caller level records the leg by its id
        if leg.is_open:
            self._count_active(labels, +1)

    def save_leg(self, leg: Leg) -> None:
        self._begun = True
        if leg.id is None:
            self._read_inserted_ids()
        leg_id = leg.id
        was_open = None if leg_id is None else self._open.get(leg_id)
        if leg_id is None or was_open is None:
            self._save_unknown_leg(leg)
        elif was_open:
            self.connection.execute(
                "UPDATE legs SET started_at = %s, answered_at = %s, closed_at = %s, outcome = %s"
                " WHERE id = %s",
                (*leg_progress(leg), leg_id),
            )
            if not leg.is_open:
                self._open[leg_id] = False
                self._count_active(leg.labels, -1)
        else:
            # Closed already: a late start is all that is left to record.
            self.connection.execute(
                "UPDATE legs SET started_at = %s WHERE id = %s", (leg.started_at, leg.id)
            )

    def open_legs_before(self, opened_before: float) -> list[Leg]:
        """Legs to expire: those another change holds are skipped, and so are vpbx legs of an
        account whose caller records another change holds (their expiry changes them): expiry
        never waits. The next one takes them."""
        rows = self.connection.execute(
            f"SELECT {LEG_COLUMNS} FROM legs WHERE closed_at IS NULL AND opened_at < %s"
            " ORDER BY opened_at, id FOR UPDATE SKIP LOCKED",
            (opened_before,),
        ).fetchall()
        legs = self._known_legs(rows, None)
        accounts = {leg.labels.account for leg in legs if leg.labels.service is Service.VPBX}
        held = {account for account in accounts if self._holds_account(account)}
        if accounts - held:
            got = self.connection.execute(TRY_LOCK_CALLERS, (sorted(accounts - held),))
            taken = {account for (account,) in got.fetchall()}
            self._caller_locks.update(taken)
            held |= taken
        return [
            leg
            for leg in legs
            if leg.labels.service is not Service.VPBX or leg.labels.account in held
        ]

    def forget_closed_legs(self, with_call_id_before: float, without_call_id_before: float) -> None:
        self._begun = True
        self.connection.execute(
            "DELETE FROM legs WHERE id IN"
            " (SELECT id FROM legs WHERE closed_at < %s FOR UPDATE SKIP LOCKED)",
            (with_call_id_before,),
        )
        # Without a call_id a closed leg only matters for the duplicate window, except an
        # expired one, which absorbs the end of a call that outlived calls.max_duration.
        self.connection.execute(
            "DELETE FROM legs WHERE id IN (SELECT id FROM legs WHERE call_id IS NULL"
            " AND closed_at < %s AND outcome <> 'expired' FOR UPDATE SKIP LOCKED)",
            (without_call_id_before,),
        )

    def admit_extension(self, account: int, extension: str, limit: int) -> bool:
        key = (account, extension)
        if (
            key in self._admitted
            or key in self._change.batch.admitted
            or key in self._known_extensions
        ):
            return True  # extensions are never taken back: no lock needed to trust this
        known = self.connection.execute(
            "SELECT 1 FROM extensions WHERE account = %s AND extension = %s", key
        ).fetchone()
        if known:
            self._known_extensions.add(key)
            return True
        self.lock_account(account)
        row = self.connection.execute(
            "SELECT count(*), coalesce(bool_or(extension = %s), false)"
            " FROM extensions WHERE account = %s",
            (extension, account),
        ).fetchone()
        assert row is not None
        used, admitted_meanwhile = row
        if not admitted_meanwhile:
            if used >= limit:
                return False
            self.connection.execute(
                "INSERT INTO extensions VALUES (%s, %s) ON CONFLICT DO NOTHING", key
            )
        self._known_extensions.add(key)
        return True

    def touch(self, account: int, service: Service, at: float) -> None:
        self._event = True  # only an event's change is dated: see may_sweep
        self._totals.touch(account, service, at)

    def record(self, tallies: Iterable[Tally]) -> None:
        self._totals.record(self.layout, tallies)

    def lock_account(self, account: int) -> None:
        """The lock an account's extensions are admitted under."""
        key = (EXTENSION_LOCKS, _hash32(("account", account)))
        if self._must_not_wait():
            got = self.connection.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", key)
            if _first(got):
                self._begun = True
                return
            self._change.commit_the_others()
        self.connection.execute("SELECT pg_advisory_xact_lock(%s, %s)", key)
        self._begun = True

    # -- the caller level's locks (CallerLocks) ------------------------------------------------

    def lock_callers(self, account: int, keys: tuple[int, ...]) -> None:
        """Records outside what legs_matching locked: the account's whole lock, taken as leg
        locks are (_lock_legs), if that cannot deadlock; else the change is made again with
        it (StoreRetry): after this change took some callers' locks (waiting for the whole
        would wait for other changes holding some, which may wait for these), or while its
        batch holds other changes' locks and it has read under its own."""
        if self.holds_callers(account, keys):
            return
        if account in self._some_callers or (self._begun and not self._change.may_wait):
            raise StoreRetry("caller records outside the change's locks")
        if self._must_not_wait():
            if self._try_lock_callers(account):
                self._begun = True
                return
            self._change.commit_the_others()
        # Queued: sent with the statement that needs it.
        self.connection.execute(LOCK_CALLERS, (account,))
        self._caller_locks.add(account)
        self._begun = True

    def holds_callers(self, account: int, keys: tuple[int, ...]) -> bool:
        if self._holds_account(account):
            return True
        held, batch = self._caller_keys, self._change.batch.caller_keys
        return all(key in held or key in batch for key in keys)

    def may_sweep(self) -> bool:
        """Not in an event's change before its legs are locked (the tracker settles first):
        the sweep would hold accounts' caller locks while the change waits for its legs' lock,
        whose holder may wait for one of those accounts. Its sweep finds nothing due, and the
        next sweep (at the latest the scrape's expiry) settles it."""
        return not self._event or self._begun

    def swept(self, accounts: Iterable[int]) -> None:
        taken = set(accounts)
        if taken:
            self._caller_locks.update(taken)
            self._begun = True

    def _holds_account(self, account: int) -> bool:
        """Whether the account's whole caller lock is held."""
        return account in self._caller_locks or account in self._change.batch.caller_locks

    def _try_lock_callers(self, account: int) -> bool:
        got = self.connection.execute(TRY_LOCK_CALLERS, ([account],)).fetchall()
        if got:
            self._caller_locks.add(account)
        return bool(got)

    def _claim(self, query: LegQuery) -> _Claim | None:
        """The caller locks a change whose legs `query` reads takes with them."""
        scope = query.callers
        if self._whole_accounts:
            return _Claim(query.account if scope is None else scope.account, ())
        if scope is None:
            return None
        if scope.whole_account:
            return _Claim(scope.account, ())
        return _Claim(scope.account, scope_keys(scope))

    def _holds_claim(self, claim: _Claim) -> bool:
        if not claim.keys:
            return self._holds_account(claim.account)
        return self.holds_callers(claim.account, claim.keys)

    def _claim_tries(self, claim: _Claim) -> tuple[str, tuple[Any, ...]]:
        """The condition that the claim's locks are got without waiting, and its parameters."""
        if not claim.keys:
            return TRY_ALL_CALLERS, (claim.account,)
        return TRY_SOME_CALLERS, (claim.account, list(claim.keys))

    def _claimed(self, claim: _Claim) -> None:
        if claim.keys:
            self._caller_keys.update(claim.keys)
            self._some_callers.add(claim.account)
        else:
            self._caller_locks.add(claim.account)

    def _take_claim(self, claim: _Claim) -> None:
        """Waits for the claim's locks: the keys in ascending order, then the account's."""
        if self._holds_claim(claim):
            return
        if claim.keys:
            self.connection.execute(LOCK_SOME_CALLERS, (claim.account, list(claim.keys)))
        else:
            self.connection.execute(LOCK_CALLERS, (claim.account,))
        self._claimed(claim)
        self._begun = True

    # -- inside --------------------------------------------------------------------------------

    def _succeeded(self) -> None:
        """The change's statements all ran: what it did becomes its batch's."""
        self._read_inserted_ids()
        self._change.batch.totals.add(self._totals)
        self._change.batch.locks.update(self._locks)
        self._change.batch.caller_locks.update(self._caller_locks)
        self._change.batch.some_callers.update(self._some_callers)
        self._change.batch.caller_keys.update(self._caller_keys)
        self._change.batch.admitted.update(self._known_extensions)

    def _read_inserted_ids(self) -> None:
        for leg, cursor in self._inserted:
            row = cursor.fetchone()
            assert row is not None
            leg.id = row[0]
            self._open[row[0]] = leg.is_open
        self._inserted.clear()

    def _save_unknown_leg(self, leg: Leg) -> None:
        """A leg not read in this change: whether it is still open is the server's to say."""
        cursor = self.connection.execute(
            "UPDATE legs SET started_at = %s, answered_at = %s, closed_at = %s, outcome = %s"
            " WHERE id = %s AND closed_at IS NULL RETURNING id",  # an answer, even pipelined
            (*leg_progress(leg), leg.id),
        )
        if cursor.fetchone() is None:
            # Closed already: a late start is all that is left to record.
            self.connection.execute(
                "UPDATE legs SET started_at = %s WHERE id = %s", (leg.started_at, leg.id)
            )
        elif not leg.is_open:
            self._count_active(leg.labels, -1)

    def _known_legs(self, rows: list[Any], party: str | None) -> list[Leg]:
        self._begun = True  # read under locks that committing the others would give up
        legs = [_leg(row, party) for row in rows]
        for leg in legs:
            assert leg.id is not None
            self._open[leg.id] = leg.is_open
        return legs

    def _legs_query(self, query: LegQuery) -> tuple[int, str, tuple[Any, ...], str | None]:
        """The lock a query's legs are read under, the SQL that reads them, and the party
        digest they are compared with."""
        if query.call_id is not None:
            call = (query.account, query.call_id, query.abon)
            return _call_lock(*call), _LEGS_OF_CALL, call, None
        extension = (query.account, query.service.value, query.direction.value, query.abon)
        party = self._party(query.party)
        lock = _abon_lock(*extension)
        if party is None:
            return lock, _LEGS_OF_EXTENSION, (*extension, query.closed_since), None
        return lock, _LEGS_OF_PARTY, (*extension, party, query.closed_since), party

    def _must_not_wait(self) -> bool:
        """A lock this change would wait for must not be waited for while the batch holds the
        others' locks: another process's batch may hold it and wait for one of those (a
        deadlock, broken only after deadlock_timeout). Before it has taken a lock, read under
        one or written (all of which committing the others would give up), the change can
        have the others committed first. After, it waits: its own locks come in one order
        (legs, then the account), and the holder of an account lock only waits for a leg lock
        in a later change, which then commits the others, the account lock with them."""
        return not self._change.may_wait and not self._begun

    def _holds_legs(self, lock: int) -> bool:
        return lock in self._locks or lock in self._change.batch.locks

    def _read_all_without_waiting(
        self,
        lock: int,
        claim: _Claim | None,
        query: str,
        parameters: tuple[Any, ...],
    ) -> list[Any] | None:
        """The legs read under `lock`, with the claim's caller locks (if any), if these and
        the legs' rows are free at once (two statements, one round trip); else None, having
        taken none."""
        tries: list[str] = []
        values: list[Any] = []
        legs = not self._holds_legs(lock)
        if legs:
            tries.append("pg_try_advisory_xact_lock(%s, %s)")
            values += (LEG_LOCKS, lock)
            query += " NOWAIT"
        callers = claim is not None and not self._holds_claim(claim)
        if claim is not None and callers:
            condition, condition_values = self._claim_tries(claim)
            tries.append(condition)
            values += condition_values
        got = self.connection.execute("SELECT " + " AND ".join(tries), values) if tries else None
        read = self.connection.execute(query, parameters)
        try:
            if got is not None and not _first(got):
                return None  # those got are given back with the change's start
            rows = read.fetchall()
        except psycopg.errors.LockNotAvailable:
            return None
        if legs:
            self._locks.add(lock)
        if claim is not None and callers:
            self._claimed(claim)
        return rows

    def _lock_legs(self, key: int) -> None:
        if key in self._locks or key in self._change.batch.locks:
            return
        if self._must_not_wait():
            got = self.connection.execute(
                "SELECT pg_try_advisory_xact_lock(%s, %s)", (LEG_LOCKS, key)
            )
            if _first(got):
                self._locks.add(key)
                self._begun = True
                return
            self._change.commit_the_others()
        self.connection.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LEG_LOCKS, key))
        self._locks.add(key)
        self._begun = True

    def _count_active(self, labels: LegLabels, change: int) -> None:
        self._totals.count_active(labels, change)

    def _party(self, did: str | None) -> str | None:
        return party_digest(self._party_key, did)


class _Claim(NamedTuple):
    """Caller locks of an account: these callers' and call_ids' keys (with the account's lock
    in share mode), or, without keys, the account's whole lock."""

    account: int
    keys: tuple[int, ...]


def _first(cursor: psycopg.Cursor[Any]) -> Any:
    row = cursor.fetchone()
    assert row is not None
    return row[0]


def _call_lock(account: int, call_id: str, abon: str) -> int:
    return _hash32(("call", account, call_id, abon))


def _abon_lock(account: int, service: str, direction: str, abon: str) -> int:
    return _hash32(("abon", account, service, direction, abon))


def _hash32(key: tuple[object, ...]) -> int:
    """A lock id for a key. Two keys sharing one only serialise their events, never mix them."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def _create_tables(connection: psycopg.Connection[Any]) -> None:
    """The tables of a new database, or those an upgradable version lacks, and the version.

    Only then: CREATE INDEX IF NOT EXISTS takes its table's SHARE lock even when the index
    exists, and held, table after table, until the commit, these locks would block the other
    workers' and replicas' writes, and deadlock with a batch that wrote a caller record and
    goes on to a leg (its ROW EXCLUSIVE locks taken in another order than the tables here)."""
    for statement in (SCHEMA + CALLER_SCHEMA).split(";"):
        if statement.strip():
            connection.execute(statement)
    # A new database gets the version; one of an upgradable version now has its tables.
    connection.execute(
        "INSERT INTO meta VALUES ('schema_version', %s)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (SCHEMA_VERSION,),
    )
    connection.execute(
        "INSERT INTO meta VALUES ('party_key', %s) ON CONFLICT DO NOTHING", (new_party_key(),)
    )


def _schema_version(connection: psycopg.Connection[Any]) -> str | None:
    (meta,) = connection.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone() or (False,)
    if not meta:
        return None
    row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return None if row is None else str(row[0])


def _read_snapshot(connection: psycopg.Connection[Any]) -> StoreSnapshot:
    counters: dict[TallyKind, dict[tuple[str, ...], float]] = {}
    for kind, labels, value in connection.execute(
        "SELECT kind, labels, sum(value) FROM counters GROUP BY kind, labels"
    ):
        counters.setdefault(TallyKind(kind), {})[_labels(labels)] = value
    buckets: dict[tuple[TallyKind, str], dict[float, int]] = {}
    totals: dict[tuple[TallyKind, str], float] = {}
    for kind, labels, bucket, count, total in connection.execute(
        "SELECT kind, labels, bucket, sum(count)::bigint, sum(total) FROM timings"
        " GROUP BY kind, labels, bucket ORDER BY kind, labels, bucket"
    ):
        key = (TallyKind(kind), labels)
        buckets.setdefault(key, {})[bucket] = count
        totals[key] = totals.get(key, 0.0) + total
    active = {
        LegLabels(account, Service(service), Direction(direction), extension): count
        for account, service, direction, extension, count in connection.execute(
            "SELECT account, service, direction, extension, sum(count)::bigint FROM active_legs"
            " GROUP BY account, service, direction, extension"
        )
    }
    last_events = {
        (account, Service(service)): at
        for account, service, at in connection.execute(
            "SELECT account, service, max(at) FROM last_events GROUP BY account, service"
        )
    }
    # In the same read-only view: the gauges' aggregates take no lock.
    book = PostgresCallerBook(connection)
    return StoreSnapshot(
        counters=counters,
        timings=_timing_series(buckets, totals),
        active=active,
        last_events=last_events,
        ringing_calls=dict(book.ringing_calls()),
        waiting_callers=dict(book.waiting_callers()),
        first_misses=dict(book.first_misses()),
    )
