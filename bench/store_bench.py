"""The call store alone: SQLite against PostgreSQL, ingest throughput side by side.

Each backend gets P processes x T threads driving `CallTracker.on_event` over its own store, with
the call mix of `webhooks.lua` (interleaved lifecycles, a quarter without call_id), as fast as
the store takes them. No HTTP: what is measured is the store and the state machine. The
PostgreSQL server is a throwaway cluster in a temporary directory (Debian's binaries, fsync on,
synchronous_commit on), as the tests start it. Rounds alternate the backends (A B B A ...); the
table shows the median of each and the ratio PostgreSQL / SQLite.

    .venv/bin/python bench/store_bench.py [--rounds 4] [--seconds 10] [--processes 2]
                                          [--threads 8]
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.synchronize
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for tests.pgcluster, the tests' throwaway PostgreSQL

from exporter.calls import CallTracker, TrackerSettings  # noqa: E402
from exporter.events import EVENT_KINDS, CallEvent  # noqa: E402
from exporter.legs import TallyLayout  # noqa: E402
from exporter.store import CallStore, SqliteCallStore, StoreUnavailable  # noqa: E402
from exporter.store.postgresql import PostgresCallStore  # noqa: E402
from tests.pgcluster import PgCluster  # noqa: E402

ACCOUNT = 10123
LAYOUT = TallyLayout(ring_buckets=(1.0, 5.0, 10.0, 20.0, 30.0, 60.0), talk_buckets=(30.0, 300.0))
SLOTS = 256  # calls in progress per thread, their events interleaved as in webhooks.lua
EXTENSIONS = 60
BACKENDS = ("sqlite", "postgresql")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Outcome:
    events: int
    failures: int  # StoreUnavailable: what the server would answer 503
    seconds: float
    latencies: list[float]  # per event, seconds
    client_cpu: float = 0.0  # seconds of CPU of the processes driving the store
    server_cpu: float = 0.0  # seconds of CPU of the PostgreSQL server

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def cpu_per_event(self, cpu: float) -> float:
        """Microseconds."""
        return cpu * 1e6 / self.events if self.events else 0.0


# -- traffic -----------------------------------------------------------------------------------


def call_events(n: int, run: str, tid: int) -> list[CallEvent]:
    """Call `n` of one thread: the mix of webhooks.lua, as parsed events."""
    kind = n % 20
    did = f"+4219{tid % 100:02d}{n % 10_000_000:07d}"
    call_id = f"{run}-{tid}-{n}" if n % 4 != 1 or 12 <= kind < 14 else None
    a = str(100 + (n * 7 + tid) % EXTENSIONS)
    b = str(100 + (n * 7 + tid + 1) % EXTENSIONS)
    talk = 5 + (n * 37) % 600

    def event(name: str, abon: str, billsec: int | None = None) -> CallEvent:
        kind_ = EVENT_KINDS[name]
        return CallEvent(name, kind_, ACCOUNT, kind_.service, abon, did, call_id, billsec)

    if kind < 9:
        return [
            event("onInCallingStart", a),
            event("onInCallingAnswered", a),
            event("onInCallingEnd", a, talk),
        ]
    if kind < 12:
        return [event("onInCallingStart", a), event("onInCallingMissed", a)]
    if kind < 14:
        return [
            event("onInCallingStart", a),
            event("onInCallingStart", b),
            event("onInCallingAnswered", a),
            event("onCloseIncomingNotice", b),
            event("onInCallingEnd", a, talk),
        ]
    if kind < 18:
        return [
            event("onOutCallingStart", a),
            event("onOutCallingAnswered", a),
            event("onOutCallingEnd", a, talk),
        ]
    if kind < 19:
        return [event("onOutCallingStart", a), event("onOutCallingMissed", a)]
    return [event("InboundCallStart", ""), event("InboundCallEnd", "")]


def traffic(run: str, tid: int) -> Iterator[CallEvent]:
    """One thread's events, endless: SLOTS calls in progress, one event of each in turn."""
    calls: list[list[CallEvent]] = [[] for _ in range(SLOTS)]
    made = 0
    slot = 0
    while True:
        if not calls[slot]:
            made += 1
            calls[slot] = call_events(made, run, tid)
        yield calls[slot].pop(0)
        slot = (slot + 1) % SLOTS


# -- one process -------------------------------------------------------------------------------


def open_store(backend: str, where: str) -> CallStore:
    if backend == "sqlite":
        return SqliteCallStore(where, LAYOUT)
    return PostgresCallStore(where, LAYOUT)


def drive(
    tracker: CallTracker, events: Iterator[CallEvent], deadline: float, into: list[Outcome]
) -> None:
    done = failures = 0
    latencies: list[float] = []
    started = time.monotonic()
    while (now := time.monotonic()) < deadline:
        try:
            tracker.on_event(next(events))
            done += 1
        except StoreUnavailable:
            failures += 1
        latencies.append(time.monotonic() - now)
    into.append(Outcome(done, failures, time.monotonic() - started, latencies))


def process_main(
    backend: str,
    where: str,
    run: str,
    threads: int,
    seconds: float,
    ready: multiprocessing.synchronize.Barrier,
    results: multiprocessing.Queue[Outcome],
) -> None:
    store = open_store(backend, where)
    tracker = CallTracker(store, TrackerSettings())
    streams = [traffic(run, tid) for tid in range(threads)]
    outcomes: list[Outcome] = []
    ready.wait()  # every process has its store open: the clock starts for all at once
    deadline = time.monotonic() + seconds
    workers = [
        threading.Thread(target=drive, args=(tracker, stream, deadline, outcomes))
        for stream in streams
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    store.close()
    results.put(
        Outcome(
            events=sum(one.events for one in outcomes),
            failures=sum(one.failures for one in outcomes),
            seconds=max(one.seconds for one in outcomes),
            latencies=[latency for one in outcomes for latency in one.latencies],
        )
    )


# -- a round -----------------------------------------------------------------------------------


def run_round(
    backend: str, where: str, run: str, processes: int, threads: int, seconds: float
) -> Outcome:
    context = multiprocessing.get_context("fork")
    ready = context.Barrier(processes)
    results: multiprocessing.Queue[Outcome] = context.Queue()
    children = [
        context.Process(
            target=process_main,
            args=(backend, where, f"{run}-{index}", threads, seconds, ready, results),
        )
        for index in range(processes)
    ]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=seconds + 120) for _ in children]
    for child in children:
        child.join()
    return Outcome(
        events=sum(one.events for one in outcomes),
        failures=sum(one.failures for one in outcomes),
        seconds=max(one.seconds for one in outcomes),
        latencies=[latency for one in outcomes for latency in one.latencies],
    )


def children_cpu() -> float:
    """CPU seconds of this process's children that have ended."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def server_cpu(cluster: PgCluster) -> float:
    """CPU seconds of the PostgreSQL server so far: the postmaster, its live processes and the
    backends it has reaped."""
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    total = 0.0
    for pid in [postmaster, *live_children(postmaster)]:
        fields = process_fields(pid)
        if fields:
            ticks = fields[11] + fields[12] + (fields[13] + fields[14] if pid == postmaster else 0)
            total += ticks / CLOCK_TICKS
    return total


def live_children(parent: int) -> list[int]:
    children: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = process_fields(int(entry.name))
            if fields and fields[1] == parent:
                children.append(int(entry.name))
    return children


def process_fields(pid: int) -> list[int]:
    """/proc/<pid>/stat from the state on, as numbers (the state itself as 0)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    rest = text.rsplit(")", 1)[1].split()
    return [0, *(int(value) for value in rest[1:])]


def percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def order(rounds: int) -> Iterator[tuple[int, str]]:
    """A B B A A B ...: neither backend always runs first."""
    for index in range(rounds):
        pair = BACKENDS if index % 2 == 0 else BACKENDS[::-1]
        for backend in pair:
            yield index, backend


def bench(args: argparse.Namespace, cluster: PgCluster, scratch: Path) -> dict[str, list[Outcome]]:
    outcomes: dict[str, list[Outcome]] = {backend: [] for backend in BACKENDS}
    for index, backend in order(args.rounds):
        if backend == "sqlite":
            where = str(scratch / f"round-{index}.sqlite3")
        else:
            where = cluster.create_database()
        client, server = children_cpu(), server_cpu(cluster)
        outcome = run_round(backend, where, f"r{index}", args.processes, args.threads, args.seconds)
        time.sleep(0.5)  # the backends of the round's connections end and are reaped
        outcome = replace(
            outcome,
            client_cpu=children_cpu() - client,
            server_cpu=server_cpu(cluster) - server,
        )
        outcomes[backend].append(outcome)
        print(
            f"round {index + 1} {backend:10s} {outcome.rate:8.0f} events/s"
            f"  p50 {percentile(outcome.latencies, 0.5) * 1000:6.2f} ms"
            f"  p99 {percentile(outcome.latencies, 0.99) * 1000:6.2f} ms"
            f"  CPU/event {outcome.cpu_per_event(outcome.client_cpu):4.0f} us"
            f" + server {outcome.cpu_per_event(outcome.server_cpu):4.0f} us"
            f"  503s {outcome.failures}",
            flush=True,
        )
    return outcomes


def report(outcomes: dict[str, list[Outcome]]) -> None:
    rates = {
        backend: statistics.median(one.rate for one in outcomes[backend]) for backend in BACKENDS
    }
    print()
    print("| backend | events/s | p99 ms | client CPU µs/event | PostgreSQL CPU µs/event | 503s |")
    print("|---|---:|---:|---:|---:|---:|")
    for backend in BACKENDS:
        rounds = outcomes[backend]
        p99 = statistics.median(percentile(one.latencies, 0.99) for one in rounds)
        client = statistics.median(one.cpu_per_event(one.client_cpu) for one in rounds)
        server = statistics.median(one.cpu_per_event(one.server_cpu) for one in rounds)
        failures = sum(one.failures for one in rounds)
        print(
            f"| {backend} | {rates[backend]:,.0f} | {p99 * 1000:.1f} | {client:.0f}"
            f" | {server:.0f} | {failures} |"
        )
    print("(medians of the rounds)")
    ratio = rates["postgresql"] / rates["sqlite"] if rates["sqlite"] else 0.0
    print(f"\nPostgreSQL / SQLite: {ratio:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="mcn-store-bench-"))
    cluster = PgCluster(scratch)
    try:
        cluster.init()
        cluster.start()
        report(bench(args, cluster, scratch))
    finally:
        stop_quietly(cluster.stop)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def stop_quietly(stop: Callable[[], None]) -> None:
    try:
        stop()
    except RuntimeError as exc:  # it never started: the error that said so is on its way
        print(f"stopping PostgreSQL: {exc}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
