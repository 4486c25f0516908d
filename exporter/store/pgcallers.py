"""The caller level's book in PostgreSQL: callers' unsettled calls and missed callers waiting.

`PostgresCallerBook` is the `CallerBook` of one PostgreSQL transaction: it reads and writes on
the connection it is given, inside the transaction of the leg change, so the caller records
commit (or roll back) with the leg and its tallies. `CALLER_SCHEMA` creates its tables; like
the rest of the store, it only ever holds numbers as the keyed digests `Callers` gives it.

Locking, so that replicas never both create a call for one caller nor resolve one waiting
caller twice: the per-leg advisory locks of an event are not enough, because one caller's
records span several legs (a ring group's legs ring different extensions, each under its own
leg lock; a call-back comes from an outbound leg). So the records have transaction-scoped
advisory locks of their own, and every read runs after its lock is granted, so it sees what
the lock's last holder committed:

- Per caller (CALLER_KEYS): `caller_key` (account, caller digest; withheld callers share one)
  guards a caller's calls and waiting record; `call_id_key` (account, call_id) a call_id's call
  while it has no caller yet (its first leg may lack the number) and its creation (one call per
  call_id). A call_id's call gains its caller once, under both, and never changes it: every call
  is read and written under one key, `call_key`.
- Per account (CALLER_LOCKS): in share mode with some callers' keys; exclusive for whatever may
  reach any caller's records: the settle sweeps, expiry, and a book used on its own.
- `call_of_leg` reads the leg's call first: unless its key is held already, it takes it and
  reads the call again (an account never changes; the key changes once, under both locks).
- The settle sweeps (`calls_quiet_before`, `waiting_missed_before`) never wait: they try the
  exclusive locks of the accounts with something due and skip the accounts another transaction
  holds in either mode; its holder or the next sweep settles them.
- The gauges' aggregates take no lock: each is one statement over committed rows.
- A lock goes in the same round trip as the statement that needs it (a pipeline).

Lock order. The store decides how the locks are taken, through `CallerLocks`: alone (the
default, `OwnLocks`), the book takes the account's exclusive lock before each read or write. A
store that batches changes, or whose changes take other locks, takes the locks of the callers a
change may reach (its `CallerScope`, the caller level's word) where its order of locks wants
them, and says what its change holds: a record outside it is not locked late but refused, the
store making the change again with the whole account. It also says when a sweep may take any
lock: a sweep that runs before a change's other locks (the tracker settles first) would hold
accounts' locks while that change waits for its others, whose holders may wait for those
accounts. A sweep that may not lock finds nothing due; the next one that may (at the latest the
scrape's, before the gauges and totals are read) settles it. The caller level needs no earlier
sweep to be right: a leg of a caller whose call is over settles that call itself. Only a caller
reached just after `callbacks.give_up_after`, before such a sweep, counts as reached rather than
given up.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any, Protocol

import psycopg

from exporter.callers import CallerScope, InboundCall, WaitingCaller

# The advisory lock class of the caller records: pg_advisory_xact_lock(CALLER_LOCKS, account
# folded to 32 bits). A constant of our own, apart from the store's other lock classes.
CALLER_LOCKS = 0x6D636E10

# Statements separated by ";", each run on its own by the store's schema creation.
CALLER_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbound_calls (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account bigint NOT NULL,
    line text NOT NULL,
    call_id text,
    caller text,
    opened_at double precision NOT NULL,
    first_ring_at double precision,
    quiet_since double precision NOT NULL,
    open_legs integer NOT NULL,
    answered_at double precision,
    expired boolean NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS inbound_calls_by_call_id
    ON inbound_calls (account, call_id) WHERE call_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS inbound_calls_by_caller
    ON inbound_calls (account, caller, opened_at, id);
CREATE INDEX IF NOT EXISTS inbound_calls_quiet
    ON inbound_calls (quiet_since) WHERE open_legs = 0;
CREATE INDEX IF NOT EXISTS inbound_calls_ringing
    ON inbound_calls (account, line) WHERE open_legs > 0 AND answered_at IS NULL;
CREATE TABLE IF NOT EXISTS inbound_call_legs (
    leg bigint PRIMARY KEY,
    call bigint NOT NULL REFERENCES inbound_calls (id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS inbound_call_legs_by_call ON inbound_call_legs (call);
CREATE TABLE IF NOT EXISTS waiting_callers (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account bigint NOT NULL,
    caller text NOT NULL,
    line text NOT NULL,
    first_missed_at double precision NOT NULL,
    call_started_at double precision NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS waiting_callers_by_caller ON waiting_callers (account, caller);
CREATE INDEX IF NOT EXISTS waiting_callers_by_first_miss ON waiting_callers (first_missed_at);
CREATE INDEX IF NOT EXISTS waiting_callers_by_line ON waiting_callers (account, line);
CREATE INDEX IF NOT EXISTS waiting_callers_earliest
    ON waiting_callers (account, first_missed_at)
"""

# The account's lock key: its low 32 bits as a signed int, so that accounts below 2**32 never
# share a lock. The same expression for one account (a parameter) and in the sweeps (a column).
_ACCOUNT_KEY = "((({account}::bigint & 4294967295) # 2147483648) - 2147483648)::int"
LOCK_CALLERS = f"SELECT pg_advisory_xact_lock({CALLER_LOCKS}, {_ACCOUNT_KEY.format(account='%s')})"
# Of the accounts in an array, those whose lock this transaction has or gets without waiting.
TRY_LOCK_CALLERS = (
    "SELECT account FROM unnest(%s::bigint[]) AS account"
    f" WHERE pg_try_advisory_xact_lock({CALLER_LOCKS}, {_ACCOUNT_KEY.format(account='account')})"
)
# The lock class of single callers and call_ids: pg_advisory_xact_lock(CALLER_KEYS, key).
CALLER_KEYS = 0x6D636E11
# The keys of an array, each waited for in the array's order, then the account's lock in share
# mode: in a SELECT, aggregates are computed before the other expressions.
LOCK_SOME_CALLERS = (
    f"SELECT count(pg_advisory_xact_lock({CALLER_KEYS}, key)),"
    f" pg_advisory_xact_lock_shared({CALLER_LOCKS}, {_ACCOUNT_KEY.format(account='%s')})"
    " FROM unnest(%s::int[]) AS key"
)
# Conditions, for a SELECT of several tries: this transaction has or gets without waiting...
# the account's lock (a parameter);
TRY_ALL_CALLERS = f"pg_try_advisory_xact_lock({CALLER_LOCKS}, {_ACCOUNT_KEY.format(account='%s')})"
# the keys of an array and the account's lock in share mode (the account, then the keys).
TRY_SOME_CALLERS = (
    f"pg_try_advisory_xact_lock_shared({CALLER_LOCKS}, {_ACCOUNT_KEY.format(account='%s')})"
    f" AND (SELECT coalesce(bool_and(pg_try_advisory_xact_lock({CALLER_KEYS}, key)), true)"
    " FROM unnest(%s::int[]) AS key)"
)


def caller_key(account: int, caller: str | None) -> int:
    """The lock of one caller's calls and waiting record (None: withheld callers')."""
    return _hash32(("caller", account, caller))


def call_id_key(account: int, call_id: str) -> int:
    """The lock of a call_id's call while it has no caller, and of its creation."""
    return _hash32(("call_id", account, call_id))


def call_key(call: InboundCall) -> int:
    """The one lock a call is read and written under: its caller's, or, while a call_id's call
    has no caller yet, its call_id's. A call_id's call gains a caller once (never loses or
    changes it), under both locks."""
    if call.caller is None and call.call_id is not None:
        return call_id_key(call.account, call.call_id)
    return caller_key(call.account, call.caller)


def scope_keys(scope: CallerScope) -> tuple[int, ...]:
    """The locks of a scope's records, in the order they are taken (ascending)."""
    keys = set()
    if scope.call_id is not None:
        keys.add(call_id_key(scope.account, scope.call_id))
    if scope.caller is not None or scope.call_id is None:
        keys.add(caller_key(scope.account, scope.caller))
    return tuple(sorted(keys))


def _hash32(key: tuple[object, ...]) -> int:
    """A lock id for a key. Two keys sharing one only serialise their changes, never mix them."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


_CALL_COLUMNS = (
    "id, account, line, call_id, caller, opened_at, first_ring_at, quiet_since, open_legs,"
    " answered_at, expired"
)
_WAITING_COLUMNS = "id, account, caller, line, first_missed_at, call_started_at"
_OLDEST_FIRST = "ORDER BY opened_at, id"
_WAITING_OF_CALLER = (
    f"SELECT {_WAITING_COLUMNS} FROM waiting_callers WHERE account = %s AND caller = %s"
)


class CallerLocks(Protocol):
    """How a book's transaction takes the caller locks."""

    def lock_callers(self, account: int, keys: tuple[int, ...]) -> None:
        """Before the records under these keys (of `account`) are read or written: locks that
        cover them, taken (or queued on the connection, ahead of the statement that needs
        them) unless held."""

    def holds_callers(self, account: int, keys: tuple[int, ...]) -> bool:
        """Whether this transaction is known to hold locks covering these keys already."""

    def may_sweep(self) -> bool:
        """Whether a settle sweep may now try the locks of the accounts with something due."""

    def swept(self, accounts: Iterable[int]) -> None:
        """A sweep now holds these accounts' locks."""


class OwnLocks:
    """The locks of a transaction that takes no other lock: each taken where it is needed,
    the account's whole (it covers every key of it)."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self._connection = connection

    def lock_callers(self, account: int, keys: tuple[int, ...]) -> None:
        # Taken again every time, never remembered: a rollback to a savepoint releases the
        # advisory locks taken since it, and taking one already held costs nothing more.
        self._connection.execute(LOCK_CALLERS, (account,))

    def holds_callers(self, account: int, keys: tuple[int, ...]) -> bool:
        return False

    def may_sweep(self) -> bool:
        return True

    def swept(self, accounts: Iterable[int]) -> None:
        pass


class PostgresCallerBook:
    """The `CallerBook` of one PostgreSQL transaction, on its connection.

    Records go in and out as copies, as `MemoryCallerBook`'s do: a change counts once saved.
    """

    def __init__(
        self,
        connection: psycopg.Connection[Any],
        locks: CallerLocks | None = None,
        *,
        one_change: bool = False,
    ) -> None:
        self._connection = connection
        self._locks = OwnLocks(connection) if locks is None else locks
        # A book for one change, which nothing rolls back in part: the last call read by its
        # call_id is remembered until the next write (a leg's start asks for it twice).
        self._one_change = one_change
        self._by_call_id: tuple[tuple[int, str], InboundCall | None] | None = None

    # -- calls ---------------------------------------------------------------------------------

    def call_by_call_id(self, account: int, call_id: str) -> InboundCall | None:
        if self._by_call_id is not None and self._by_call_id[0] == (account, call_id):
            known = self._by_call_id[1]
            return None if known is None else replace(known)
        call = self._read_call_by_call_id(account, call_id)
        if self._one_change:
            self._by_call_id = ((account, call_id), None if call is None else replace(call))
        return call

    def _read_call_by_call_id(self, account: int, call_id: str) -> InboundCall | None:
        rows = self._locked_read(
            account,
            (call_id_key(account, call_id),),
            f"SELECT {_CALL_COLUMNS} FROM inbound_calls WHERE account = %s AND call_id = %s",
            (account, call_id),
        )
        if not rows:
            return None
        call = _call(rows[0])
        self._lock_found(call)  # its caller's, if it has one
        return call

    def calls_of_caller(self, account: int, caller: str | None) -> list[InboundCall]:
        # Withheld: call_ids' calls with no caller yet come too, under other locks; the caller
        # level never joins nor settles these among a withheld caller's calls.
        keys = (caller_key(account, caller),)
        if caller is None:
            rows = self._locked_read(
                account,
                keys,
                f"SELECT {_CALL_COLUMNS} FROM inbound_calls"
                f" WHERE account = %s AND caller IS NULL {_OLDEST_FIRST}",
                (account,),
            )
        else:
            rows = self._locked_read(
                account,
                keys,
                f"SELECT {_CALL_COLUMNS} FROM inbound_calls"
                f" WHERE account = %s AND caller = %s {_OLDEST_FIRST}",
                (account, caller),
            )
        return [_call(row) for row in rows]

    def call_of_leg(self, leg_id: int) -> InboundCall | None:
        query = (
            f"SELECT {_CALL_COLUMNS} FROM inbound_calls"
            " WHERE id = (SELECT call FROM inbound_call_legs WHERE leg = %s)"
        )
        found = self._connection.execute(query, (leg_id,)).fetchall()
        if not found:
            return None
        call = _call(found[0])
        if self._locks.holds_callers(call.account, (call_key(call),)):
            return call
        # Read before its lock: only its account is sure (it never changes), and its key
        # (it changes once, and under both locks). Read again.
        rows = self._locked_read(call.account, (call_key(call),), query, (leg_id,))
        if not rows:
            return None
        call = _call(rows[0])
        self._lock_found(call)
        return call

    def save_call(self, call: InboundCall) -> None:
        self._by_call_id = None
        values = (
            call.account,
            call.line,
            call.call_id,
            call.caller,
            call.opened_at,
            call.first_ring_at,
            call.quiet_since,
            call.open_legs,
            call.answered_at,
            call.expired,
        )
        if call.id is None:
            keys = {call_key(call)}
            if call.call_id is not None:  # one call per call_id
                keys.add(call_id_key(call.account, call.call_id))
            rows = self._locked_read(
                call.account,
                tuple(sorted(keys)),
                "INSERT INTO inbound_calls (account, line, call_id, caller, opened_at,"
                " first_ring_at, quiet_since, open_legs, answered_at, expired)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                values,
            )
            call.id = rows[0][0]
        else:
            self._locked_write(
                call.account,
                (call_key(call),),
                "UPDATE inbound_calls SET account = %s, line = %s, call_id = %s, caller = %s,"
                " opened_at = %s, first_ring_at = %s, quiet_since = %s, open_legs = %s,"
                " answered_at = %s, expired = %s WHERE id = %s",
                (*values, call.id),
            )

    def add_leg(self, call: InboundCall, leg_id: int) -> None:
        self._by_call_id = None
        assert call.id is not None, "a call is saved before its legs are added"
        self._locked_write(
            call.account,
            (call_key(call),),
            "INSERT INTO inbound_call_legs (leg, call) VALUES (%s, %s)"
            " ON CONFLICT (leg) DO UPDATE SET call = excluded.call",
            (leg_id, call.id),
        )

    def delete_call(self, call: InboundCall) -> None:
        self._by_call_id = None
        if call.id is not None:  # its legs go with it (ON DELETE CASCADE)
            self._locked_write(
                call.account,
                (call_key(call),),
                "DELETE FROM inbound_calls WHERE id = %s",
                (call.id,),
            )

    def calls_quiet_before(self, before: float) -> list[InboundCall]:
        due = "FROM inbound_calls WHERE open_legs = 0 AND quiet_since <= %s"
        accounts = self._lock_due_accounts(due, before)
        if not accounts:
            return []
        rows = self._connection.execute(
            f"SELECT {_CALL_COLUMNS} {due} AND account = ANY(%s::bigint[]) {_OLDEST_FIRST}",
            (before, accounts),
        ).fetchall()
        return [_call(row) for row in rows]

    # -- waiting callers -----------------------------------------------------------------------

    def waiting_caller(self, account: int, caller: str) -> WaitingCaller | None:
        keys = (caller_key(account, caller),)
        rows = self._locked_read(account, keys, _WAITING_OF_CALLER, (account, caller))
        return _waiting(rows[0]) if rows else None

    def save_waiting(self, waiting: WaitingCaller) -> None:
        values = (
            waiting.account,
            waiting.caller,
            waiting.line,
            waiting.first_missed_at,
            waiting.call_started_at,
        )
        keys = (caller_key(waiting.account, waiting.caller),)
        if waiting.id is None:
            rows = self._locked_read(
                waiting.account,
                keys,
                "INSERT INTO waiting_callers (account, caller, line, first_missed_at,"
                " call_started_at) VALUES (%s, %s, %s, %s, %s) RETURNING id",
                values,
            )
            waiting.id = rows[0][0]
        else:
            self._locked_write(
                waiting.account,
                keys,
                "UPDATE waiting_callers SET account = %s, caller = %s, line = %s,"
                " first_missed_at = %s, call_started_at = %s WHERE id = %s",
                (*values, waiting.id),
            )

    def delete_waiting(self, waiting: WaitingCaller) -> None:
        if waiting.id is not None:
            self._locked_write(
                waiting.account,
                (caller_key(waiting.account, waiting.caller),),
                "DELETE FROM waiting_callers WHERE id = %s",
                (waiting.id,),
            )

    def waiting_missed_before(self, before: float) -> list[WaitingCaller]:
        due = "FROM waiting_callers WHERE first_missed_at <= %s"
        accounts = self._lock_due_accounts(due, before)
        if not accounts:
            return []
        rows = self._connection.execute(
            f"SELECT {_WAITING_COLUMNS} {due} AND account = ANY(%s::bigint[])"
            " ORDER BY first_missed_at, id",
            (before, accounts),
        ).fetchall()
        return [_waiting(row) for row in rows]

    # -- gauges --------------------------------------------------------------------------------

    def ringing_calls(self) -> Mapping[tuple[int, str], int]:
        rows = self._connection.execute(
            "SELECT account, line, count(*) FROM inbound_calls"
            " WHERE open_legs > 0 AND answered_at IS NULL GROUP BY account, line"
        ).fetchall()
        return {(account, line): count for account, line, count in rows}

    def waiting_callers(self) -> Mapping[tuple[int, str], int]:
        rows = self._connection.execute(
            "SELECT account, line, count(*) FROM waiting_callers GROUP BY account, line"
        ).fetchall()
        return {(account, line): count for account, line, count in rows}

    def first_misses(self) -> Mapping[int, float]:
        rows = self._connection.execute(
            "SELECT account, min(first_missed_at) FROM waiting_callers GROUP BY account"
        ).fetchall()
        return dict(rows)

    # -- inside --------------------------------------------------------------------------------

    def _locked_read(
        self, account: int, keys: tuple[int, ...], query: str, params: tuple[Any, ...]
    ) -> list[Any]:
        """`query`'s rows, read once the keys' locks are granted (one round trip)."""
        with self._pipelined():
            self._locks.lock_callers(account, keys)
            cursor = self._connection.execute(query, params)
        return cursor.fetchall()

    def _locked_write(
        self, account: int, keys: tuple[int, ...], statement: str, params: tuple[Any, ...]
    ) -> None:
        with self._pipelined():
            self._locks.lock_callers(account, keys)
            self._connection.execute(statement, params)

    def _lock_found(self, call: InboundCall) -> None:
        """A call found under another of its keys: its own key is held too (taken already,
        whatever else this book's read took, when the account's whole lock was)."""
        keys = (call_key(call),)
        if not self._locks.holds_callers(call.account, keys):
            self._locks.lock_callers(call.account, keys)

    def _pipelined(self) -> AbstractContextManager[object]:
        """A pipeline, unless the connection is in one already (a store that batches its
        statements): then a write is only queued, and reaches the server with the next read."""
        if self._connection.pgconn.pipeline_status != psycopg.pq.PipelineStatus.OFF:
            return nullcontext()
        return self._connection.pipeline()

    def _lock_due_accounts(self, due: str, before: float) -> list[int]:
        """The accounts with a record `due` whose lock this transaction has or now gets;
        the others are skipped, never waited for. None at all when sweeps may not lock now."""
        if not self._locks.may_sweep():
            return []
        key = _ACCOUNT_KEY.format(account="account")
        rows = self._connection.execute(
            f"SELECT account FROM (SELECT DISTINCT account {due}) AS due"
            f" WHERE pg_try_advisory_xact_lock({CALLER_LOCKS}, {key})",
            (before,),
        ).fetchall()
        accounts = [account for (account,) in rows]
        self._locks.swept(accounts)
        return accounts


def _call(row: Any) -> InboundCall:
    (
        record_id,
        account,
        line,
        call_id,
        caller,
        opened_at,
        first_ring_at,
        quiet_since,
        open_legs,
        answered_at,
        expired,
    ) = row
    return InboundCall(
        account,
        line,
        call_id,
        caller,
        opened_at,
        first_ring_at,
        quiet_since,
        open_legs,
        answered_at,
        expired,
        record_id,
    )


def _waiting(row: Any) -> WaitingCaller:
    waiting_id, account, caller, line, first_missed_at, call_started_at = row
    return WaitingCaller(account, caller, line, first_missed_at, call_started_at, waiting_id)
