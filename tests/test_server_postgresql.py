"""The exporter under gunicorn on a PostgreSQL call store: the ground truth with a worker killed
and a restart, two replicas sharing the database with one of them killed, the database stopped
mid-traffic or down at start, and psycopg missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from exporter.rejections import COUNTED_REASONS
from exporter.simulate import truth_differences
from exporter.store.deferred import RETRY_INTERVAL
from tests.conftest import ACCOUNT, SECRET, Samples, ServerProcess, base_config, call_totals
from tests.test_server import (
    ACCOUNTS,
    CALLERS,
    EXTENSIONS,
    RESTART_CALLERS,
    RESTART_SETTLE,
    SETTLE,
    assert_callers_match_truth,
    assert_matches_truth,
    events_delivered,
    simulate_command,
    start_simulate,
)

if TYPE_CHECKING:
    from tests.pgcluster import PgCluster

pytest_plugins = ["tests.pgcluster"]
pytestmark = [pytest.mark.server, pytest.mark.postgresql]

StartServer = Callable[..., ServerProcess]
OUTAGE = 10.0  # seconds PostgreSQL is stopped for
SERVER_TIMEOUT = 10.0  # server.timeout of the outage test: every request answers well within


def start_replica(
    start_server: StartServer, url: str, name: str = "config", workers: int = 3, **sections: Any
) -> ServerProcess:
    sections.setdefault("accounts", ACCOUNTS)  # with company lines: the caller level too
    sections.setdefault("callers", CALLERS)
    return start_server(
        workers=workers, name=name, extensions=EXTENSIONS, store={"url": url}, **sections
    )


def wait_for_events(server: ServerProcess, threshold: float) -> None:
    deadline = time.monotonic() + 120
    while events_delivered(server) < threshold and time.monotonic() < deadline:
        time.sleep(0.05)


def finish(simulate: subprocess.Popen[bytes]) -> dict[str, Any]:
    stdout, stderr = simulate.communicate(timeout=600)
    assert simulate.returncode == 0, stderr.decode()
    truth: dict[str, Any] = json.loads(stdout)
    return truth


def kill_replica(server: ServerProcess) -> None:
    """SIGKILL to every worker and the master at once, as when its host dies.

    The workers first: until the master is gone they stay its children, so none has been
    reaped and its pid reused when it is signalled."""
    assert server.process is not None
    for pid in [*server.worker_pids(), server.process.pid]:
        os.kill(pid, signal.SIGKILL)
    server.process.wait(timeout=30)


def test_the_ground_truth_holds_with_a_worker_killed_and_a_restart(
    start_server: StartServer, postgres_url: str
) -> None:
    server = start_replica(start_server, postgres_url, callers=RESTART_CALLERS)
    simulate = start_simulate(
        server,
        *("--calls", "2500", "--concurrency", "32", "--pace", "0.02", "--seed", "7"),
        *RESTART_SETTLE,
    )
    wait_for_events(server, 1500)
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    server.wait_for_workers(3, excluding=[victim])
    wait_for_events(server, 3500)
    assert server.stop(signal.SIGTERM) == 0
    server.start()
    assert simulate.poll() is None  # the kill and the restart came mid-traffic

    truth = finish(simulate)
    assert truth["events"] >= 5000
    assert truth["failed"] == 0
    assert truth["retries"] > 0  # deliveries cut by the kill and the restart were resent
    assert_matches_truth(server.samples(), truth)
    assert_callers_match_truth(server, truth)


def test_two_replicas_on_one_database_one_killed_midway_give_the_exact_totals(
    start_server: StartServer, postgres_url: str
) -> None:
    first = start_replica(start_server, postgres_url, name="first", workers=2)
    second = start_replica(start_server, postgres_url, name="second", workers=2)
    simulate = subprocess.Popen(
        simulate_command(
            first,
            *("--url", second.url + "/webhook", "--copies", "0.1", "--calls", "2500"),
            *("--concurrency", "32", "--pace", "0.02", "--seed", "5", *SETTLE),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for_events(first, 2500)
    kill_replica(second)
    assert simulate.poll() is None

    truth = finish(simulate)
    assert truth["events"] >= 5000
    assert truth["copies"] > 0  # events sent to both replicas at once
    assert truth["failed"] == 0
    assert truth["retries"] > 0  # events drawn for the dead replica went to the survivor
    assert_matches_truth(first.samples(), truth)
    assert_callers_match_truth(first, truth)
    second.start()  # a replica coming back shows the same totals at once
    assert call_totals(second.samples()) == call_totals(first.samples())


# With an abon, an event of an unknown type counts as vpbx's.
PROBE_EVENT = json.dumps(
    {"event_type": "onOutageProbe", "abon": "101", "secret": SECRET, "account_id": ACCOUNT}
).encode()
UNKNOWN_EVENTS = (("event_type", "unknown"), ("service", "vpbx"))


@dataclass
class OutageProbe:
    """Asks /readyz, /metrics and the webhook (an event of an unknown type, which only counts
    as a delivery) in turn until stopped: what each answered, and how long it took."""

    server: ServerProcess
    answers: list[tuple[str, int, str | None, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.is_set():
            for path in ("/readyz", "/metrics", "/webhook"):
                began = time.monotonic()
                status, retry_after = self.ask(path)
                self.answers.append((path, status, retry_after, time.monotonic() - began))
            time.sleep(0.2)

    def ask(self, path: str) -> tuple[int, str | None]:
        body = PROBE_EVENT if path == "/webhook" else None
        request = urllib.request.Request(self.server.url + path, data=body)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.headers.get("Retry-After")
        except urllib.error.HTTPError as error:
            return error.code, error.headers.get("Retry-After")

    def events_taken(self) -> int:
        return sum(1 for path, status, *_ in self.answers if path == "/webhook" and status == 200)

    @contextmanager
    def running(self) -> Iterator[OutageProbe]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=120)


@contextmanager
def stopped(cluster: PgCluster) -> Iterator[None]:
    """PostgreSQL stopped (fast: sessions cut, as at a restart), and started again after."""
    cluster.stop("fast")
    try:
        yield
    finally:
        cluster.start()


def wait_until_ready(server: ServerProcess, timeout: float = 60) -> float:
    """Seconds until /readyz first answered 200, then answered it in a row for longer than a
    worker refuses at once after a failed attempt to open its store: every worker is ready."""
    began = time.monotonic()
    ready_since: float | None = None
    while ready_since is None or time.monotonic() - ready_since < 3 * RETRY_INTERVAL:
        assert time.monotonic() - began < timeout, server.log()[-3000:]
        if server.get("/readyz")[0] != 200:
            ready_since = None
        elif ready_since is None:
            ready_since = time.monotonic()
        time.sleep(0.05)
    return ready_since - began


def test_postgresql_stopped_mid_traffic_gives_503s_then_recovers_losing_nothing(
    start_server: StartServer, postgres_cluster: PgCluster, postgres_url: str
) -> None:
    server = start_replica(start_server, postgres_url, server={"timeout": f"{SERVER_TIMEOUT:g}s"})
    simulate = start_simulate(
        server, "--calls", "1500", "--concurrency", "16", "--pace", "0.05", "--rate", "150"
    )
    wait_for_events(server, 800)
    probe = OutageProbe(server)
    with probe.running():
        with stopped(postgres_cluster):
            time.sleep(OUTAGE)
        during = list(probe.answers)
        wait_until_ready(server)
    assert simulate.poll() is None  # the outage came mid-traffic

    truth = finish(simulate)
    assert truth["failed"] == 0
    assert truth["retries"] > 0  # webhooks answered 503 during the outage were resent
    refused = [a for a in during if a[1] == 503]
    # A scrape may also wait for its turn until the database is back, and then succeed: it is
    # bound by server.timeout like every request (below), not bound to be refused.
    assert (
        {"/readyz", "/webhook"}
        <= {path for path, *_ in refused}
        <= {
            "/readyz",
            "/metrics",
            "/webhook",
        }
    )
    assert all(retry_after == "5" for _, _, retry_after, _ in refused)
    assert all(status in (200, 503) for _, status, _, _ in probe.answers)
    assert max(seconds for *_, seconds in probe.answers) < SERVER_TIMEOUT
    assert server.get("/readyz")[0] == 200
    samples = server.samples()
    assert_only_store_unavailable_refusals(samples)
    samples["mcn_webhook_events_total"][UNKNOWN_EVENTS] -= probe.events_taken()
    # The legs only: events refused during the outage reach the exporter seconds later and out
    # of order (a leg opened by its end shows no ring, so no wait; callers group by when their
    # legs ring). The tests above compare the caller level, where deliveries are prompt.
    legs_truth = {key: value for key, value in truth.items() if key != "callers"}
    assert truth_differences({}, without_refusals(samples), legs_truth) == []


def assert_only_store_unavailable_refusals(samples: Samples) -> None:
    rejected = {labels[0][1]: value for labels, value in samples[REJECTED].items()}
    assert rejected.keys() == set(COUNTED_REASONS)
    assert rejected.pop("store_unavailable") > 0  # the webhooks refused during the outage
    assert set(rejected.values()) == {0.0}


REJECTED = "mcn_webhook_rejected_total"


def without_refusals(samples: Samples) -> Samples:
    return {name: values for name, values in samples.items() if name != REJECTED}


def test_a_replica_started_while_postgresql_is_down_comes_up_not_ready_and_recovers(
    start_server: StartServer, postgres_cluster: PgCluster, postgres_url: str
) -> None:
    url = postgres_url.replace("postgres@", "postgres:hunter2@")  # trust: any password will do
    with stopped(postgres_cluster):
        server = start_replica(start_server, url, workers=2)
        start = {"event_type": "onInCallingStart", "abon": "101", "call_id": "during-outage"}
        status, body = server.post(
            json.dumps({**start, "secret": SECRET, "account_id": ACCOUNT}).encode()
        )
        assert (status, json.loads(body)["reason"]) == (503, "store_unavailable")
        assert server.get("/readyz")[0] == 503
    waited = wait_until_ready(server)

    samples = server.samples()
    desk = (("account", str(ACCOUNT)), ("direction", "inbound"), ("extension", "101"))
    assert samples["mcn_calls_started_total"][(*desk, ("service", "vpbx"))] == 0
    log = server.log()
    assert "hunter2" not in log
    assert f"call store postgresql://postgres:****@127.0.0.1:{postgres_cluster.port}/" in log
    assert [line for line in log.splitlines() if "cannot be reached" in line], log
    assert waited < 60


def serve_until_exit(config: dict[str, Any], tmp_path: Path, **env: str) -> tuple[int, list[str]]:
    """`serve` expected to stop at start: its exit status and the lines it wrote."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    environment = {**os.environ, **env}
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
    completed = subprocess.run(
        [sys.executable, "-m", "exporter", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        check=False,
    )
    return completed.returncode, completed.stderr.strip().splitlines()


def test_a_database_of_a_newer_schema_stops_the_start_untouched(
    tmp_path: Path, postgres_url: str
) -> None:
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)")
        connection.execute("INSERT INTO meta VALUES ('schema_version', '99')")

    status, lines = serve_until_exit(base_config(tmp_path, store={"url": postgres_url}), tmp_path)

    assert status == 2
    assert len(lines) == 1, lines
    assert "schema version 99" in lines[0]
    with psycopg.connect(postgres_url) as connection:
        tables = connection.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone()
    assert tables == (1,)


def test_a_postgresql_store_without_psycopg_stops_at_start_naming_the_extra(
    tmp_path: Path,
) -> None:
    shadow = tmp_path / "shadow" / "psycopg"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'psycopg'\")\n")
    config = base_config(tmp_path, store={"url": "postgresql://mcn@127.0.0.1:1/mcn"})

    status, lines = serve_until_exit(config, tmp_path, PYTHONPATH=str(shadow.parent))

    assert status == 2
    assert len(lines) == 1, lines
    assert "pip install 'mcn-exporter[postgresql]'" in lines[0]
