"""A call store opened on first use, for a database that may be down when the exporter starts.

A replica starting while PostgreSQL is down or restarting comes up and answers 503
(`store_unavailable`, and `/readyz` 503) rather than exiting: a supervisor would restart it
over and over, and the load balancer would see it missing rather than not ready. Each use
tries to open the store until one succeeds; the store then runs as usual (it reconnects on its
own once opened).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

from exporter.legs import CounterRow, TallyLayout, TimingRow
from exporter.store.base import CallStore, StoreSnapshot, StoreTransaction, StoreUnavailable

# After a failed attempt, requests are refused at once for this long instead of each trying
# again: a database that does not answer would otherwise cost every request a connect timeout.
RETRY_INTERVAL = 1.0


class DeferredStore:
    """A CallStore opened by `open_store` at the first use that finds the database up.

    `prepare` runs once on the opened store before any other use: the zero series and the
    reserved extensions, which the master could not create while the database was down.
    Until then, every call raises StoreUnavailable, within about `wait` seconds.
    """

    def __init__(
        self,
        open_store: Callable[[], CallStore],
        layout: TallyLayout,
        prepare: Callable[[CallStore], None],
        wait: float,
    ) -> None:
        self.layout = layout
        self._open_store = open_store
        self._prepare = prepare
        self._wait = wait
        self._store: CallStore | None = None
        self._opening = threading.Lock()
        self._failed: tuple[float, str] | None = None  # when the last attempt failed, and why
        self._closed = False

    def transaction(self) -> AbstractContextManager[StoreTransaction]:
        return self._opened().transaction()

    def snapshot(self) -> StoreSnapshot:
        return self._opened().snapshot()

    def ensure_rows(self, rows: Iterable[CounterRow | TimingRow]) -> None:
        self._opened().ensure_rows(rows)

    def reserve_extensions(self, account: int, extensions: Iterable[str]) -> None:
        self._opened().reserve_extensions(account, extensions)

    def ping(self) -> None:
        self._opened().ping()

    def close(self) -> None:
        with self._opening:
            self._closed = True
            if self._store is not None:
                self._store.close()

    @property
    def is_open(self) -> bool:
        return self._store is not None

    def _opened(self) -> CallStore:
        store = self._store
        if store is not None:
            return store
        # One thread opens; the others wait for it no longer than a request may wait.
        if not self._opening.acquire(timeout=self._wait):
            raise StoreUnavailable("the call store is still being opened")
        try:
            return self._store or self._open()
        finally:
            self._opening.release()

    def _open(self) -> CallStore:
        if self._closed:
            raise StoreUnavailable("the call store is closed")
        if self._failed is not None and time.monotonic() - self._failed[0] < RETRY_INTERVAL:
            raise StoreUnavailable(self._failed[1])
        try:
            store = self._open_store()
            try:
                self._prepare(store)
            except BaseException:
                store.close()
                raise
        except StoreUnavailable as exc:
            self._failed = (time.monotonic(), str(exc))
            raise
        self._failed = None
        self._store = store
        return store
