"""The exporter under gunicorn on a real port: several workers, killed workers, restarts."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exporter.rejections import COUNTED_REASONS
from tests.conftest import ACCOUNT, SECRET, Samples, ServerProcess, call_totals

pytestmark = pytest.mark.server

StartServer = Callable[..., ServerProcess]
EXTENSIONS = {str(ACCOUNT): {str(n): f"Desk {n}" for n in range(101, 113)}}
# The caller level on a short settle, so that the run's last missed calls settle soon after it.
CALLERS = {"settle": "3s", "group_window": "2s"}
SETTLE = ("--settle", "3")
# Across a restart the exporter is down for seconds: a hunt group's next leg, or a call's next
# event, held back by it meanwhile must still come within the group window and before the call
# settles, as it does with the exporter up (a longer wait makes two calls, rightly).
RESTART_CALLERS = {"settle": "8s", "group_window": "6s"}
RESTART_SETTLE = ("--settle", "8")
ACCOUNTS = [
    {
        "id": ACCOUNT,
        "secret": SECRET,
        "name": "Main office",
        "lines": {"0222202999": "Main line", "0850123456": "Sales"},
    }
]


def simulate_command(server: ServerProcess, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "exporter",
        "simulate",
        "--url",
        server.url + "/webhook",
        "--config",
        str(server.config_path),
        *args,
    ]


def run_simulate(server: ServerProcess, *args: str) -> dict[str, Any]:
    completed = subprocess.run(
        simulate_command(server, *args), capture_output=True, timeout=600, check=False
    )
    assert completed.returncode == 0, completed.stderr.decode()
    truth: dict[str, Any] = json.loads(completed.stdout)
    return truth


def start_simulate(server: ServerProcess, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        simulate_command(server, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def assert_matches_truth(samples: Samples, truth: dict[str, Any]) -> None:
    """Every sample simulate expects, exactly; deliveries up to the retries it made over.

    A delivery retried because its answer was lost (the worker died after taking it) is
    rightly counted twice by mcn_webhook_events_total, and by nothing else. Talk-time sums are
    known only where every end carried billsec, so only those are expected.
    """
    assert_no_rejections(samples)
    checked = 0
    for name, expected_samples in truth["samples"].items():
        expected = {
            tuple(sorted(s["labels"].items())): s["value"] for s in expected_samples if s["value"]
        }
        shown = {labels: value for labels, value in samples.get(name, {}).items() if value}
        if name == "mcn_webhook_events_total":
            assert shown.keys() == expected.keys()
            excess = {labels: shown[labels] - expected[labels] for labels in expected}
            assert all(extra >= 0 for extra in excess.values()), excess
            assert sum(excess.values()) <= truth["retries"]
        elif name == "mcn_call_talk_seconds_sum":
            assert expected
            assert {labels: shown.get(labels) for labels in expected} == expected
        else:
            assert shown == expected, name
        checked += sum(expected.values())
    assert checked > 0


def assert_callers_match_truth(server: ServerProcess, truth: dict[str, Any]) -> None:
    """Every caller-level sample simulate expects, exactly, once its last missed calls settled.

    The scrape settles the calls whose time has come, as it expires legs.
    """
    time.sleep(float(truth["callers"]["settle"]) + 1.5)
    samples = server.samples()
    checked = 0
    for name, expected_samples in truth["callers"]["samples"].items():
        expected = {
            tuple(sorted(s["labels"].items())): s["value"] for s in expected_samples if s["value"]
        }
        shown = {labels: value for labels, value in samples.get(name, {}).items() if value}
        assert shown == expected, name
        checked += sum(expected.values())
    assert checked > 0
    account = (("account", str(ACCOUNT)),)
    waiting = sum(samples["mcn_missed_callers_waiting"].values())
    assert waiting > 0, "some callers are never called back"
    assert samples["mcn_missed_callers_oldest_wait_seconds"][account] > 0
    assert samples["mcn_missed_callers_oldest_wait_wall_seconds"][account] > 0


def assert_no_rejections(samples: Samples) -> None:
    """Every reason's series is shown, at zero: a missing series would also read as none."""
    rejected = samples.get("mcn_webhook_rejected_total", {})
    assert rejected == {(("reason", reason),): 0.0 for reason in COUNTED_REASONS}


def events_delivered(server: ServerProcess) -> float:
    return sum(server.samples().get("mcn_webhook_events_total", {}).values())


def test_simulated_traffic_under_three_workers_matches_the_ground_truth_exactly(
    start_server: StartServer,
) -> None:
    server = start_server(workers=3, extensions=EXTENSIONS, accounts=ACCOUNTS, callers=CALLERS)

    truth = run_simulate(
        server, "--calls", "2000", "--concurrency", "32", "--pace", "0.02", *SETTLE
    )

    assert truth["events"] >= 5000
    assert truth["failed"] == 0
    assert_matches_truth(server.samples(), truth)
    assert_callers_match_truth(server, truth)


def test_a_worker_killed_midway_loses_no_call(start_server: StartServer) -> None:
    server = start_server(workers=3, extensions=EXTENSIONS, accounts=ACCOUNTS, callers=CALLERS)
    simulate = start_simulate(
        server, "--calls", "2500", "--concurrency", "32", "--pace", "0.02", "--seed", "7", *SETTLE
    )
    killed = []
    for threshold in (1500, 4000):
        deadline = time.monotonic() + 120
        while events_delivered(server) < threshold and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = server.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        server.wait_for_workers(3, excluding=killed)

    stdout, stderr = simulate.communicate(timeout=600)
    assert simulate.returncode == 0, stderr.decode()
    truth = json.loads(stdout)
    assert truth["events"] >= 5000
    assert truth["retries"] > 0  # the kills cut deliveries short, and the simulator resent them
    assert not set(killed) & set(server.worker_pids())
    assert_matches_truth(server.samples(), truth)
    assert_callers_match_truth(server, truth)


def test_a_restart_midway_loses_no_call(start_server: StartServer) -> None:
    server = start_server(
        workers=3, extensions=EXTENSIONS, accounts=ACCOUNTS, callers=RESTART_CALLERS
    )
    simulate = start_simulate(
        server,
        *("--calls", "2000", "--concurrency", "32", "--pace", "0.02", "--seed", "11"),
        *RESTART_SETTLE,
    )
    deadline = time.monotonic() + 120
    while events_delivered(server) < 2000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.stop(signal.SIGTERM) == 0
    server.start()

    stdout, stderr = simulate.communicate(timeout=600)
    assert simulate.returncode == 0, stderr.decode()
    truth = json.loads(stdout)
    assert truth["events"] >= 5000
    assert truth["retries"] > 0  # deliveries during the restart were refused, then resent
    assert_matches_truth(server.samples(), truth)
    assert_callers_match_truth(server, truth)
    # Callers still waiting are kept across a restart too.
    waiting = server.samples()["mcn_missed_callers_waiting"]
    assert server.stop(signal.SIGTERM) == 0
    server.start()
    assert server.samples()["mcn_missed_callers_waiting"] == waiting


def test_calls_open_across_a_restart_stay_active_and_their_talk_time_spans_it(
    start_server: StartServer,
) -> None:
    server = start_server(workers=2, extensions=EXTENSIONS)
    truth = run_simulate(server, "--calls", "300", "--pace", "0.01")
    leg_key = f"account={ACCOUNT},direction=inbound,extension=101,service=vpbx"
    talk_key = f"account={ACCOUNT},direction=inbound,service=vpbx"
    answers_begin = time.time()
    post_events(server, "onInCallingStart", "onInCallingAnswered")
    answers_done = time.time()
    before = call_totals(server.samples())
    assert before["mcn_active_calls"][leg_key] == 5

    assert server.stop(signal.SIGTERM) == 0
    server.start()
    time.sleep(1.0)

    after = call_totals(server.samples())
    assert after == before  # totals, histograms and the active calls all survived the restart
    assert_matches_truth_ignoring_open_calls(server.samples(), truth)
    ends_begin = time.time()
    post_events(server, "onInCallingEnd")
    ends_done = time.time()

    final = call_totals(server.samples())
    assert leg_key not in final.get("mcn_active_calls", {})
    assert final["mcn_call_talk_seconds_count"][talk_key] == (
        before["mcn_call_talk_seconds_count"][talk_key] + 5
    )
    talk_added = (
        final["mcn_call_talk_seconds_sum"][talk_key] - before["mcn_call_talk_seconds_sum"][talk_key]
    )
    assert 5 * (ends_begin - answers_done) <= talk_added <= 5 * (ends_done - answers_begin)


def post_events(server: ServerProcess, *event_types: str) -> None:
    """Five calls at extension 101, call ids open-0 to open-4: each event type in turn."""
    for n in range(5):
        for event_type in event_types:
            body = {
                "event_type": event_type,
                "abon": "101",
                "call_id": f"open-{n}",
                "secret": SECRET,
                "account_id": ACCOUNT,
            }
            status, _ = server.post(json.dumps(body).encode())
            assert status == 200


def assert_matches_truth_ignoring_open_calls(samples: Samples, truth: dict[str, Any]) -> None:
    """The truth of a finished simulation, on a server where other calls are still open."""
    open_calls = (
        "mcn_calls_started_total",
        "mcn_active_calls",
        "mcn_call_ring_seconds_count",
        "mcn_call_talk_seconds_count",
        "mcn_webhook_events_total",
    )
    trimmed = {
        **truth,
        "samples": {k: v for k, v in truth["samples"].items() if k not in open_calls},
    }
    assert_matches_truth(samples, trimmed)


def test_sigterm_drains_and_exits_cleanly_removing_the_metrics_directory(
    start_server: StartServer,
) -> None:
    server = start_server(workers=2)
    metrics_dir = metrics_dir_of(server)
    assert metrics_dir.is_dir()

    assert server.stop(signal.SIGTERM) == 0
    assert not metrics_dir.exists()


def metrics_dir_of(server: ServerProcess) -> Path:
    """The prometheus_client directory the server prepared: where a worker's .db files are."""
    fds = Path(f"/proc/{server.worker_pids()[0]}/fd")
    targets = [Path(os.readlink(fd)) for fd in fds.iterdir() if fd.is_symlink()]
    return next(t.parent for t in targets if t.name.startswith("counter_") and t.suffix == ".db")


def test_chunked_bodies_are_read_and_limited_like_any_other(start_server: StartServer) -> None:
    server = start_server(workers=1)
    good = json.dumps(
        {"event_type": "InboundCallStart", "secret": SECRET, "account_id": ACCOUNT}
    ).encode()

    def post_chunked(body: bytes) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request(
            "POST",
            "/webhook",
            body=iter([body[i : i + 1000] for i in range(0, len(body), 1000)]),
            encode_chunked=True,
            headers={"Transfer-Encoding": "chunked"},
        )
        status = connection.getresponse().status
        connection.close()
        return status

    assert post_chunked(good) == 200
    assert post_chunked(good[:-1] + b" " * 70_000 + b"}") == 413
    samples = server.samples()
    assert samples["mcn_webhook_rejected_total"][(("reason", "too_large"),)] == 1
    assert (
        samples["mcn_calls_started_total"][
            (
                ("account", str(ACCOUNT)),
                ("direction", "inbound"),
                ("extension", ""),
                ("service", "telephony"),
            )
        ]
        == 1
    )


def test_a_broken_chunked_body_or_a_cut_body_is_malformed_not_a_500(
    start_server: StartServer,
) -> None:
    server = start_server(workers=1)
    head = b"POST /webhook HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")
        answer = b"".join(iter(lambda: sock.recv(65536), b""))  # until the server closes
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b'"reason": "malformed"' in answer
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + b"Content-Length: 100\r\n\r\n" + b'{"event_type": "x"')
        sock.shutdown(socket.SHUT_WR)
        sock.recv(65536)

    samples = server.samples()
    assert samples["mcn_webhook_rejected_total"][(("reason", "malformed"),)] == 2
    assert "Traceback" not in server.log()


def test_a_broken_worker_metrics_file_does_not_break_the_scrape(
    start_server: StartServer,
) -> None:
    server = start_server(workers=2)
    server.post(json.dumps({"event_type": "x", "secret": "bad", "account_id": ACCOUNT}).encode())
    metrics_dir = metrics_dir_of(server)
    # What a worker killed while growing its file leaves behind (client_python #1199).
    (metrics_dir / "counter_999999.db").write_bytes(b"\xff\xff\x00\x00" + b"\x00" * 60)
    (metrics_dir / "counter_999998.db").write_bytes(b"")

    status, body = server.get("/metrics")
    assert status == 200
    assert b'mcn_webhook_rejected_total{reason="unauthorized"} 1.0' in body


def test_metrics_output_passes_promtool_check_metrics(start_server: StartServer) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run scripts/install-system-deps"
    server = start_server(workers=2, extensions=EXTENSIONS)
    run_simulate(server, "--calls", "200", "--pace", "0.01")
    for accept in ("text/plain", "application/openmetrics-text; version=1.0.0"):
        status, body = server.get("/metrics", headers={"Accept": accept})
        assert status == 200
        if accept.startswith("application/openmetrics"):
            continue  # promtool reads the Prometheus text format
        checked = subprocess.run(
            [promtool, "check", "metrics"], input=body, capture_output=True, check=False
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout + checked.stderr == b""
