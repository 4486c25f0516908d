"""Profiles of the webhook request path.

    python bench/profile_app.py inprocess [--events 30000] [--profiler pyinstrument|cprofile]
    python bench/profile_app.py live [--seconds 10] [--workers 2] [--threads 4] [--gil]

`inprocess` calls the exporter's Falcon app and the no-op ceiling's app directly as WSGI
callables, one thread, on the realistic traffic of webhooks.lua (a real SQLite store in a
temporary directory), and prints the cost per event of each: what the exporter adds to a request,
without gunicorn, sockets or contention. With --profiler it profiles the exporter's run.

`breakdown` runs the same traffic through the exporter's app with its SQLite connection wrapped,
and prints the time per event of each SQL statement (BEGIN and COMMIT included), of the webhook
parsing, and of the rest (Python around them): where an event's time goes, statement by statement,
whatever the code calling them looks like.

`live` starts the real server under gunicorn, loads it with wrk and samples one worker with
py-spy (pip install py-spy); --gil keeps only the samples of the thread holding the GIL, i.e.
where the worker's Python time goes, not where its threads wait. It prints the top frames by
inclusive and by own time.
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from benchkit import BenchError, Server, Traffic, realistic_bodies, write_config, wrk_command

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def environ(body: bytes, path: str = "/webhook") -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "9880",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)),
        "HTTP_HOST": "127.0.0.1:9880",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }


def drive(app: WsgiApp, bodies: list[bytes]) -> float:
    """Seconds to serve every body; fails on any answer but 200."""
    envs = [environ(body) for body in bodies]
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        statuses.append(status)

    begin = time.perf_counter()
    for env in envs:
        for _chunk in app(env, start_response):
            pass
    elapsed = time.perf_counter() - begin
    refused = [s for s in statuses if not s.startswith("200")]
    if refused:
        raise BenchError(f"{len(refused)} events refused, first: {refused[0]}")
    return elapsed


def inprocess(events: int, profiler: str | None) -> None:
    from noop_server import create_app as create_noop

    from exporter.app import create_app
    from exporter.config import load_config
    from exporter.startup import build_deps, initialise_store

    workdir = Path(tempfile.mkdtemp(prefix="mcn-bench-profile-"))
    try:
        config = load_config(write_config(workdir, "profile"))
        initialise_store(config)
        exporter: WsgiApp = create_app(build_deps(config))
        noop: WsgiApp = create_noop(config.server.webhook_path, config.server.max_body_bytes)
        warm = realistic_bodies(3000, "warm")
        drive(exporter, warm)
        drive(noop, warm)
        rounds = []
        for index in range(3):
            bodies = realistic_bodies(events, f"r{index}")
            rounds.append((drive(noop, bodies), drive(exporter, bodies)))
        noop_us = min(n for n, _ in rounds) / events * 1e6
        exporter_us = min(e for _, e in rounds) / events * 1e6
        print(f"in-process, one thread, {events} realistic events (best of 3 rounds):")
        print(f"  no-op app      {noop_us:7.1f} us/event")
        print(f"  exporter app   {exporter_us:7.1f} us/event")
        print(f"  added          {exporter_us - noop_us:7.1f} us/event")
        if profiler:
            bodies = realistic_bodies(events, "profiled")
            if profiler == "pyinstrument":
                from pyinstrument import Profiler

                profile = Profiler(interval=0.0002)
                profile.start()
                drive(exporter, bodies)
                profile.stop()
                print(profile.output_text(unicode=True, color=False, show_all=False))
            else:
                import cProfile
                import pstats

                cprofile = cProfile.Profile()
                cprofile.runcall(drive, exporter, bodies)
                pstats.Stats(cprofile).sort_stats("tottime").print_stats(30)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class _Rows:
    """A finished cursor: the rows already fetched (so their time is counted), and its counts."""

    def __init__(self, cursor: Any, rows: list[Any]) -> None:
        self.rowcount = cursor.rowcount
        self.lastrowid = cursor.lastrowid
        self._rows = rows

    def __iter__(self) -> Any:
        return iter(self._rows)

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return self._rows


class TimedConnection:
    """Wraps a sqlite3.Connection: time per statement, keyed by the start of its SQL."""

    def __init__(self, connection: Any, times: dict[str, float], counts: Counter[str]) -> None:
        self._connection = connection
        self._times = times
        self._counts = counts

    def execute(self, sql: str, parameters: Any = ()) -> _Rows:
        begin = time.perf_counter()
        cursor = self._connection.execute(sql, parameters)
        rows = cursor.fetchall() if cursor.description else []
        self._note(sql, begin)
        return _Rows(cursor, rows)

    def executemany(self, sql: str, parameters: Any) -> _Rows:
        begin = time.perf_counter()
        cursor = self._connection.executemany(sql, parameters)
        self._note(sql, begin)
        return _Rows(cursor, [])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    def _note(self, sql: str, begin: float) -> None:
        key = statement_key(sql)
        self._times[key] += time.perf_counter() - begin
        self._counts[key] += 1


def statement_key(sql: str) -> str:
    words = re.sub(r"\s+", " ", sql).strip()
    words = re.sub(r"SELECT .*? FROM", "SELECT … FROM", words)
    return words if len(words) <= 72 else words[:71] + "…"


def breakdown(events: int) -> None:
    from exporter.app import create_app
    from exporter.config import load_config
    from exporter.events import WebhookParser
    from exporter.startup import build_deps, initialise_store

    workdir = Path(tempfile.mkdtemp(prefix="mcn-bench-breakdown-"))
    try:
        config = load_config(write_config(workdir, "breakdown"))
        initialise_store(config)
        deps = build_deps(config)
        app: WsgiApp = create_app(deps)
        drive(app, realistic_bodies(3000, "warm"))
        times: dict[str, float] = defaultdict(float)
        counts: Counter[str] = Counter()
        store: Any = deps.store
        store._writer = TimedConnection(store._write_connection(), times, counts)  # the writer
        parse = WebhookParser.parse

        def timed_parse(self: WebhookParser, body: bytes) -> Any:
            begin = time.perf_counter()
            try:
                return parse(self, body)
            finally:
                times["(parse and validate the JSON body)"] += time.perf_counter() - begin
                counts["(parse and validate the JSON body)"] += 1

        WebhookParser.parse = timed_parse  # type: ignore[method-assign]
        try:
            total = drive(app, realistic_bodies(events, "measured"))
        finally:
            WebhookParser.parse = parse  # type: ignore[method-assign]
        accounted = sum(times.values())
        print(f"{events} realistic events, one thread: {total / events * 1e6:.1f} us/event")
        print(f"{'us/event':>9} {'calls/event':>11}  what")
        for key, seconds in sorted(times.items(), key=lambda item: -item[1]):
            print(f"{seconds / events * 1e6:9.1f} {counts[key] / events:11.2f}  {key}")
        rest = (total - accounted) / events * 1e6
        print(f"{rest:9.1f} {'':11}  (the rest: Falcon, the tracker's Python, metrics, logging)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def live(seconds: float, workers: int, threads: int | None, gil: bool, rate: float) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise BenchError("py-spy is not installed: pip install py-spy")
    workdir = Path(tempfile.mkdtemp(prefix="mcn-bench-live-"))
    try:
        config = write_config(workdir, "live", threads)
        with Server.exporter("live", config, workers, workdir) as server:
            traffic = Traffic(seconds=seconds + 4, rate=rate)
            argv, env = wrk_command(server, traffic, f"live{int(time.time())}")
            wrk = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
            time.sleep(2)
            worker = server.pids()[1]
            raw = workdir / "py-spy.txt"
            command = [py_spy, "record", "-p", str(worker), "-d", str(round(seconds))]
            command += ["-r", "250", "-f", "raw", "-o", str(raw), "--nonblocking"]
            if gil:
                command.append("--gil")
            subprocess.run(command, check=True, capture_output=True)
            output, _ = wrk.communicate(timeout=seconds + 60)
            print(next(line for line in output.splitlines() if line.startswith("BENCH_JSON")))
        summarise(raw.read_text().splitlines())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def summarise(lines: list[str], top: int = 40) -> None:
    """Inclusive and own shares of the frames in py-spy's raw (collapsed stacks) output."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    print(f"{total} samples\n-- inclusive")
    for frame, count in inclusive.most_common(top):
        print(f"{100 * count / total:5.1f}%  {frame}")
    print("-- own")
    for frame, count in own.most_common(top // 2):
        print(f"{100 * count / total:5.1f}%  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description="profiles of the webhook request path")
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("inprocess")
    one.add_argument("--events", type=int, default=30000)
    one.add_argument("--profiler", choices=("pyinstrument", "cprofile"))
    three = commands.add_parser("breakdown")
    three.add_argument("--events", type=int, default=20000)
    two = commands.add_parser("live")
    two.add_argument("--seconds", type=float, default=10)
    two.add_argument("--workers", type=int, default=2)
    two.add_argument("--threads", type=int)
    two.add_argument("--rate", type=float, default=0.0, help="events/s; 0: saturate")
    two.add_argument("--gil", action="store_true")
    args = parser.parse_args()
    if args.command == "inprocess":
        inprocess(args.events, args.profiler)
    elif args.command == "breakdown":
        breakdown(args.events)
    else:
        live(args.seconds, args.workers, args.threads, args.gil, args.rate)


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        sys.exit(f"profile: {exc}")
