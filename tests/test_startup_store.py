"""Choosing and opening the call store at start: the backend, the password, the time limits."""

from __future__ import annotations

from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from exporter.config import StoreConfig, parse_config
from exporter.startup import (
    PostgresTimeouts,
    StartupError,
    open_store,
    postgresql_conninfo,
    tally_layout,
)
from exporter.store import SqliteCallStore
from exporter.store.deferred import DeferredStore
from tests.conftest import base_config


def test_without_a_url_the_store_is_sqlite_opened_at_once(tmp_path: Path) -> None:
    config = parse_config(base_config(tmp_path))
    store = open_store(config, tally_layout(config))
    try:
        assert isinstance(store, SqliteCallStore)
        assert (tmp_path / "calls.sqlite3").exists()
    finally:
        store.close()


def test_a_url_gives_a_postgresql_store_opened_on_first_use(tmp_path: Path) -> None:
    config = parse_config(base_config(tmp_path, store={"url": "postgresql://mcn@127.0.0.1:1/x"}))
    store = open_store(config, tally_layout(config))
    assert isinstance(store, DeferredStore)
    assert not store.is_open  # nothing connects before a request needs it
    store.close()


def test_the_password_file_reaches_libpq_beside_the_url() -> None:
    for url in ("postgresql://mcn@db.example/mcn?sslmode=require", "host=db.example dbname=mcn"):
        conninfo = postgresql_conninfo(StoreConfig(url=url, password="it's a secret"))
        assert conninfo_to_dict(conninfo)["password"] == "it's a secret"
        assert conninfo_to_dict(conninfo)["host"] == "db.example"


def test_a_url_libpq_cannot_read_stops_the_start_without_its_password() -> None:
    with pytest.raises(StartupError) as caught:
        postgresql_conninfo(StoreConfig(url="postgresql://mcn:hunter2@db/mcn?colour=red"))
    assert str(caught.value).startswith("store.url: libpq cannot read ")
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("server_timeout", "connect", "statement"),
    [(30.0, 3.0, 5.0), (6.0, 1.0, 1.0), (300.0, 5.0, 50.0)],
)
def test_postgresql_waits_are_shares_of_the_server_timeout(
    server_timeout: float, connect: float, statement: float
) -> None:
    timeouts = PostgresTimeouts.within(server_timeout)
    assert (timeouts.connect, timeouts.statement) == (connect, statement)
    assert timeouts.connect + 2 * timeouts.statement < server_timeout
