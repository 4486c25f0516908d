#!/usr/bin/env python3
"""The exporter's benchmarks, each measured against a baseline run side by side (issue 4).

    .venv/bin/python bench/run.py            # the full run, with a 10-minute soak (~20 min)
    .venv/bin/python bench/run.py --quick    # a smoke run of every section (~2 min)

Sections (`--sections`, default all):
  ingest  POST /webhook saturated by wrk (realistic call lifecycles) against the ceiling: a no-op
          Falcon endpoint under the identical gunicorn configuration, rounds alternating;
  rate    the same at a fixed, moderate rate (latency, not saturation);
  render  /metrics at 100, 1,000 and 10,000 label sets against plain `generate_latest`;
  memory  the whole server's memory with 0, 10,000 and 100,000 open call legs;
  soak    a steady rate for --soak-seconds: memory at the start and the end, errors;
  slow    legitimate webhooks and scrapes while --slow-clients slow connections are held open
          (idle, one byte, headers trickled, body trickled; each replaced when the server closes
          it), then how long the server takes to close them.

It prints a markdown table with each ratio and whether its target holds, and writes the table
and the raw figures to bench/results/. `--candidate NAME=DIR` adds, to the ingest and rate
and slow sections, an exporter imported from another source tree (a scratch copy with a change
to measure), in the same rounds. `--postgresql` adds, to the ingest and rate sections, the
exporter with a PostgreSQL store (a throwaway cluster on 127.0.0.1), in the same rounds; with
`--candidates-on postgresql` the candidates of those sections run on it too, each on a database
of its own (to compare store changes), instead of on SQLite (to compare with another release).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchkit import (
    BENCH_DIR,
    BenchError,
    LoadResult,
    Memory,
    Postgres,
    Server,
    Traffic,
    load,
    machine,
    median,
    mib,
    open_legs,
    open_starts,
    post_bodies,
    ratio,
    throwaway_postgres,
    verdict,
    webhook,
    write_config,
    wrk_path,
)
from slowclients import SlowClients, Timings, timed_request

SECTIONS = ("ingest", "rate", "render", "memory", "soak", "slow")
THROUGHPUT_TARGET = 0.8  # x the ceiling's events per second, at least
P99_TARGET = 2.0  # x the ceiling's p99 latency, at most
RENDER_TARGET = 2.0  # x plain generate_latest at the largest size, at most
LEG_BYTES_TARGET = 1024  # per open call leg, at most
SOAK_GROWTH_TARGET = 0.05  # RSS growth over the soak, at most
SLOW_P99_TARGET_MS = 1000.0  # legitimate requests' p99 with the slow clients connected, at most
CLIENT_TIMEOUT = 10.0  # server.client_timeout's default, which the bench configs keep
CLOSE_MARGIN = 1.5  # the worker's sweep runs once a second
LEGIT_TIMEOUT = 5.0  # a legitimate request not answered by then counts as failed
POSTGRESQL = "postgresql"  # the exporter with a PostgreSQL store, in the ingest sections
POSTGRESQL_TARGET = 0.5  # x the SQLite store's saturated events per second, at least


@dataclass
class Options:
    sections: tuple[str, ...]
    seconds: float
    rounds: int
    connections: int
    wrk_threads: int
    workers: int | None
    threads: int | None
    rate: float
    pauses: str
    render_sizes: tuple[int, ...]
    render_repeats: int
    memory_legs: tuple[int, ...]
    soak_seconds: float
    soak_warmup: float
    slow_clients: int
    candidates: dict[str, str]
    candidates_on: str  # the store the candidates run on: sqlite or postgresql
    postgresql: bool
    output: Path | None
    keep: bool


@dataclass
class Row:
    section: str
    what: str
    ours: str
    base: str = "—"
    ratio: str = "—"
    target: str = "—"
    holds: str = "—"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: str) -> None:
        self.rows.append(Row(*cells))

    def table(self) -> str:
        lines = [
            "| § | measurement | exporter | baseline | ratio | target | holds |",
            "|---|---|---:|---:|---:|---|---|",
        ]
        for row in self.rows:
            cells = (row.section, row.what, row.ours, row.base, row.ratio, row.target, row.holds)
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- 1 and 2: ingest ---------------------------------------------------------------------------


def ingest(options: Options, workdir: Path, report: Report, fixed_rate: bool) -> None:
    """Ceiling and exporter(s) up at once; wrk loads one at a time, in alternating order."""
    name = "rate" if fixed_rate else "ingest"
    traffic = Traffic(
        seconds=options.seconds,
        connections=options.connections,
        threads=options.wrk_threads,
        rate=options.rate if fixed_rate else 0.0,
        pauses=options.pauses,
    )
    config = write_config(workdir / name, "ceiling", options.threads)
    servers = [Server.noop("ceiling", config, _workers(options), workdir / name)]
    servers.append(
        Server.exporter(
            "exporter", write_config(workdir / name, "exporter", options.threads),
            _workers(options), workdir / name,
        )
    )  # fmt: skip
    with ExitStack() as stack:
        postgres = stack.enter_context(throwaway_postgres()) if options.postgresql else None
        on_postgres = postgres if options.candidates_on == POSTGRESQL else None
        for candidate, tree in options.candidates.items():
            servers.append(_exporter(options, workdir / name, candidate, tree, on_postgres))
        if postgres is not None:
            servers.append(_exporter(options, workdir / name, POSTGRESQL, None, postgres))
        results: dict[str, list[LoadResult]] = {server.name: [] for server in servers}
        _rounds(options, servers, traffic, results, name)
    report.raw[name] = {
        "traffic": asdict(traffic),
        "results": {key: [asdict(r) for r in value] for key, value in results.items()},
    }
    _ingest_rows(options, report, servers, results, fixed_rate)


def _exporter(
    options: Options, directory: Path, name: str, tree: str | None, postgres: Postgres | None
) -> Server:
    """The exporter from `tree` (this one if None); with `postgres`, on a PostgreSQL store of a
    new database, else on SQLite."""
    url = postgres.database() if postgres is not None else None
    config = write_config(directory, name, options.threads, store_url=url)
    server = Server.exporter(name, config, _workers(options), directory, tree)
    if postgres is not None:
        server.backing_cpu = postgres.cpu_seconds  # its CPU per request includes the store's
    return server


def _rounds(
    options: Options,
    servers: list[Server],
    traffic: Traffic,
    results: dict[str, list[LoadResult]],
    name: str,
) -> None:
    try:
        for server in servers:
            server.start()
        for server in servers:  # warm-up: imports, connections, caches; not counted
            load(server, replace(traffic, seconds=2))
        for index in range(options.rounds):
            order = servers if index % 2 == 0 else list(reversed(servers))
            for server in order:
                result = load(server, traffic)
                results[server.name].append(result)
                log(
                    f"{name} round {index + 1}/{options.rounds} {server.name}: "
                    f"{result.rate:,.0f} ev/s, p50 {result.p50_ms:.2f} ms, "
                    f"p99 {result.p99_ms:.2f} ms, errors {result.error_count}, "
                    f"{result.cpu_us_per_request:.0f} us CPU/request"
                )
    finally:
        for server in servers:
            server.stop()


def _ingest_rows(
    options: Options,
    report: Report,
    servers: list[Server],
    results: dict[str, list[LoadResult]],
    fixed_rate: bool,
) -> None:
    section = "2" if fixed_rate else "1"
    ceiling = _medians(results["ceiling"])
    for server in servers[1:]:
        ours = _medians(results[server.name])
        label = "" if server.name == "exporter" else f" [{server.name}]"
        if fixed_rate:
            report.add(
                section,
                f"at {options.rate:,.0f} events/s: achieved rate (events/s){label}",
                f"{ours['rate']:,.0f}",
                f"{ceiling['rate']:,.0f}",
                f"{ratio(ours['rate'], ceiling['rate']):.2f}",
            )
        else:
            holds = ratio(ours["rate"], ceiling["rate"]) >= THROUGHPUT_TARGET
            report.add(
                section,
                f"saturated ingest throughput (events/s){label}",
                f"{ours['rate']:,.0f}",
                f"{ceiling['rate']:,.0f}",
                f"{ratio(ours['rate'], ceiling['rate']):.2f}",
                f"≥ {THROUGHPUT_TARGET}",
                verdict(holds),
            )
        report.add(
            section,
            f"latency p50 (ms){label}",
            f"{ours['p50']:.2f}",
            f"{ceiling['p50']:.2f}",
            f"{ratio(ours['p50'], ceiling['p50']):.2f}",
        )
        report.add(
            section,
            f"latency p99 (ms){label}",
            f"{ours['p99']:.2f}",
            f"{ceiling['p99']:.2f}",
            f"{ratio(ours['p99'], ceiling['p99']):.2f}",
            f"≤ {P99_TARGET}",
            verdict(ratio(ours["p99"], ceiling["p99"]) <= P99_TARGET),
        )
        if not fixed_rate:  # at a fixed rate the idle workers' own wake-ups dominate it
            report.add(
                section,
                f"server CPU per request (µs){label}",
                f"{ours['cpu']:.0f}",
                f"{ceiling['cpu']:.0f}",
                f"{ratio(ours['cpu'], ceiling['cpu']):.2f}",
            )
        errors = sum(r.error_count for r in results[server.name])
        requests = sum(r.requests for r in results[server.name])
        report.add(section, f"errors / requests{label}", f"{errors:,} / {requests:,}")
    if POSTGRESQL in results:
        _postgresql_rows(report, section, results, fixed_rate)


def _postgresql_rows(
    report: Report, section: str, results: dict[str, list[LoadResult]], fixed_rate: bool
) -> None:
    """PostgreSQL's store against SQLite's, the exporter otherwise the same."""
    sqlite, postgresql = _medians(results["exporter"]), _medians(results[POSTGRESQL])
    if fixed_rate:
        report.add(
            section,
            "latency p99 (ms), PostgreSQL store against SQLite store",
            f"{postgresql['p99']:.2f}",
            f"{sqlite['p99']:.2f}",
            f"{ratio(postgresql['p99'], sqlite['p99']):.2f}",
        )
        return
    holds = ratio(postgresql["rate"], sqlite["rate"]) >= POSTGRESQL_TARGET
    report.add(
        section,
        "saturated ingest (events/s), PostgreSQL store against SQLite store",
        f"{postgresql['rate']:,.0f}",
        f"{sqlite['rate']:,.0f}",
        f"{ratio(postgresql['rate'], sqlite['rate']):.2f}",
        f"≥ {POSTGRESQL_TARGET}",
        verdict(holds),
    )


def _workers(options: Options) -> int:
    return options.workers or 2


def _medians(results: list[LoadResult]) -> dict[str, float]:
    return {
        "rate": median(r.rate for r in results),
        "p50": median(r.p50_ms for r in results),
        "p99": median(r.p99_ms for r in results),
        "cpu": median(r.cpu_us_per_request for r in results),
    }


# -- 3: /metrics render ------------------------------------------------------------------------


def render(options: Options, workdir: Path, report: Report) -> None:
    from render_bench import check_single_process, measure_one

    check_single_process()
    results = []
    for size in options.render_sizes:
        result = measure_one(size, options.render_repeats, workdir, _workers(options), log)
        log(
            f"render {size}: exporter {result.exporter_ms:.2f} ms, "
            f"plain {result.baseline_ms:.2f} ms, ratio {result.ratio:.2f}"
        )
        results.append(result)
        last = size == max(options.render_sizes)
        report.add(
            "3",
            f"/metrics render, {size:,} label sets ({result.samples:,} samples) (ms)",
            f"{result.exporter_ms:.2f}",
            f"{result.baseline_ms:.2f}",
            f"{result.ratio:.2f}",
            f"≤ {RENDER_TARGET}" if last else "—",
            verdict(result.ratio <= RENDER_TARGET) if last else "—",
        )
    report.raw["render"] = [asdict(r) for r in results]
    if results:
        largest = results[-1]
        report.add(
            "3",
            f"GET /metrics over HTTP, {largest.label_sets:,} label sets (ms)",
            f"{largest.http_ms:.2f}",
        )


# -- 4: memory ---------------------------------------------------------------------------------


def memory(options: Options, workdir: Path, report: Report) -> None:
    config = write_config(workdir / "memory", "memory", options.threads)
    server = Server.exporter("memory", config, _workers(options), workdir / "memory")
    readings: list[tuple[int, Memory]] = []
    with server:
        # Warm-up: complete calls through every worker thread, so 0 open legs is a served state.
        bodies = []
        for index in range(400):
            bodies.append(webhook("onInCallingStart", str(100 + index % 50), f"warm-{index}"))
            bodies.append(webhook("onInCallingEnd", str(100 + index % 50), f"warm-{index}", 30))
        post_bodies(server.url + "/webhook", bodies[0::2], threads=8)
        post_bodies(server.url + "/webhook", bodies[1::2], threads=8)
        time.sleep(2)
        readings.append((open_legs(server), server.memory()))
        log(f"memory: {readings[-1][0]} open legs, {_describe(readings[-1][1])}")
        for target in options.memory_legs:
            legs = open_starts(server, target - readings[-1][0], 32, options.wrk_threads)
            time.sleep(2)
            readings.append((legs, server.memory()))
            log(f"memory: {legs} open legs, {_describe(readings[-1][1])}")
        store_bytes = sum(
            path.stat().st_size for path in (workdir / "memory").glob("memory.sqlite3*")
        )
    report.raw["memory"] = {
        "readings": [{"open_legs": legs, **asdict(m)} for legs, m in readings],
        "store_bytes": store_bytes,
    }
    base_legs, base = readings[0]
    for legs, reading in readings:
        report.add(
            "4",
            f"memory with {legs:,} open legs (PSS; RSS)",
            f"{mib(reading.pss)}; {mib(reading.rss)}",
        )
    legs, top = readings[-1]
    per_leg = (top.pss - base.pss) / max(1, legs - base_legs)
    per_leg_rss = (top.rss - base.rss) / max(1, legs - base_legs)
    report.add(
        "4",
        f"memory per open leg, 0 → {legs:,} (PSS; RSS)",
        f"{per_leg:,.0f} B; {per_leg_rss:,.0f} B",
        f"{LEG_BYTES_TARGET:,} B",
        f"{ratio(per_leg, LEG_BYTES_TARGET):.2f}",
        f"≤ {LEG_BYTES_TARGET:,} B",
        verdict(max(per_leg, per_leg_rss) <= LEG_BYTES_TARGET),
    )
    report.add(
        "4",
        f"call store on disk with {legs:,} legs (SQLite + WAL)",
        f"{mib(store_bytes)}",
    )


def _describe(reading: Memory) -> str:
    return f"PSS {mib(reading.pss)}, RSS {mib(reading.rss)} in {reading.processes} processes"


# -- 5: soak -----------------------------------------------------------------------------------


def soak(options: Options, workdir: Path, report: Report) -> None:
    config = write_config(workdir / "soak", "soak", options.threads)
    server = Server.exporter("soak", config, _workers(options), workdir / "soak")
    traffic = Traffic(
        seconds=options.soak_seconds,
        connections=options.connections,
        threads=options.wrk_threads,
        rate=options.rate,
    )
    timeline: list[dict[str, float]] = []
    scrapes: list[float] = []
    scrape_failures = 0
    with server:
        idle = server.memory()
        started = time.monotonic()
        outcome: list[LoadResult] = []
        failure: list[BaseException] = []

        def run_wrk() -> None:
            try:
                outcome.append(load(server, traffic, "s"))
            except BaseException as exc:  # reported after the join
                failure.append(exc)

        worker = threading.Thread(target=run_wrk)
        worker.start()
        next_scrape = started + 5
        while worker.is_alive():
            now = time.monotonic()
            if now >= next_scrape:  # as Prometheus would, every 15 s
                next_scrape += 15
                try:
                    begin = time.perf_counter()
                    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
                        response.read()
                    scrapes.append((time.perf_counter() - begin) * 1000)
                except OSError:
                    scrape_failures += 1
                reading = server.memory()
                timeline.append(
                    {"t": round(now - started, 1), "rss": reading.rss, "pss": reading.pss}
                )
            worker.join(timeout=1.0)
        end = server.memory()
        timeline.append({"t": round(time.monotonic() - started, 1), "rss": end.rss, "pss": end.pss})
    if failure:
        raise failure[0]
    result = outcome[0]
    warm = [p for p in timeline if p["t"] >= options.soak_warmup] or timeline
    start_point, end_point = warm[0], timeline[-1]
    growth = ratio(end_point["rss"] - start_point["rss"], start_point["rss"])
    pss_growth = ratio(end_point["pss"] - start_point["pss"], start_point["pss"])
    report.raw["soak"] = {
        "traffic": asdict(traffic),
        "result": asdict(result),
        "idle": asdict(idle),
        "timeline": timeline,
        "scrape_ms": scrapes,
        "scrape_failures": scrape_failures,
    }
    length = (
        f"{options.soak_seconds / 60:g} min"
        if options.soak_seconds >= 60
        else f"{options.soak_seconds:g} s"
    )
    report.add(
        "5",
        f"soak {length} at {options.rate:,.0f} events/s: achieved rate (events/s)",
        f"{result.rate:,.0f}",
    )
    report.add(
        "5",
        f"RSS at t={start_point['t']:.0f} s → end (PSS)",
        f"{mib(start_point['rss'])} → {mib(end_point['rss'])} "
        f"({mib(start_point['pss'])} → {mib(end_point['pss'])})",
    )
    report.add(
        "5",
        "RSS growth over the soak (PSS)",
        f"{growth:+.1%} ({pss_growth:+.1%})",
        "—",
        "—",
        f"≤ {SOAK_GROWTH_TARGET:.0%}",
        verdict(growth <= SOAK_GROWTH_TARGET),
    )
    report.add(
        "5",
        "errors / requests; failed scrapes / scrapes",
        f"{result.error_count:,} / {result.requests:,}; {scrape_failures} / "
        f"{len(scrapes) + scrape_failures}",
        "—",
        "—",
        "0",
        verdict(result.error_count == 0 and scrape_failures == 0),
    )
    report.add(
        "5",
        "latency p50 / p99 (ms); scrape median / max (ms)",
        f"{result.p50_ms:.2f} / {result.p99_ms:.2f}; "
        f"{median(scrapes):.1f} / {max(scrapes, default=0):.1f}",
    )
    report.notes.append(
        f"Soak memory: idle before traffic {mib(idle.rss)} RSS; the start reading is the first "
        f"after {options.soak_warmup:g} s of traffic (connections opened, caches filled)."
    )


# -- 6: slow clients ----------------------------------------------------------------------------


def slow(options: Options, workdir: Path, report: Report) -> None:
    """One server at a time (the slow clients would load the others): legitimate latency, then
    how long the slow connections stay."""
    trees: dict[str, str | None] = {"exporter": None, **options.candidates}
    for name, tree in trees.items():
        config = write_config(workdir / "slow", name, options.threads)
        server = Server.exporter(name, config, _workers(options), workdir / "slow", tree)
        with server:
            figures = _slow_round(server, options)
        report.raw.setdefault("slow", {})[name] = figures
        log(
            f"slow {name}: {figures['answered']}/{figures['sent']} answered, "
            f"p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms, "
            f"longest slow connection {figures['longest_s']:.1f} s, "
            f"{figures['left_open']} left open"
        )
        _slow_rows(report, options, name, figures)


def _slow_round(server: Server, options: Options) -> dict[str, Any]:
    timings = Timings()
    with SlowClients("127.0.0.1", server.port, options.slow_clients, replenish=True) as clients:
        time.sleep(2.0)  # every kind has started
        _legitimate_traffic(server, options.seconds, timings)
        held = clients.open_count()
        clients.replenish = False
        closing_started = time.monotonic()
        clients.wait_all_closed(CLIENT_TIMEOUT + CLOSE_MARGIN + 2)
        left_open = clients.open_count()
        lifetimes = [t for kind in clients.lifetimes().values() for t in kind]
        opened = len(clients.connections)
    sent = len(timings.seconds) + len(timings.failures)
    # A request not answered within LEGIT_TIMEOUT counts as that slow, at least.
    timings.seconds += [LEGIT_TIMEOUT] * len(timings.failures)
    return {
        "sent": sent,
        "answered": sent - len(timings.failures),
        "failures": timings.failures[:5],
        "p50_ms": timings.percentile(0.5) * 1000,
        "p99_ms": timings.percentile(0.99) * 1000,
        "max_ms": max(timings.seconds, default=0.0) * 1000,
        "slow_held": held,
        "slow_opened": opened,
        "longest_s": max(lifetimes, default=0.0),
        "left_open": left_open,
        "closing_s": time.monotonic() - closing_started,
    }


def _legitimate_traffic(server: Server, seconds: float, timings: Timings) -> None:
    """20 webhooks/s and a scrape a second, each on a new connection, on a fixed schedule (a
    stalled request does not hold back the next)."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=128) as pool:
        for tick in range(int(seconds * 20)):
            time.sleep(max(0.0, started + tick / 20 - time.monotonic()))
            body = webhook("onInCallingStart", str(100 + tick % 50), f"slow-{started}-{tick}")
            pool.submit(
                timed_request, "127.0.0.1", server.port, "POST", "/webhook", body, timings,
                LEGIT_TIMEOUT,
            )  # fmt: skip
            if tick % 20 == 0:
                pool.submit(
                    timed_request, "127.0.0.1", server.port, "GET", "/metrics", None, timings,
                    LEGIT_TIMEOUT,
                )  # fmt: skip


def _slow_rows(report: Report, options: Options, name: str, figures: dict[str, Any]) -> None:
    label = "" if name == "exporter" else f" [{name}]"
    count = options.slow_clients
    report.add(
        "6",
        f"{count} slow clients: legitimate requests answered / sent{label}",
        f"{figures['answered']:,} / {figures['sent']:,}",
        "—",
        "—",
        "all",
        verdict(figures["answered"] == figures["sent"]),
    )
    p99_target = f"< {SLOW_P99_TARGET_MS:,.0f}"
    report.add(
        "6",
        f"{count} slow clients: legitimate p50 / p99 (ms){label}",
        f"{figures['p50_ms']:.1f} / {figures['p99_ms']:.1f}",
        "—",
        "—",
        f"p99 {p99_target}",
        verdict(figures["p99_ms"] < SLOW_P99_TARGET_MS),
    )
    limit = CLIENT_TIMEOUT + CLOSE_MARGIN
    report.add(
        "6",
        f"slow connections: longest open (s); still open after {limit + 2:g} s{label}",
        f"{figures['longest_s']:.1f}; {figures['left_open']}",
        "—",
        "—",
        f"≤ {limit:g} s; 0",
        verdict(figures["longest_s"] <= limit and figures["left_open"] == 0),
    )


# -- command line ------------------------------------------------------------------------------


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description="Benchmarks of mcn-exporter against baselines run side by side."
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run of everything")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--duration", type=float, help="seconds per wrk round (15; quick 3)")
    parser.add_argument("--rounds", type=int, help="rounds per server, alternating (3; quick 1)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (16)")
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--workers", type=int, help="gunicorn workers (the config default, 2)")
    parser.add_argument("--threads", type=int, help="gunicorn threads (the config default, 4)")
    parser.add_argument("--rate", type=float, default=200, help="events/s, fixed-rate runs (200)")
    parser.add_argument(
        "--pauses",
        choices=("drawn", "fixed"),
        default="drawn",
        help="fixed-rate pauses: drawn from an exponential of the mean (default), or fixed",
    )
    parser.add_argument("--render-sizes", help="label sets (100,1000,10000; quick 100,1000)")
    parser.add_argument("--render-repeats", type=int, help="renders timed per size (15; quick 5)")
    parser.add_argument("--memory-legs", help="open legs (10000,100000; quick 1000,10000)")
    parser.add_argument("--soak-seconds", type=float, help="soak length (600; quick 20)")
    parser.add_argument("--soak-warmup", type=float, help="traffic before the start reading (30)")
    parser.add_argument("--slow-clients", type=int, default=200, help="slow connections (200)")
    parser.add_argument(
        "--candidate",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also load an exporter imported from this source tree (ingest, rate, slow)",
    )
    parser.add_argument(
        "--postgresql",
        action="store_true",
        help="also load the exporter with a PostgreSQL store, a throwaway cluster (ingest, rate)",
    )
    parser.add_argument(
        "--candidates-on",
        choices=("sqlite", POSTGRESQL),
        default="sqlite",
        help="the store the candidates run on (ingest, rate); postgresql needs --postgresql",
    )
    parser.add_argument(
        "--output", default=str(BENCH_DIR / "results"), help="where to write results ('' = none)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    quick = args.quick
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    candidates = {}
    for item in args.candidate:
        name, _, tree = item.partition("=")
        if not tree or not (Path(tree) / "exporter").is_dir():
            parser.error(f"--candidate {item}: want NAME=DIR with DIR/exporter/")
        candidates[name] = str(Path(tree).resolve())
    if args.candidates_on == POSTGRESQL and not args.postgresql:
        parser.error("--candidates-on postgresql: add --postgresql")
    return Options(
        sections=sections,
        seconds=args.duration or (3.0 if quick else 15.0),
        rounds=args.rounds or (1 if quick else 3),
        connections=args.connections,
        wrk_threads=args.wrk_threads,
        workers=args.workers,
        threads=args.threads,
        rate=args.rate,
        pauses=args.pauses,
        render_sizes=_sizes(args.render_sizes or ("100,1000" if quick else "100,1000,10000")),
        render_repeats=args.render_repeats or (5 if quick else 15),
        memory_legs=_sizes(args.memory_legs or ("1000,10000" if quick else "10000,100000")),
        soak_seconds=args.soak_seconds or (20.0 if quick else 600.0),
        soak_warmup=args.soak_warmup if args.soak_warmup is not None else (5 if quick else 30),
        slow_clients=args.slow_clients,
        candidates=candidates,
        candidates_on=args.candidates_on,
        postgresql=args.postgresql,
        output=Path(args.output) if args.output else None,
        keep=args.keep,
    )


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(sorted(int(part) for part in text.split(",") if part.strip()))


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    wrk_path()  # fail early, with the install hint, if wrk is missing
    report = Report()
    report.raw["machine"] = machine()
    report.raw["options"] = {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in asdict(options).items()
    }
    steps: dict[str, Callable[[Path], None]] = {
        "ingest": lambda work: ingest(options, work, report, fixed_rate=False),
        "rate": lambda work: ingest(options, work, report, fixed_rate=True),
        "render": lambda work: render(options, work, report),
        "memory": lambda work: memory(options, work, report),
        "soak": lambda work: soak(options, work, report),
        "slow": lambda work: slow(options, work, report),
    }
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mcn-bench-"))
    try:
        for section in SECTIONS:
            if section in options.sections:
                log(f"section {section}")
                steps[section](workdir)
    finally:
        if options.keep:
            log(f"working directory kept: {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    report.raw["seconds"] = round(time.monotonic() - started)
    text = render_report(report, options)
    print(text)
    if options.output:
        options.output.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (options.output / f"{stamp}.md").write_text(text + "\n", encoding="utf-8")
        (options.output / f"{stamp}.json").write_text(
            json.dumps({"table": [asdict(r) for r in report.rows], **report.raw}, indent=1),
            encoding="utf-8",
        )
        log(f"results written to {options.output}/{stamp}.md and .json")
    return 0


def render_report(report: Report, options: Options) -> str:
    facts = report.raw["machine"]
    header = ", ".join(f"{key} {value}" for key, value in facts.items())
    setup = (
        f"gunicorn gthread, {_workers(options)} workers x {options.threads or 4} threads; "
        f"wrk {options.wrk_threads} threads x {options.connections} connections, "
        f"{options.rounds} alternating rounds of {options.seconds:g} s (medians)"
    )
    lines = [report.table(), "", f"Machine: {header}.", f"Setup: {setup}."]
    lines += [f"Note: {note}" for note in report.notes]
    lines.append(f"Took {report.raw['seconds']} s.")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(1)
