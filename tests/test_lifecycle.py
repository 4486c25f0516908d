"""The server process's life: signals operators send, a killed master, start-up failures."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from exporter.server import ExporterApplication, gunicorn_options
from tests.conftest import ACCOUNT, SECRET, ServerProcess, base_config
from tests.test_server import (
    EXTENSIONS,
    assert_matches_truth,
    events_delivered,
    start_simulate,
)

StartServer = Callable[..., ServerProcess]
START_EVENT = json.dumps(
    {"event_type": "InboundCallStart", "secret": SECRET, "account_id": ACCOUNT}
).encode()


def wait_for_events(server: ServerProcess, count: int) -> None:
    deadline = time.monotonic() + 120
    while events_delivered(server) < count and time.monotonic() < deadline:
        time.sleep(0.05)


@contextmanager
def simulation(server: ServerProcess, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """`simulate` running in the background, stopped if the test fails before it ends."""
    simulate = start_simulate(server, *args)
    try:
        yield simulate
    finally:
        if simulate.poll() is None:
            simulate.kill()
            simulate.wait()


@pytest.mark.server
def test_worker_exits_on_term_hup_ttin_and_ttou_keep_it_serving_with_exact_totals(
    start_server: StartServer,
) -> None:
    server = start_server(workers=3, extensions=EXTENSIONS)
    assert server.process is not None
    with simulation(
        server, "--calls", "3000", "--concurrency", "32", "--pace", "0.02", "--rate", "500"
    ) as simulate:
        gone: list[int] = []

        wait_for_events(server, 1000)
        victim = server.worker_pids()[0]
        os.kill(victim, signal.SIGTERM)  # one worker asked to leave, as an operator may
        gone.append(victim)
        server.wait_for_workers(3, excluding=gone)

        wait_for_events(server, 2500)
        gone += server.worker_pids()
        server.signal_master(signal.SIGHUP)  # a reload: every worker replaced
        server.wait_for_workers(3, excluding=gone)

        wait_for_events(server, 4000)
        server.signal_master(signal.SIGTTIN)
        server.wait_for_workers(4)
        server.signal_master(signal.SIGTTOU)
        server.wait_for_workers(3)
        assert simulate.poll() is None  # all of it happened under traffic

        stdout, stderr = simulate.communicate(timeout=600)
    assert simulate.returncode == 0, stderr.decode()
    assert server.process.poll() is None, server.log()
    assert server.get("/healthz")[0] == 200
    truth = json.loads(stdout)
    assert truth["events"] >= 5000
    assert_matches_truth(server.samples(), truth)
    assert "Worker failed to boot" not in server.log()
    assert "INFO exporter.server: reloading: replacing the workers" in server.log()


class KeepAliveClients:
    """Threads that each post webhooks over one kept-alive connection, reconnecting on error."""

    def __init__(self, port: int, count: int) -> None:
        self._port = port
        self._stop = threading.Event()
        self.answered = 0
        self._threads = [threading.Thread(target=self._post) for _ in range(count)]

    def _post(self) -> None:
        connection: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            try:
                connection = connection or http.client.HTTPConnection(
                    "127.0.0.1", self._port, timeout=10
                )
                connection.request("POST", "/webhook", body=START_EVENT)
                connection.getresponse().read()
                self.answered += 1
            except (OSError, http.client.HTTPException):
                if connection is not None:
                    connection.close()
                connection = None
                time.sleep(0.05)
        if connection is not None:
            connection.close()

    @contextmanager
    def running(self) -> Iterator[KeepAliveClients]:
        for thread in self._threads:
            thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            for thread in self._threads:
                thread.join(timeout=30)


def is_gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped yet."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status


@contextmanager
def orphans_killed(pids: list[int]) -> Iterator[None]:
    """Whatever the test's outcome, the workers it orphaned do not outlive it."""
    try:
        yield
    finally:
        for pid in pids:
            if not is_gone(pid):
                with suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.server
def test_workers_die_with_a_killed_master_and_a_restart_binds_the_port_at_once(
    start_server: StartServer,
) -> None:
    server = start_server(workers=2)
    assert server.process is not None
    workers = server.worker_pids()
    with orphans_killed(workers), KeepAliveClients(server.port, count=4).running() as clients:
        deadline = time.monotonic() + 60
        while clients.answered < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert clients.answered >= 200
        server.stop(signal.SIGKILL)
        log_before_restart = len(server.log())

        server.start()
        restart_log = server.log()[log_before_restart:]
        assert "Address already in use" not in restart_log
        assert "Connection in use" not in restart_log
        assert all(is_gone(pid) for pid in workers)
        answered = clients.answered
        deadline = time.monotonic() + 60
        while clients.answered < answered + 100 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert clients.answered >= answered + 100  # the restarted server serves the same clients
    assert server.post(START_EVENT)[0] == 200


def children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@contextmanager
def stopped_at_the_end(pid: int) -> Iterator[None]:
    """A master the test does not own (a child of the old master, then of init): stopped, and
    its workers with it, whatever the test's outcome."""
    try:
        yield
    finally:
        with suppress(OSError):
            os.kill(pid, signal.SIGTERM)
        with suppress(AssertionError):
            wait_until(lambda: is_gone(pid), "the new master did not stop", timeout=40)
        if not is_gone(pid):
            with suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.server
@pytest.mark.parametrize("directory", ["private", "given"])
def test_an_upgrade_on_the_fly_with_usr2_keeps_serving_after_the_old_master_leaves(
    start_server: StartServer, tmp_path: Path, directory: str
) -> None:
    given = tmp_path / "metrics"
    env = {"PROMETHEUS_MULTIPROC_DIR": str(given)} if directory == "given" else {}
    server = start_server(workers=2, env=env)
    assert server.process is not None
    old_workers = server.worker_pids()
    assert server.post(START_EVENT)[0] == 200

    # gunicorn's upgrade: USR2 starts a new master (a child of the old) with its own workers,
    # then TERM drains the old master and its workers (WINCH works only for a daemon).
    server.signal_master(signal.SIGUSR2)
    wait_until(
        lambda: any(
            len(children_of(pid)) == 2 for pid in set(server.worker_pids()) - set(old_workers)
        ),
        "no new master with its workers",
    )
    (new_master,) = [pid for pid in server.worker_pids() if pid not in old_workers]
    with stopped_at_the_end(new_master):
        if directory == "given":  # the old workers' files are live: the new master keeps them
            assert {f"counter_{pid}.db" for pid in old_workers} <= {p.name for p in given.iterdir()}
        new_workers = children_of(new_master)
        assert server.post(START_EVENT)[0] == 200  # either set of workers answers
        assert server.stop() == 0
        wait_until(lambda: all(is_gone(pid) for pid in old_workers), "old workers still run")
        assert server.post(START_EVENT)[0] == 200  # the new master's workers answer alone

        os.kill(new_workers[0], signal.SIGTERM)  # any later worker replacement
        wait_until(
            lambda: (
                len(children_of(new_master)) == 2 and new_workers[0] not in children_of(new_master)
            ),
            "the new master did not replace its worker",
        )
        assert not is_gone(new_master), server.log()
        assert server.post(START_EVENT)[0] == 200
        assert "mcn_webhook_rejected_total" in server.samples()
    assert "Worker failed to boot" not in server.log()


@pytest.mark.server
def test_two_servers_at_once_use_no_shared_control_socket(
    start_server: StartServer, tmp_path: Path
) -> None:
    home, runtime = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    runtime.mkdir()
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}

    first = start_server(workers=1, name="first", env=env)
    second = start_server(workers=1, name="second", env=env)

    for server in (first, second):
        assert server.post(START_EVENT)[0] == 200
        assert server.get("/healthz")[0] == 200
    assert list(home.rglob("*")) == []
    assert list(runtime.rglob("*")) == []
    for server in (first, second):
        assert server.stop() == 0
        assert "control socket" not in server.log().lower()


@pytest.mark.server
def test_a_directory_named_like_a_metrics_file_is_skipped_with_a_clear_line(
    start_server: StartServer, tmp_path: Path
) -> None:
    given = tmp_path / "multiproc"
    (given / "counter_1.db").mkdir(parents=True)
    (given / "counter_2.db").write_bytes(b"left by a previous run")

    server = start_server(workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(given)})

    assert server.post(b"{}")[0] == 422
    status, body = server.get("/metrics")
    assert status == 200
    assert b'mcn_webhook_rejected_total{reason="invalid"} 1.0' in body
    assert not (given / "counter_2.db").exists()
    assert (given / "counter_1.db").is_dir()
    lines = [line for line in server.log().splitlines() if "counter_1.db" in line]
    assert len(lines) == 1, server.log()
    assert "not a metrics file" in lines[0]
    assert "left in place" in lines[0]
    assert "Traceback" not in server.log()
    assert "unreadable" not in server.log()  # the scrapes skip it without a word


def run_to_exit(server: ServerProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        server.command(),
        env=server.environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.server
def test_a_corrupt_store_stops_start_up_with_one_clear_line_and_exit_2(
    server_config: Callable[..., Path], tmp_path: Path
) -> None:
    store = tmp_path / "calls.sqlite3"
    store.write_bytes(os.urandom(8192))
    server = ServerProcess(server_config(), workers=1)

    completed = run_to_exit(server)

    assert completed.returncode == 2
    output = (completed.stdout + completed.stderr).strip()
    assert len(output.splitlines()) == 1, output
    assert str(store) in output
    assert "restore it from a backup, or move it aside" in output


@pytest.mark.server
def test_a_store_path_that_is_a_directory_stops_start_up_with_one_line(
    server_config: Callable[..., Path], tmp_path: Path
) -> None:
    (tmp_path / "calls.sqlite3").mkdir()
    server = ServerProcess(server_config(), workers=1)

    completed = run_to_exit(server)

    assert completed.returncode == 2
    output = (completed.stdout + completed.stderr).strip()
    assert len(output.splitlines()) == 1, output
    assert "calls.sqlite3" in output
    assert "store.path" in output


@pytest.mark.server
@pytest.mark.parametrize(
    ("sig", "first_line"),
    [
        pytest.param(signal.SIGTERM, "draining", id="TERM"),
        pytest.param(signal.SIGINT, "stopping now", id="INT"),
    ],
)
def test_the_master_logs_when_it_starts_stopping_and_when_it_has_stopped(
    start_server: StartServer, sig: int, first_line: str
) -> None:
    server = start_server(workers=2)
    assert server.post(START_EVENT)[0] == 200

    assert server.stop(sig) == 0

    lines = server.log().splitlines()
    stopping = [n for n, line in enumerate(lines) if f"INFO exporter.server: {first_line}" in line]
    stopped = [n for n, line in enumerate(lines) if line.endswith("INFO exporter.server: stopped")]
    assert len(stopping) == 1, lines
    assert len(stopped) == 1, lines
    assert stopping[0] < stopped[0]


def test_a_worker_leaving_closes_its_store(tmp_path: Path) -> None:
    from exporter.config import parse_config
    from exporter.startup import initialise_store
    from exporter.store import StoreUnavailable

    config = parse_config(base_config(tmp_path))
    initialise_store(config)
    application = ExporterApplication(config, "", gunicorn_options(config, None, None))
    application.load()
    deps = application._deps
    assert deps is not None
    deps.store.ping()

    application.cfg.worker_exit(None, None)

    with pytest.raises(StoreUnavailable):
        deps.store.ping()


ORPHAN = """
import os, sys, time, types
from exporter.server import _watch_parent, tie_to_master
parent = os.getpid()  # not the child's getppid(): the parent may have exited already
pid = os.fork()
if pid == 0:
    if sys.argv[1] == "hook":
        tie_to_master(None, types.SimpleNamespace(ppid=parent))
    else:
        _watch_parent(parent)
    time.sleep(120)
    os._exit(0)
print(pid, flush=True)
"""


@pytest.mark.parametrize("how", ["hook", "watch"])
def test_a_process_tied_to_its_parent_dies_with_it(how: str) -> None:
    """The post_fork hook (the kernel's parent-death signal), and the watch used without it."""
    parent = subprocess.run(
        [sys.executable, "-c", ORPHAN, how], capture_output=True, text=True, timeout=60, check=True
    )
    child = int(parent.stdout)
    with orphans_killed([child]):
        deadline = time.monotonic() + 30
        while not is_gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert is_gone(child)
