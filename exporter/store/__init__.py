"""The call store: open legs and call totals, shared by every worker and kept across restarts.

`base` is the interface every backend implements; `sqlite` keeps the store in one SQLite file,
`groupcommit` is its shared-commit writer, `postgresql` keeps it in a PostgreSQL database shared
by replicas (imported only when configured: psycopg is an optional dependency), `deferred` opens
such a store at its first use that finds the database up, `sqlite_callers` and `pgcallers`
keep the caller level's records in each, `digests` is the keyed hashing of numbers and `rows`
the row helpers every SQL backend shares.
"""

from exporter.store.base import (
    CallStore,
    LegQuery,
    StoreIncompatible,
    StoreSeed,
    StoreSnapshot,
    StoreTransaction,
    StoreUnavailable,
    TimingSeries,
)
from exporter.store.sqlite import SqliteCallStore

__all__ = [
    "CallStore",
    "LegQuery",
    "SqliteCallStore",
    "StoreIncompatible",
    "StoreSeed",
    "StoreSnapshot",
    "StoreTransaction",
    "StoreUnavailable",
    "TimingSeries",
]
