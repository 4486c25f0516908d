"""What the benchmarks share: configs, servers under gunicorn, wrk, /proc readings, statistics."""

from __future__ import annotations

import http.client
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
LUA_SCRIPT = BENCH_DIR / "webhooks.lua"
NOOP_SERVER = BENCH_DIR / "noop_server.py"
ACCOUNT = 10123
SECRET = "bench-0b7d3c1e9a4f"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A benchmark could not run as set up (server did not start, wrk missing, ...)."""


# -- configuration ---------------------------------------------------------------------------


def write_config(
    directory: Path,
    name: str,
    threads: int | None = None,
    max_extensions: int = 1000,
    store_url: str | None = None,
) -> Path:
    """A minimal exporter config with its own store file under `directory`, or the PostgreSQL
    database at `store_url`."""
    directory.mkdir(parents=True, exist_ok=True)
    server = f"server: {{threads: {threads}}}\n" if threads else ""
    store = f'url: "{store_url}"' if store_url else f"path: {directory / (name + '.sqlite3')}"
    text = (
        f"{server}"
        f"accounts:\n  - {{id: {ACCOUNT}, secret: {SECRET}}}\n"
        f"store: {{{store}}}\n"
        f"limits: {{max_extensions: {max_extensions}}}\n"
    )
    path = directory / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def exporter_command() -> list[str]:
    """The `mcn-exporter` installed beside the running Python, else `python -m exporter`."""
    script = Path(sys.executable).parent / "mcn-exporter"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "exporter"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- servers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    rss: int  # bytes, summed over the master and its workers
    pss: int  # proportional set size: shared pages split between the processes that map them
    processes: int


@dataclass
class Server:
    """A gunicorn master (the exporter or the no-op ceiling) and its workers."""

    name: str
    argv: list[str]
    port: int
    workers: int
    log_path: Path
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    # CPU seconds of what serves it besides gunicorn (a PostgreSQL store's server), so far
    backing_cpu: Callable[[], float] | None = field(default=None, repr=False)

    @classmethod
    def exporter(
        cls,
        name: str,
        config: Path,
        workers: int,
        log_dir: Path,
        pythonpath: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Server:
        port = free_port()
        argv = [*exporter_command(), "serve", "--config", str(config)]
        argv += ["--bind", f"127.0.0.1:{port}", "--workers", str(workers)]
        return cls(name, argv, port, workers, log_dir / f"{name}.log", _env(pythonpath, env))

    @classmethod
    def noop(
        cls, name: str, config: Path, workers: int, log_dir: Path, pythonpath: str | None = None
    ) -> Server:
        port = free_port()
        argv = [sys.executable, str(NOOP_SERVER), "--config", str(config)]
        argv += ["--bind", f"127.0.0.1:{port}", "--workers", str(workers)]
        return cls(name, argv, port, workers, log_dir / f"{name}.log", _env(pythonpath, None))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BenchError(f"{self.name} is not running")
        return self.process.pid

    def start(self, timeout: float = 60.0) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"{self.name} exited at start; see {self.log_path}")
            if len(self.pids()) > self.workers and _answers(self.url + "/healthz"):
                return self
            time.sleep(0.1)
        self.stop()
        raise BenchError(f"{self.name} did not start within {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pids(self) -> list[int]:
        """The master and its children (the workers)."""
        return [self.pid, *children(self.pid)]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the live master and workers."""
        total = 0
        for pid in self.pids():
            fields = _stat_fields(pid)
            if fields:
                total += int(fields[11]) + int(fields[12])
        backing = self.backing_cpu() if self.backing_cpu else 0.0
        return total / CLOCK_TICKS + backing

    def memory(self) -> Memory:
        rss = pss = count = 0
        for pid in self.pids():
            try:
                rss += _kib_field(Path(f"/proc/{pid}/status"), "VmRSS:")
                pss += _kib_field(Path(f"/proc/{pid}/smaps_rollup"), "Pss:")
                count += 1
            except (OSError, ValueError):
                continue  # a worker that exited between the listing and the read
        return Memory(rss * 1024, pss * 1024, count)


def _env(pythonpath: str | None, extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    env.update(extra or {})
    return env


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [0] is the state, [1] the parent."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return text.rsplit(")", 1)[1].split()


def _kib_field(path: Path, name: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(name):
            return int(line.split()[1])
    raise ValueError(f"{name} not in {path}")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


# -- a PostgreSQL store -----------------------------------------------------------------------


class Postgres:
    """A throwaway PostgreSQL cluster (the tests' `tests/pgcluster.py`: Debian's binaries, fsync
    on, 127.0.0.1 only) whose databases serve as exporters' stores."""

    def __init__(self, root: Path) -> None:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from tests.pgcluster import PgCluster

        self.cluster = PgCluster(root)

    def database(self) -> str:
        """A new empty database: its URL."""
        url: str = self.cluster.create_database()
        return url

    def cpu_seconds(self) -> float:
        """The server's CPU so far: the postmaster, its live processes, the backends it reaped."""
        postmaster = int((self.cluster.data / "postmaster.pid").read_text().split()[0])
        ticks = 0
        for pid in [postmaster, *children(postmaster)]:
            fields = _stat_fields(pid)
            if fields:
                ticks += int(fields[11]) + int(fields[12])
                if pid == postmaster:
                    ticks += int(fields[13]) + int(fields[14])
        return ticks / CLOCK_TICKS


@contextmanager
def throwaway_postgres() -> Iterator[Postgres]:
    """Started in a directory of its own (owned by `postgres` when run as root), then removed."""
    root = Path(tempfile.mkdtemp(prefix="mcn-bench-pg-"))
    postgres = Postgres(root)
    try:
        postgres.cluster.init()
        postgres.cluster.start()
        yield postgres
    finally:
        try:
            postgres.cluster.stop("immediate")
        except RuntimeError as exc:  # it never started: the error that said so is on its way
            print(f"stopping PostgreSQL: {exc}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)


# -- load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]
    cpu_seconds: float = 0.0  # the server's CPU time over the run

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_seconds / self.requests * 1e6 if self.requests else 0.0


@dataclass(frozen=True)
class Traffic:
    """How wrk loads a server."""

    seconds: float
    connections: int = 16
    threads: int = 2
    rate: float = 0.0  # events per second in total; 0: as fast as the server answers
    mode: str = "calls"
    extensions: int = 60
    limit: int = 0  # "starts" mode: responses per wrk thread before it stops
    timeout_s: int = 5
    pauses: str = "drawn"  # at a fixed rate: "drawn" (exponential, of the mean delay) or "fixed"

    @property
    def delay_ms(self) -> float:
        return self.connections * 1000.0 / self.rate if self.rate else 0.0


def wrk_path() -> str:
    for directory in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin"]:
        candidate = Path(directory) / "wrk"
        if candidate.exists():
            return str(candidate)
    raise BenchError("wrk is not installed (Debian: apt-get install wrk; or `make system-deps`)")


def wrk_command(server: Server, traffic: Traffic, run_id: str) -> tuple[list[str], dict[str, str]]:
    argv = [
        wrk_path(),
        f"--threads={traffic.threads}",
        f"--connections={traffic.connections}",
        f"--duration={max(1, round(traffic.seconds))}s",
        f"--timeout={traffic.timeout_s}s",
        f"--script={LUA_SCRIPT}",
        server.url + "/webhook",
    ]
    env = dict(os.environ)
    env.update(
        MCN_BENCH_MODE=traffic.mode,
        MCN_BENCH_RUN=run_id,
        MCN_BENCH_ACCOUNT=str(ACCOUNT),
        MCN_BENCH_SECRET=SECRET,
        MCN_BENCH_EXTENSIONS=str(traffic.extensions),
        MCN_BENCH_DELAY_MS=f"{traffic.delay_ms:.3f}",
        MCN_BENCH_PAUSES=traffic.pauses,
        MCN_BENCH_LIMIT=str(traffic.limit),
    )
    return argv, env


def parse_wrk(output: str, cpu_seconds: float = 0.0) -> LoadResult:
    for line in output.splitlines():
        if line.startswith("BENCH_JSON "):
            data = json.loads(line.removeprefix("BENCH_JSON "))
            return LoadResult(
                requests=data["requests"],
                seconds=data["duration_us"] / 1e6,
                p50_ms=data["p50_us"] / 1000,
                p90_ms=data["p90_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                max_ms=data["max_us"] / 1000,
                errors={
                    name: data[name]
                    for name in ("connect", "read", "write", "status", "timeout")
                    if data[name]
                },
                cpu_seconds=cpu_seconds,
            )
    raise BenchError(f"wrk printed no result:\n{output}")


_RUNS = iter(range(1, 1_000_000))


def run_id(prefix: str) -> str:
    return f"{prefix}{os.getpid()}x{int(time.time())}x{next(_RUNS)}"


def load(server: Server, traffic: Traffic, prefix: str = "b") -> LoadResult:
    """Runs wrk against the server and returns its figures and the server's CPU time."""
    argv, env = wrk_command(server, traffic, run_id(prefix))
    cpu_before = server.cpu_seconds()
    completed = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=traffic.seconds + 120, check=False
    )
    cpu = server.cpu_seconds() - cpu_before
    if completed.returncode != 0:
        raise BenchError(f"wrk failed ({completed.returncode}): {completed.stderr}")
    return parse_wrk(completed.stdout, cpu)


def open_legs(server: Server) -> int:
    """Open call legs now: the sum of mcn_active_calls on /metrics."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return round(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("mcn_active_calls{")
        )
    )


def open_starts(server: Server, count: int, connections: int, threads: int) -> int:
    """Opens `count` more legs with wrk in "starts" mode; returns the open legs after."""
    target = open_legs(server) + count
    traffic = Traffic(
        seconds=3600,
        connections=connections,
        threads=threads,
        mode="starts",
        limit=-(-count // threads),
    )
    argv, env = wrk_command(server, traffic, run_id("m"))
    wrk = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # wrk sleeps its whole --duration even when every thread has stopped: interrupt it.
    last, still = -1, 0
    try:
        while wrk.poll() is None:
            time.sleep(0.5)
            now = open_legs(server)
            still = still + 1 if now == last else 0
            last = now
            if now >= target or still >= 6:
                break
    finally:
        if wrk.poll() is None:
            wrk.send_signal(signal.SIGINT)
        wrk.communicate(timeout=60)
    time.sleep(1.0)
    return open_legs(server)


def post_bodies(url: str, bodies: Sequence[bytes], threads: int = 8) -> int:
    """POSTs each body once over keep-alive connections; returns how many were not 200."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    path = "/" + url.split("//", 1)[1].split("/", 1)[1]
    failures = [0] * threads

    def send(index: int) -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            for body in bodies[index::threads]:
                connection.request("POST", path, body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    failures[index] += 1
        finally:
            connection.close()

    workers = [threading.Thread(target=send, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(failures)


def webhook(
    event_type: str,
    abon: str | int | None,
    call_id: str | None,
    billsec: int | None = None,
    did: str = "+421222202999",
) -> bytes:
    document: dict[str, object] = {"event_type": event_type}
    if abon is not None:
        document["abon"] = abon
    document.update(did=did, did_mcn="+421233005500")
    if call_id is not None:
        document["call_id"] = call_id
    if billsec is not None:
        document["billsec"] = billsec
    document.update(secret=SECRET, account_id=ACCOUNT)
    return json.dumps(document).encode()


def realistic_bodies(events: int, run: str, extensions: int = 60, slots: int = 256) -> list[bytes]:
    """The first `events` bodies that one wrk thread of webhooks.lua sends in "calls" mode."""
    bodies: list[bytes] = []
    calls: list[list[bytes]] = [[] for _ in range(slots)]
    made = 0
    slot = 0
    while len(bodies) < events:
        if not calls[slot]:
            made += 1
            calls[slot] = _call(made, run, extensions)
        bodies.append(calls[slot].pop(0))
        slot = (slot + 1) % slots
    return bodies


def _call(n: int, run: str, extensions: int, tid: int = 1) -> list[bytes]:
    kind = n % 20
    did = f"+4219{tid % 100:02d}{n % 10_000_000:07d}"
    call_id = f"{run}-{tid}-{n}" if n % 4 != 1 or 12 <= kind < 14 else None
    a = 100 + (n * 7 + tid) % extensions
    b = 100 + (n * 7 + tid + 1) % extensions
    talk = 5 + (n * 37) % 600

    def event(name: str, abon: int | None, billsec: int | None = None) -> bytes:
        shown: str | int | None = abon if abon is None or abon % 3 == 0 else str(abon)
        return webhook(name, shown, call_id, billsec, did)

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
    return [event("InboundCallStart", None), event("InboundCallEnd", None)]


# -- statistics and formatting ---------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    items = list(values)
    return statistics.median(items) if items else 0.0


def mib(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def ratio(value: float, base: float) -> float:
    return value / base if base else float("inf")


def verdict(holds: bool) -> str:
    return "**yes**" if holds else "**no**"


def exporter_revision() -> str:
    """Where the exporter under test comes from: its source tree and git revision."""
    spec = importlib.util.find_spec("exporter")
    if spec is None or spec.origin is None:
        return "not importable"
    tree = Path(spec.origin).resolve().parent.parent
    try:
        described = subprocess.run(
            ["git", "-C", str(tree), "describe", "--always", "--dirty", "--exclude", "*"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        ).stdout.strip()
    except OSError:
        described = ""
    return f"{tree} at {described or 'unknown revision'}"


def machine() -> dict[str, str]:
    """nproc, CPU model, memory, kernel and Python: what a reader needs to weigh the numbers."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory_kib = _kib_field(Path("/proc/meminfo"), "MemTotal:")
    except (OSError, ValueError):
        memory_kib = 0
    try:
        wrk_version = subprocess.run(
            [wrk_path(), "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0]
    except (BenchError, IndexError, OSError):
        wrk_version = "not found"
    try:
        load_average = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load_average = "?"
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("falcon", "gunicorn", "prometheus-client")
    )
    return {
        "cpus": str(os.cpu_count()),
        "cpu model": model,
        "memory": f"{memory_kib / 2**20:.1f} GiB",
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "packages": f"{versions}, SQLite {sqlite3.sqlite_version}",
        "exporter": exporter_revision(),
        "wrk": wrk_version.split(" Copyright")[0],
        "load average at start": load_average,
    }
