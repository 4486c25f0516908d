"""The call store in PostgreSQL, shared by exporter replicas on several hosts.

Same tables and semantics as the SQLite store: each change and the totals it implies are one
PostgreSQL transaction, committed before `transaction()` returns, so an event is acknowledged
only once it is durable.

Locking, so that replicas never both act on one leg:
- An event first takes a transaction-scoped advisory lock on its matching key, (account,
  call_id, abon) or, without a call_id, (account, service, direction, abon); then reads its
  candidate legs `FOR UPDATE`. Copies of one event reaching two replicas at once are thereby
  handled one after the other, and the second sees the leg the first opened; legs without a
  call_id are taken FIFO by one transaction at a time.
- Expiry and cleanup lock the legs they change `FOR UPDATE SKIP LOCKED`: a leg an event holds
  is left to that event (which expires it itself if it is overdue), and one another replica's
  expiry holds or closed is not taken again. Each leg expires once; expiry never waits for legs.
- An extension's admission takes an advisory lock per account, so the limit holds across
  replicas.
- Totals (counters, timings, active legs, last events) are accumulated during the transaction
  and written at its end with `INSERT ... ON CONFLICT DO UPDATE SET value = value + excluded.value`,
  tables in one fixed order and rows in key order, so two transactions never wait on each other
  in a cycle. Each total is kept in SHARDS rows, one per connection's shard, summed when read:
  concurrent events then lock different rows and their commits can share a WAL flush.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from exporter.events import Direction, Service
from exporter.legs import CounterRow, Leg, LegLabels, Tally, TallyKind, TallyLayout, TimingRow
from exporter.store import (
    LEG_COLUMNS,
    LegQuery,
    StoreSnapshot,
    StoreUnavailable,
    _key,
    _labels,
    _leg,
    _timing_series,
)

SCHEMA_VERSION = "1"
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

    # -- CallStore -----------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[_PostgresTransaction]:
        """One change in one PostgreSQL transaction, committed when this returns."""
        with self._begun("BEGIN") as connection:
            tx = _PostgresTransaction(connection, self.layout, self._party_key)
            yield tx
            with connection.pipeline():  # the totals and the COMMIT in one round trip
                tx.flush()
                connection.execute("COMMIT")

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
        with self._begun("BEGIN READ ONLY") as connection:
            connection.execute("SELECT count(*) FROM meta").fetchone()
            connection.execute("COMMIT")

    def close(self) -> None:
        """Later calls raise StoreUnavailable; transactions under way finish first."""
        if self._closed:
            return
        self._closed = True
        if self._owner_pid == os.getpid():
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
            if version is not None and version != SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"the PostgreSQL database holds schema version {version}, this exporter "
                    f"reads version {SCHEMA_VERSION}"
                )
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.execute(
                "INSERT INTO meta VALUES ('schema_version', %s), ('party_key', %s)"
                " ON CONFLICT DO NOTHING",
                (SCHEMA_VERSION, secrets.token_hex(16)),
            )
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
            if connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                with suppress(psycopg.Error):  # a broken connection has nothing to roll back
                    connection.execute("ROLLBACK")
            self._pool.putconn(connection)  # a broken one is closed and replaced by the pool

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


class _PostgresTransaction:
    def __init__(
        self, connection: psycopg.Connection[Any], layout: TallyLayout, party_key: bytes
    ) -> None:
        self.connection = connection
        self.layout = layout
        self._party_key = party_key
        self._locked: set[int] = set()
        # Totals written by flush(), at the end of the transaction.
        self._last_events: dict[tuple[int, str], float] = {}
        self._active: dict[tuple[int, str, str, str], int] = {}
        self._counters: dict[tuple[str, str], float] = {}
        self._timings: dict[tuple[str, str, float], tuple[int, float]] = {}

    def legs_matching(self, query: LegQuery) -> list[Leg]:
        party = None
        # Sent together, run in turn: the SELECT reads what the lock's last holder committed.
        with self.connection.pipeline():
            if query.call_id is not None:
                self._lock_legs(_call_lock(query.account, query.call_id, query.abon))
                cursor = self.connection.execute(
                    _LEGS_OF_CALL, (query.account, query.call_id, query.abon)
                )
            else:
                extension = (
                    query.account,
                    query.service.value,
                    query.direction.value,
                    query.abon,
                )
                self._lock_legs(_abon_lock(*extension))
                party = self._party(query.party)
                if party is None:
                    cursor = self.connection.execute(
                        _LEGS_OF_EXTENSION, (*extension, query.closed_since)
                    )
                else:
                    cursor = self.connection.execute(
                        _LEGS_OF_PARTY, (*extension, party, query.closed_since)
                    )
        return [_leg(row, party) for row in cursor.fetchall()]

    def insert_leg(self, leg: Leg, did: str | None) -> None:
        labels = leg.labels
        if leg.call_id is not None:
            self._lock_legs(_call_lock(labels.account, leg.call_id, leg.abon))
        else:
            self._lock_legs(
                _abon_lock(labels.account, labels.service.value, labels.direction.value, leg.abon)
            )
        row = self.connection.execute(
            "INSERT INTO legs (account, service, direction, abon, extension, party, call_id,"
            " opened_at, started_at, answered_at, closed_at, outcome)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (
                labels.account,
                labels.service.value,
                labels.direction.value,
                leg.abon,
                labels.extension,
                self._party(did),
                leg.call_id,
                leg.opened_at,
                leg.started_at,
                leg.answered_at,
                leg.closed_at,
                leg.outcome.value if leg.outcome else None,
            ),
        ).fetchone()
        assert row is not None
        leg.id = row[0]
        if leg.is_open:
            self._count_active(labels, +1)

    def save_leg(self, leg: Leg) -> None:
        outcome = leg.outcome.value if leg.outcome else None
        cursor = self.connection.execute(
            "UPDATE legs SET started_at = %s, answered_at = %s, closed_at = %s, outcome = %s"
            " WHERE id = %s AND closed_at IS NULL",
            (leg.started_at, leg.answered_at, leg.closed_at, outcome, leg.id),
        )
        if not cursor.rowcount:
            # Closed already: a late start is all that is left to record.
            self.connection.execute(
                "UPDATE legs SET started_at = %s WHERE id = %s", (leg.started_at, leg.id)
            )
        elif not leg.is_open:
            self._count_active(leg.labels, -1)

    def open_legs_before(self, opened_before: float) -> list[Leg]:
        rows = self.connection.execute(
            f"SELECT {LEG_COLUMNS} FROM legs WHERE closed_at IS NULL AND opened_at < %s"
            " ORDER BY opened_at, id FOR UPDATE SKIP LOCKED",
            (opened_before,),
        ).fetchall()
        return [_leg(row) for row in rows]

    def forget_closed_legs(self, with_call_id_before: float, without_call_id_before: float) -> None:
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
        known = self.connection.execute(
            "SELECT 1 FROM extensions WHERE account = %s AND extension = %s", (account, extension)
        ).fetchone()
        if known:
            return True  # extensions are never taken back: no lock needed to trust this
        self.lock_account(account)
        row = self.connection.execute(
            "SELECT count(*), coalesce(bool_or(extension = %s), false)"
            " FROM extensions WHERE account = %s",
            (extension, account),
        ).fetchone()
        assert row is not None
        used, admitted_meanwhile = row
        if admitted_meanwhile:
            return True
        if used >= limit:
            return False
        self.connection.execute(
            "INSERT INTO extensions VALUES (%s, %s) ON CONFLICT DO NOTHING", (account, extension)
        )
        return True

    def touch(self, account: int, service: Service, at: float) -> None:
        key = (account, service.value)
        self._last_events[key] = max(at, self._last_events.get(key, at))

    def record(self, tallies: Iterable[Tally]) -> None:
        for tally in tallies:
            for row in self.layout.rows(tally):
                if isinstance(row, CounterRow):
                    counter = (row.kind.value, _key(row.labels))
                    self._counters[counter] = self._counters.get(counter, 0.0) + 1
                else:
                    timing = (row.kind.value, _key(row.labels), row.bucket)
                    count, total = self._timings.get(timing, (0, 0.0))
                    self._timings[timing] = (count + 1, total + row.seconds)

    def flush(self) -> None:
        """Writes the totals, each table's rows in key order, and tables in a fixed order.

        Into this connection's shard: transactions on other connections write other rows.
        """
        shard = self.connection.info.backend_pid % SHARDS
        if self._last_events:
            keys = sorted(self._last_events)
            self.connection.execute(
                "INSERT INTO last_events (account, service, at, shard)"
                " SELECT *, %s FROM unnest(%s::bigint[], %s::text[], %s::float8[])"
                " ON CONFLICT (account, service, shard)"
                " DO UPDATE SET at = greatest(last_events.at, excluded.at)",
                (shard, *_columns(keys, 2), [self._last_events[k] for k in keys]),
            )
        if self._active:
            keys_a = sorted(self._active)
            self.connection.execute(
                "INSERT INTO active_legs (account, service, direction, extension, count, shard)"
                " SELECT *, %s FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[],"
                " %s::bigint[]) ON CONFLICT (account, service, direction, extension, shard)"
                " DO UPDATE SET count = active_legs.count + excluded.count",
                (shard, *_columns(keys_a, 4), [self._active[k] for k in keys_a]),
            )
        if self._counters:
            keys_c = sorted(self._counters)
            self.connection.execute(
                "INSERT INTO counters (kind, labels, value, shard)"
                " SELECT *, %s FROM unnest(%s::text[], %s::text[], %s::float8[])"
                " ON CONFLICT (kind, labels, shard)"
                " DO UPDATE SET value = counters.value + excluded.value",
                (shard, *_columns(keys_c, 2), [self._counters[k] for k in keys_c]),
            )
        if self._timings:
            keys_t = sorted(self._timings)
            self.connection.execute(
                "INSERT INTO timings (kind, labels, bucket, count, total, shard)"
                " SELECT *, %s FROM unnest(%s::text[], %s::text[], %s::float8[], %s::bigint[],"
                " %s::float8[]) ON CONFLICT (kind, labels, bucket, shard) DO UPDATE"
                " SET count = timings.count + excluded.count,"
                " total = timings.total + excluded.total",
                (
                    shard,
                    *_columns(keys_t, 3),
                    [self._timings[k][0] for k in keys_t],
                    [self._timings[k][1] for k in keys_t],
                ),
            )

    def lock_account(self, account: int) -> None:
        """The lock an account's extensions are admitted under."""
        self.connection.execute(
            "SELECT pg_advisory_xact_lock(%s, %s)", (EXTENSION_LOCKS, _hash32(("account", account)))
        )

    def _lock_legs(self, key: int) -> None:
        if key not in self._locked:
            self.connection.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LEG_LOCKS, key))
            self._locked.add(key)

    def _count_active(self, labels: LegLabels, change: int) -> None:
        key = (labels.account, labels.service.value, labels.direction.value, labels.extension)
        self._active[key] = self._active.get(key, 0) + change

    def _party(self, did: str | None) -> str | None:
        # The same keyed digest as the SQLite store: never the number itself.
        if did is None:
            return None
        digest = hmac.new(self._party_key, did.encode(), hashlib.sha256)
        return digest.hexdigest()[:16]


def _call_lock(account: int, call_id: str, abon: str) -> int:
    return _hash32(("call", account, call_id, abon))


def _abon_lock(account: int, service: str, direction: str, abon: str) -> int:
    return _hash32(("abon", account, service, direction, abon))


def _hash32(key: tuple[object, ...]) -> int:
    """A lock id for a key. Two keys sharing one only serialise their events, never mix them."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def _columns(keys: list[Any], width: int) -> list[list[Any]]:
    return [[key[i] for key in keys] for i in range(width)]


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
    return StoreSnapshot(
        counters=counters,
        timings=_timing_series(buckets, totals),
        active=active,
        last_events=last_events,
    )
