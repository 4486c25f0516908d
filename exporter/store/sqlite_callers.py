"""The caller level's book in the SQLite call store (docs/design.md, "The book").

Callers' calls not yet settled, which legs were added to each, and the callers waiting for a
call back: read and written in the transaction of the leg change that moves them. A caller is
kept only as the keyed digest the caller level hands in, and deleted with its record.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any

from exporter.callers import InboundCall, WaitingCaller

CALLER_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbound_calls (
    id INTEGER PRIMARY KEY,
    account INTEGER NOT NULL,
    line TEXT NOT NULL,
    call_id TEXT,
    caller TEXT,
    opened_at REAL NOT NULL,
    first_ring_at REAL,
    quiet_since REAL NOT NULL,
    open_legs INTEGER NOT NULL,
    answered_at REAL,
    expired INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS inbound_calls_by_call_id
    ON inbound_calls (account, call_id) WHERE call_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS inbound_calls_by_caller
    ON inbound_calls (account, caller, opened_at);
CREATE INDEX IF NOT EXISTS inbound_calls_quiet
    ON inbound_calls (quiet_since) WHERE open_legs = 0;
CREATE INDEX IF NOT EXISTS inbound_calls_ringing
    ON inbound_calls (account, line) WHERE open_legs > 0 AND answered_at IS NULL;
CREATE TABLE IF NOT EXISTS inbound_call_legs (
    leg INTEGER PRIMARY KEY,
    call INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS inbound_call_legs_by_call ON inbound_call_legs (call);
CREATE TABLE IF NOT EXISTS waiting_callers (
    id INTEGER PRIMARY KEY,
    account INTEGER NOT NULL,
    caller TEXT NOT NULL,
    line TEXT NOT NULL,
    first_missed_at REAL NOT NULL,
    call_started_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS waiting_callers_by_caller ON waiting_callers (account, caller);
CREATE INDEX IF NOT EXISTS waiting_callers_by_first_miss
    ON waiting_callers (first_missed_at, id);
CREATE INDEX IF NOT EXISTS waiting_callers_by_line ON waiting_callers (account, line);
"""

_CALL_COLUMNS = (
    "account, line, call_id, caller, opened_at, first_ring_at, quiet_since, open_legs,"
    " answered_at, expired, id"
)
_WAITING_COLUMNS = "account, caller, line, first_missed_at, call_started_at, id"


class SqliteCallerBook:
    """A `CallerBook` on the connection of one transaction (or of one read, for the gauges)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    # -- calls ---------------------------------------------------------------------------------

    def call_by_call_id(self, account: int, call_id: str) -> InboundCall | None:
        row = self.connection.execute(
            f"SELECT {_CALL_COLUMNS} FROM inbound_calls WHERE account = ? AND call_id = ?"
            " ORDER BY opened_at, id LIMIT 1",
            (account, call_id),
        ).fetchone()
        return None if row is None else _call(row)

    def calls_of_caller(self, account: int, caller: str | None) -> list[InboundCall]:
        rows = self.connection.execute(
            f"SELECT {_CALL_COLUMNS} FROM inbound_calls WHERE account = ? AND caller IS ?"
            " ORDER BY opened_at, id",
            (account, caller),
        )
        return [_call(row) for row in rows]

    def call_of_leg(self, leg_id: int) -> InboundCall | None:
        row = self.connection.execute(
            f"SELECT {_CALL_COLUMNS} FROM inbound_calls"
            " WHERE id = (SELECT call FROM inbound_call_legs WHERE leg = ?)",
            (leg_id,),
        ).fetchone()
        return None if row is None else _call(row)

    def save_call(self, call: InboundCall) -> None:
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
            int(call.expired),
        )
        if call.id is None:
            cursor = self.connection.execute(
                "INSERT INTO inbound_calls (account, line, call_id, caller, opened_at,"
                " first_ring_at, quiet_since, open_legs, answered_at, expired)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            call.id = cursor.lastrowid
            return
        self.connection.execute(
            "UPDATE inbound_calls SET account = ?, line = ?, call_id = ?, caller = ?,"
            " opened_at = ?, first_ring_at = ?, quiet_since = ?, open_legs = ?, answered_at = ?,"
            " expired = ? WHERE id = ?",
            (*values, call.id),
        )

    def add_leg(self, call: InboundCall, leg_id: int) -> None:
        assert call.id is not None, "a call is saved before its legs are added"
        # REPLACE: SQLite may give a new leg the id of a forgotten one; the id is now this leg's.
        self.connection.execute(
            "INSERT OR REPLACE INTO inbound_call_legs VALUES (?, ?)", (leg_id, call.id)
        )

    def delete_call(self, call: InboundCall) -> None:
        self.connection.execute("DELETE FROM inbound_call_legs WHERE call = ?", (call.id,))
        self.connection.execute("DELETE FROM inbound_calls WHERE id = ?", (call.id,))

    def calls_quiet_before(self, before: float) -> list[InboundCall]:
        rows = self.connection.execute(
            f"SELECT {_CALL_COLUMNS} FROM inbound_calls"
            " WHERE open_legs = 0 AND quiet_since <= ? ORDER BY opened_at, id",
            (before,),
        )
        return [_call(row) for row in rows]

    # -- waiting callers -----------------------------------------------------------------------

    def waiting_caller(self, account: int, caller: str) -> WaitingCaller | None:
        row = self.connection.execute(
            f"SELECT {_WAITING_COLUMNS} FROM waiting_callers WHERE account = ? AND caller = ?",
            (account, caller),
        ).fetchone()
        return None if row is None else WaitingCaller(*row)

    def save_waiting(self, waiting: WaitingCaller) -> None:
        values = (
            waiting.account,
            waiting.caller,
            waiting.line,
            waiting.first_missed_at,
            waiting.call_started_at,
        )
        if waiting.id is None:
            cursor = self.connection.execute(
                "INSERT INTO waiting_callers (account, caller, line, first_missed_at,"
                " call_started_at) VALUES (?, ?, ?, ?, ?)",
                values,
            )
            waiting.id = cursor.lastrowid
            return
        self.connection.execute(
            "UPDATE waiting_callers SET account = ?, caller = ?, line = ?, first_missed_at = ?,"
            " call_started_at = ? WHERE id = ?",
            (*values, waiting.id),
        )

    def delete_waiting(self, waiting: WaitingCaller) -> None:
        self.connection.execute("DELETE FROM waiting_callers WHERE id = ?", (waiting.id,))

    def waiting_missed_before(self, before: float) -> list[WaitingCaller]:
        rows = self.connection.execute(
            f"SELECT {_WAITING_COLUMNS} FROM waiting_callers WHERE first_missed_at <= ?"
            " ORDER BY first_missed_at, id",
            (before,),
        )
        return [WaitingCaller(*row) for row in rows]

    # -- the gauges' aggregates ----------------------------------------------------------------

    def ringing_calls(self) -> Mapping[tuple[int, str], int]:
        rows = self.connection.execute(
            "SELECT account, line, count(*) FROM inbound_calls"
            " WHERE open_legs > 0 AND answered_at IS NULL GROUP BY account, line"
        )
        return {(account, line): count for account, line, count in rows}

    def waiting_callers(self) -> Mapping[tuple[int, str], int]:
        rows = self.connection.execute(
            "SELECT account, line, count(*) FROM waiting_callers GROUP BY account, line"
        )
        return {(account, line): count for account, line, count in rows}

    def first_misses(self) -> Mapping[int, float]:
        rows = self.connection.execute(
            "SELECT account, min(first_missed_at) FROM waiting_callers GROUP BY account"
        )
        return dict(rows.fetchall())


def _call(row: Any) -> InboundCall:
    (
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
        call_id_number,
    ) = row
    return InboundCall(
        account=account,
        line=line,
        call_id=call_id,
        caller=caller,
        opened_at=opened_at,
        first_ring_at=first_ring_at,
        quiet_since=quiet_since,
        open_legs=open_legs,
        answered_at=answered_at,
        expired=bool(expired),
        id=call_id_number,
    )
