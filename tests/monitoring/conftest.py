"""Helpers for the monitoring tests: the shipped files, promtool, and real Prometheus and
Alertmanager processes on free loopback ports with their own temporary data directories."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "prometheus"
RULES_DIR = PROMETHEUS_DIR / "rules"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
PROMTOOL_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.test.yml"))
DASHBOARDS_DIR = REPO / "grafana" / "dashboards"
DASHBOARD_FILES = sorted(DASHBOARDS_DIR.glob("*.json"))
PROVISIONING_DIR = REPO / "grafana" / "provisioning"
RUNBOOKS = REPO / "docs" / "runbooks.md"

# Grafana's built-in variables, replaced as Grafana would for a short dashboard range.
GRAFANA_BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
}


def require_tool(name: str) -> str:
    """The path of a program the test needs: skipped where it is missing, failed on CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (scripts/install-system-deps installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(command: list[str], timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def load_yaml(path: Path) -> Any:
    with path.open() as handle:
        return yaml.safe_load(handle)


def shipped_rules() -> list[dict[str, Any]]:
    """Every rule of the shipped rule files, each with the file it came from."""
    rules = []
    for path in RULE_FILES:
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                rules.append({**rule, "_file": path.name, "_group": group["name"]})
    return rules


def shipped_alerts() -> list[dict[str, Any]]:
    return [rule for rule in shipped_rules() if "alert" in rule]


# -- Grafana dashboards ------------------------------------------------------------------------


def load_dashboard(path: Path) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included; rows themselves are not panels."""
    for panel in panels:
        if panel.get("type") == "row":
            yield from iter_panels(panel.get("panels", []))
        else:
            yield panel


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in dashboard.get("templating", {}).get("list", [])}


def variable_query(var: dict[str, Any]) -> str:
    """A query variable's PromQL: a string, or {"query": ...} as newer Grafana saves it."""
    query = var["query"]
    return str(query["query"] if isinstance(query, dict) else query)


VARIABLE_REFERENCE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def referenced_variables(text: str) -> set[str]:
    return {next(g for g in match.groups() if g) for match in VARIABLE_REFERENCE.finditer(text)}


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace $var, ${var} and [[var]] as Grafana does (values are already regex-formatted)."""

    def replace(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise KeyError(f"no value for ${name} in {text!r}")
        return values[name]

    return VARIABLE_REFERENCE.sub(replace, text)


# -- processes ---------------------------------------------------------------------------------


@dataclass
class Program:
    """A long-running program of the test, its output in a log file, killed at teardown."""

    name: str
    command: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""


def http_json(url: str, params: dict[str, str] | None = None, timeout: float = 30.0) -> Any:
    """GET url?params and decode the JSON answer (also of an error status)."""
    if params:
        url += "?" + urllib.parse.urlencode(params)
    request = urllib.request.Request(url)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        # Prometheus answers bad queries with 400/422 and a JSON error body.
        return json.loads(error.read() or b"{}")


def wait_until(what: str, check: Any, timeout: float, interval: float = 0.5) -> Any:
    """Poll check() until it returns something truthy; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (OSError, ValueError, KeyError) as error:
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} ({last_error})")


@dataclass
class Prometheus:
    url: str
    program: Program

    def api(self, path: str, **params: str) -> Any:
        return http_json(f"{self.url}/api/v1/{path}", params if params else None)

    def query(self, expr: str, time_: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr}
        if time_ is not None:
            params["time"] = f"{time_:.3f}"
        answer = self.api("query", **params)
        assert answer.get("status") == "success", f"{expr}: {answer}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result


@contextmanager
def start_prometheus(config: dict[str, Any], workdir: Path) -> Iterator[Prometheus]:
    """Prometheus on `config`; its TSDB in workdir/data (backfill blocks there before)."""
    binary = require_tool("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    program = Program(
        "prometheus",
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        workdir / "prometheus.log",
    )
    program.start()
    prometheus = Prometheus(f"http://127.0.0.1:{port}", program)
    try:
        wait_until(
            "Prometheus to be ready",
            lambda: program.running() and _status(f"{prometheus.url}/-/ready") == 200,
            timeout=60,
        )
        yield prometheus
    finally:
        program.stop()


@dataclass
class Alertmanager:
    url: str
    program: Program


@contextmanager
def start_alertmanager(config: dict[str, Any], workdir: Path) -> Iterator[Alertmanager]:
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary is None:
        binary = require_tool("prometheus-alertmanager")
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "alertmanager.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    program = Program(
        "alertmanager",
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # a single instance: no gossip port
            "--log.level=warn",
        ],
        workdir / "alertmanager.log",
    )
    program.start()
    alertmanager = Alertmanager(f"http://127.0.0.1:{port}", program)
    try:
        wait_until(
            "Alertmanager to be ready",
            lambda: program.running() and _status(f"{alertmanager.url}/-/ready") == 200,
            timeout=60,
        )
        yield alertmanager
    finally:
        program.stop()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code


@dataclass
class Notification:
    """One POST of Alertmanager's webhook receiver."""

    path: str
    payload: dict[str, Any]
    received_at: float


@dataclass
class AlertReceiver:
    """An HTTP endpoint that Alertmanager's webhook_configs post to; keeps every notification."""

    server: ThreadingHTTPServer
    notifications: list[Notification] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def alerts(self) -> list[tuple[str, dict[str, Any]]]:
        """(receiver path, alert) for every alert of every notification so far."""
        with self.lock:
            return [(n.path, alert) for n in self.notifications for alert in n.payload["alerts"]]


@contextmanager
def start_alert_receiver() -> Iterator[AlertReceiver]:
    receiver: AlertReceiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            payload = json.loads(self.rfile.read(length))
            with receiver.lock:
                receiver.notifications.append(Notification(self.path, payload, time.time()))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = AlertReceiver(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
