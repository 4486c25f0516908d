"""A store opened at its first use that finds the database up: refused quickly until then."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from exporter.events import Service
from exporter.legs import TallyLayout
from exporter.store import CallStore, SqliteCallStore, StoreUnavailable
from exporter.store import deferred as deferred_store
from exporter.store.deferred import DeferredStore

LAYOUT = TallyLayout(ring_buckets=(5.0,), talk_buckets=(60.0,), timings_by_extension=False)


class Database:
    """Down until `up` is set; counts the attempts to open it and the preparations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.up = False
        self.attempts = 0
        self.prepared: list[CallStore] = []

    def open(self) -> CallStore:
        self.attempts += 1
        if not self.up:
            raise StoreUnavailable("connection refused")
        return SqliteCallStore(self.path, LAYOUT)

    def prepare(self, store: CallStore) -> None:
        self.prepared.append(store)


def test_refused_while_down_then_opened_and_prepared_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deferred_store, "RETRY_INTERVAL", 0.2)
    database = Database(tmp_path / "calls.sqlite3")
    store = DeferredStore(database.open, LAYOUT, database.prepare, wait=1.0)
    assert database.attempts == 0  # nothing is opened before it is used

    with pytest.raises(StoreUnavailable, match="connection refused"):
        store.ping()
    with pytest.raises(StoreUnavailable, match="connection refused"):
        store.snapshot()
    assert database.attempts == 1  # the second was refused without trying again so soon

    database.up = True
    time.sleep(0.3)
    store.ping()
    store.snapshot()
    with store.transaction() as tx:
        tx.touch(1, Service.VPBX, 1.0)
    assert store.snapshot().last_events == {(1, Service.VPBX): 1.0}
    assert database.attempts == 2
    assert len(database.prepared) == 1
    assert store.is_open
    store.close()
    with pytest.raises(StoreUnavailable):
        store.ping()


def test_a_failed_preparation_closes_the_store_and_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deferred_store, "RETRY_INTERVAL", 0.0)
    database = Database(tmp_path / "calls.sqlite3")
    database.up = True
    failures = [StoreUnavailable("server closed the connection")]

    def prepare(store: CallStore) -> None:
        if failures:
            raise failures.pop()
        database.prepare(store)

    store = DeferredStore(database.open, LAYOUT, prepare, wait=1.0)
    with pytest.raises(StoreUnavailable, match="server closed"):
        store.ping()
    assert not store.is_open
    store.ping()
    assert (database.attempts, len(database.prepared)) == (2, 1)
    store.close()
