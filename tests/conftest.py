"""Shared fixtures: a controllable clock, configs, the Falcon test client and a real server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import falcon.testing
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import Deps, create_app
from exporter.config import Config, parse_config
from exporter.startup import build_deps, initialise_store

WEBHOOKS = Path(__file__).parent / "webhooks"
ACCOUNT = 10123
SECRET = "SecretToken"
Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


class FakeClock:
    """A clock the test moves by hand; starts at a fixed, realistic time."""

    def __init__(self, now: float = 1_790_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def base_config(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "accounts": [{"id": ACCOUNT, "secret": SECRET, "name": "Main office"}],
        "store": {"path": str(tmp_path / "calls.sqlite3")},
    }
    document.update(sections)
    return document


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return parse_config(base_config(tmp_path))


def build_test_deps(config: Config, clock: FakeClock) -> Deps:
    initialise_store(config)
    return build_deps(config, clock=clock)


@pytest.fixture
def deps(config: Config, clock: FakeClock) -> Iterator[Deps]:
    built = build_test_deps(config, clock)
    yield built
    built.store.close()


@dataclass
class Exporter:
    """The app behind Falcon's test client, with helpers that speak webhook."""

    client: falcon.testing.TestClient
    clock: FakeClock
    deps: Deps

    def post(self, body: dict[str, Any] | bytes | str, **kwargs: Any) -> falcon.testing.Result:
        if isinstance(body, dict):
            body = json.dumps(body)
        return self.client.simulate_post("/webhook", body=body, **kwargs)

    def event(self, event_type: str, **fields: Any) -> falcon.testing.Result:
        body = {"event_type": event_type, "secret": SECRET, "account_id": ACCOUNT, **fields}
        result = self.post(body)
        assert result.status_code == 200, result.text
        return result

    def samples(self) -> Samples:
        result = self.client.simulate_get("/metrics")
        assert result.status_code == 200, result.text
        return parse_samples(result.text)


@pytest.fixture
def exporter(deps: Deps, clock: FakeClock) -> Exporter:
    return Exporter(falcon.testing.TestClient(create_app(deps)), clock, deps)


@pytest.fixture
def make_exporter(tmp_path: Path, clock: FakeClock) -> Iterator[Callable[..., Exporter]]:
    """An exporter on a config of your own: keyword arguments replace whole sections."""
    built: list[Deps] = []

    def make(**sections: Any) -> Exporter:
        config = parse_config(base_config(tmp_path, **sections))
        deps = build_test_deps(config, clock)
        built.append(deps)
        return Exporter(falcon.testing.TestClient(create_app(deps)), clock, deps)

    yield make
    for deps in built:
        deps.store.close()


def parse_samples(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


CALL_METRICS = (
    "mcn_active_calls",
    "mcn_calls_started_total",
    "mcn_calls_ended_total",
    "mcn_call_ring_seconds_count",
    "mcn_call_ring_seconds_sum",
    "mcn_call_talk_seconds_count",
    "mcn_call_talk_seconds_sum",
    "mcn_call_events_unmatched_total",
    "mcn_extension_overflow_total",
)


def call_totals(samples: Samples) -> dict[str, dict[str, float]]:
    """The non-zero call samples, as {metric: {"k=v,k=v": value}}: compact to assert on."""
    totals: dict[str, dict[str, float]] = {}
    for name in CALL_METRICS:
        for labels, value in samples.get(name, {}).items():
            if value:
                totals.setdefault(name, {})[",".join(f"{k}={v}" for k, v in labels)] = value
    return totals


def webhook(name: str) -> bytes:
    return next(WEBHOOKS.glob(f"*/{name}.json")).read_bytes()


def all_webhooks() -> list[Path]:
    """The provider's samples (copied from its documentation and from real traffic)."""
    paths = sorted(WEBHOOKS.glob("*/*.json"))
    assert len(paths) == 13, f"expected the 13 sample webhooks in {WEBHOOKS}, found {len(paths)}"
    return paths


# -- a real server ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


EPOLL_WAIT = ("do_epoll_wait", "ep_poll")  # /proc/<pid>/wchan of a thread in epoll_wait


@dataclass
class ServerProcess:
    """`mcn-exporter serve` in a subprocess, on a free port of the loopback."""

    config_path: Path
    workers: int = 3
    port: int = field(default_factory=free_port)
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # set over the test's environment
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "exporter",
            "serve",
            "--config",
            str(self.config_path),
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            str(self.workers),
        ]

    def environment(self) -> dict[str, str]:
        """The test's environment, without a multiprocess directory unless `env` names one.

        Temporary files go to the test's directory: the multiprocess directory the master makes
        is left behind when a test ends with SIGKILL, which gives the master no time to remove it.
        """
        inherited = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        return {**inherited, "TMPDIR": str(self.config_path.parent), **self.env}

    def start(self, timeout: float = 30.0) -> None:
        self.log_path = self.config_path.with_suffix(f".{self.port}.log")
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            env=self.environment(),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if self.get("/healthz")[0] == 200 and self.every_worker_waits_for_connections():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not come up:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def signal_master(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait_for_workers(self, count: int, excluding: Iterable[int] = ()) -> list[int]:
        """Waits until `count` workers run, none of them in `excluding`; returns their pids."""
        excluded = set(excluding)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pids = self.worker_pids()
            if len(pids) == count and not set(pids) & excluded:
                return pids
            time.sleep(0.1)
        raise AssertionError(f"gunicorn did not respawn workers: {self.worker_pids()}")

    def every_worker_waits_for_connections(self) -> bool:
        """Booted: each worker's main thread blocks in its selector loop (not still loading the
        app, which a test's traffic would otherwise leave to the workers already up)."""
        pids = self.worker_pids()
        if len(pids) != self.workers:
            return False
        try:
            return all(Path(f"/proc/{pid}/wchan").read_text() in EPOLL_WAIT for pid in pids)
        except OSError:
            return False

    def worker_pids(self) -> list[int]:
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            return [int(pid) for pid in children.read_text().split()]
        except OSError:
            return []

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def post(self, body: bytes, path: str = "/webhook") -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, data=body, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def samples(self) -> Samples:
        status, body = self.get("/metrics")
        assert status == 200, body
        return parse_samples(body.decode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


@pytest.fixture
def server_config(tmp_path: Path) -> Callable[..., Path]:
    """Writes a config file for a real server; keyword arguments replace whole sections."""

    def write(name: str = "config", **sections: Any) -> Path:
        """`name` names the config file and, unless it is "config", the store file too.

        Callers' calls settle after 3 s, not 30: simulate waits that long before its call-backs.
        """
        sections.setdefault("callers", {"settle": "3s", "group_window": "2s"})
        if name != "config":
            sections.setdefault("store", {"path": str(tmp_path / f"{name}.sqlite3")})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(base_config(tmp_path, **sections)))
        return path

    return write


@pytest.fixture
def start_server(server_config: Callable[..., Path]) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(
        workers: int = 3, name: str = "config", env: dict[str, str] | None = None, **sections: Any
    ) -> ServerProcess:
        server = ServerProcess(server_config(name, **sections), workers=workers, env=env or {})
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process and server.process.poll() is None:
            server.stop(signal.SIGKILL)
