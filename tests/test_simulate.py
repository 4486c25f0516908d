"""The traffic simulator: deterministic plans, a ground truth that matches them, retries,
failing fast when pointed wrong, and --verify against a real exporter."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.config import Config, parse_config
from exporter.events import WebhookParser
from exporter.simulate import (
    Labels,
    Options,
    Samples,
    Sender,
    SimulationError,
    TrafficPlan,
    truth_differences,
)
from tests.conftest import ACCOUNT, SECRET, FakeClock, ServerProcess, base_config, free_port

StartServer = Callable[..., ServerProcess]


@pytest.fixture
def sim_config(tmp_path: Path) -> Config:
    return parse_config(base_config(tmp_path, extensions={"10123": {"201": "A", "202": "B"}}))


def plan(config: Config, **options: object) -> TrafficPlan:
    traffic = TrafficPlan(config, Options(url="http://unused", **options))  # type: ignore[arg-type]
    traffic.build()
    return traffic


def test_same_seed_same_traffic(sim_config: Config) -> None:
    first = plan(sim_config, calls=50, seed=3, run_id="0000000001")
    second = plan(sim_config, calls=50, seed=3, run_id="0000000001")
    assert [c.steps for c in first.calls] == [c.steps for c in second.calls]
    assert first.truth == second.truth
    assert [c.steps for c in plan(sim_config, calls=50, seed=4, run_id="0000000001").calls] != [
        c.steps for c in first.calls
    ]


def bodies(traffic: TrafficPlan) -> list[dict[str, Any]]:
    return [body for call in traffic.calls for _, body in call.steps]


def test_each_run_places_new_calls_with_the_same_traffic(sim_config: Config) -> None:
    first, second = plan(sim_config, calls=80, seed=3), plan(sim_config, calls=80, seed=3)
    assert first.truth == second.truth

    def without_ids(body: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in body.items() if k not in ("call_id", "did")}

    assert [without_ids(b) for b in bodies(first)] == [without_ids(b) for b in bodies(second)]
    for key in ("call_id", "did"):
        ids = [{b[key] for b in bodies(traffic) if key in b} for traffic in (first, second)]
        assert ids[0]
        assert ids[1]
        assert not ids[0] & ids[1], key


def test_every_planned_body_is_a_valid_webhook(sim_config: Config) -> None:
    parser = WebhookParser(sim_config.secrets())
    traffic = plan(sim_config, calls=300)
    for call in traffic.calls:
        for _, body in call.steps:
            parser.parse(json.dumps(body).encode())
            if "abon" in body:
                assert str(body["abon"]) in ("201", "202")


def test_ground_truth_counts_match_the_planned_events(sim_config: Config) -> None:
    traffic = plan(sim_config, calls=400)
    bodies = [body for call in traffic.calls for _, body in call.steps]
    starts = sum(body["event_type"].endswith("Start") for body in bodies)
    truth = traffic.truth.samples
    assert sum(truth["mcn_calls_started_total"].values()) == starts
    assert sum(truth["mcn_webhook_events_total"].values()) == len(bodies)
    assert sum(truth["mcn_active_calls"].values()) == 0


def test_missed_ratio_drives_the_share_of_missed_inbound_calls(sim_config: Config) -> None:
    def missed_share(ratio: float) -> float:
        ended = plan(sim_config, calls=600, missed_ratio=ratio).truth.samples[
            "mcn_calls_ended_total"
        ]
        inbound = {k: v for k, v in ended.items() if ("direction", "inbound") in k}
        missed = sum(v for k, v in inbound.items() if ("outcome", "missed") in k)
        return missed / sum(inbound.values())

    assert missed_share(0.05) < 0.2
    assert missed_share(0.9) > 0.7


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Answers 503 to every other request, like a server restarting its workers."""

    count = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            FlakyHandler.count += 1
            fail = FlakyHandler.count % 2 == 1
        self.send_response(503 if fail else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def flaky_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/webhook"
    server.shutdown()


def test_sender_retries_5xx_until_each_event_is_taken(
    sim_config: Config, flaky_server: str
) -> None:
    options = Options(url=flaky_server, calls=20, concurrency=1, pace=0, settle=0)
    traffic = TrafficPlan(sim_config, options)
    calls = traffic.build()
    sender = Sender(options)
    sender.run(calls)
    events = sum(len(call.steps) for call in calls)
    assert sender.sent == events
    assert sender.retries == events
    assert sender.failed == []


class RefusingHandler(http.server.BaseHTTPRequestHandler):
    """Takes the first event, then answers 401: as if the secret changed during the run."""

    count = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            RefusingHandler.count += 1
            first = RefusingHandler.count == 1
        self.send_response(200 if first else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_refusal_during_the_run_stops_it_instead_of_sending_the_rest(
    sim_config: Config,
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/webhook"
    try:
        options = Options(url=url, calls=200, concurrency=2, pace=0)
        sender = Sender(options)
        with pytest.raises(SimulationError) as caught:
            sender.run(TrafficPlan(sim_config, options).build())
    finally:
        server.shutdown()
    assert str(caught.value).startswith(f"stopped after 1 event(s): {url}: 401 Unauthorized: ")
    assert RefusingHandler.count <= 3  # the probe, then one refusal per sender at most


def test_a_closed_port_fails_at_once_with_the_cause(sim_config: Config) -> None:
    port = free_port()
    options = Options(url=f"http://127.0.0.1:{port}/webhook", calls=50)
    sender = Sender(options)
    with pytest.raises(SimulationError) as caught:
        sender.run(TrafficPlan(sim_config, options).build())
    assert str(caught.value) == (
        f"http://127.0.0.1:{port}/webhook: connection refused: "
        f"is the exporter running and listening on 127.0.0.1:{port}?"
    )
    assert (sender.sent, sender.retries) == (0, 0)


class CountingHandler(http.server.BaseHTTPRequestHandler):
    """Takes every event, counting the bodies it received, per server."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the exporter: no reconnection to fail
    received: dict[int, list[bytes]]
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            port = int(self.server.server_address[1])  # type: ignore[index]
            self.received.setdefault(port, []).append(body)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def counting_servers() -> Iterator[tuple[list[str], dict[int, list[bytes]]]]:
    received: dict[int, list[bytes]] = {}
    handler = type("Handler", (CountingHandler,), {"received": received})
    server_class = type("Server", (http.server.ThreadingHTTPServer,), {"request_queue_size": 128})
    servers = [server_class(("127.0.0.1", 0), handler) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [f"http://127.0.0.1:{s.server_address[1]}/webhook" for s in servers], received
    for server in servers:
        server.shutdown()


def test_events_go_to_every_url_and_copies_to_two_at_once(
    sim_config: Config, counting_servers: tuple[list[str], dict[int, list[bytes]]]
) -> None:
    (first, second), received = counting_servers
    options = Options(url=first, other_urls=(second,), calls=60, pace=0, copies=0.2)
    traffic = TrafficPlan(sim_config, options)
    calls = traffic.build()
    sender = Sender(options)
    sender.run(calls)

    copies = sum(len(call.copied) for call in calls)
    events = sum(len(call.steps) for call in calls)
    assert copies > 0
    assert sender.sent == events + copies
    assert sorted(len(bodies) for bodies in received.values())[0] > events / 4
    copied = {json.dumps(call.steps[i][1]).encode() for call in calls for i in call.copied}
    first_bodies, second_bodies = (set(bodies) for bodies in received.values())
    assert copied <= first_bodies & second_bodies  # each copy reached both
    assert sum(traffic.truth.samples["mcn_webhook_events_total"].values()) == events + copies


def test_an_event_refused_by_one_url_is_sent_to_the_other(
    sim_config: Config, counting_servers: tuple[list[str], dict[int, list[bytes]]]
) -> None:
    (up, _), received = counting_servers
    down = f"http://127.0.0.1:{free_port()}/webhook"
    options = Options(url=up, other_urls=(down,), calls=40, pace=0, copies=0.2)
    calls = TrafficPlan(sim_config, options).build()
    sender = Sender(options)
    sender.run(calls)

    delivered = sum(len(call.steps) + len(call.copied) for call in calls)
    assert sender.failed == []
    assert sender.retries > 0
    assert len(received[int(up.split(":")[2].split("/")[0])]) == sender.sent == delivered


def test_without_copies_the_traffic_of_a_seed_is_unchanged(sim_config: Config) -> None:
    alone = plan(sim_config, calls=50, seed=3, run_id="0000000001")
    spread = plan(sim_config, calls=50, seed=3, run_id="0000000001", other_urls=("http://x",))
    assert [c.steps for c in alone.calls] == [c.steps for c in spread.calls]
    assert all(not call.copied for call in alone.calls)


def test_a_url_that_is_not_http_is_refused(sim_config: Config) -> None:
    with pytest.raises(SimulationError, match="not an http"):
        Sender(Options(url="ftp://127.0.0.1/webhook"))
    with pytest.raises(SimulationError, match=r"127\.0\.0\.1:port/webhook: Port could not be cast"):
        Sender(Options(url="http://127.0.0.1:port/webhook"))


# -- comparing /metrics with the ground truth ----------------------------------------------------


def run_result(traffic: TrafficPlan, retries: int = 0) -> dict[str, Any]:
    return {"samples": traffic.truth.as_json(), "retries": retries}


def metrics_moved_by(before: Samples, result: dict[str, Any]) -> Samples:
    """What /metrics shows after a run that the exporter counted exactly."""
    after = {name: dict(series) for name, series in before.items()}
    sections = [result["samples"]]
    if "callers" in result:
        sections.append(result["callers"]["samples"])
    for name, expected in (item for section in sections for item in section.items()):
        for sample in expected:
            labels = tuple(sorted(sample["labels"].items()))
            series = after.setdefault(name, {})
            series[labels] = series.get(labels, 0.0) + sample["value"]
    return after


TELEPHONY = (
    ("account", str(ACCOUNT)),
    ("direction", "inbound"),
    ("extension", ""),
    ("service", "telephony"),
)
TALK = (("account", str(ACCOUNT)), ("direction", "inbound"), ("service", "vpbx"))


def test_a_run_counted_exactly_has_no_difference_on_a_store_that_is_not_fresh(
    sim_config: Config,
) -> None:
    result = run_result(plan(sim_config, calls=300))
    assert truth_differences({}, metrics_moved_by({}, result), result) == []
    before: Samples = {
        "mcn_active_calls": {TELEPHONY: 2.0},
        "mcn_call_talk_seconds_sum": {TALK: 1234.567},
        "mcn_calls_started_total": {TELEPHONY: 90.0},
        "mcn_webhook_rejected_total": {(("reason", "unauthorized"),): 4.0},
    }
    assert truth_differences(before, metrics_moved_by(before, result), result) == []


def test_every_way_metrics_can_differ_is_told(sim_config: Config) -> None:
    result = run_result(plan(sim_config, calls=300), retries=1)
    before: Samples = {"mcn_active_calls": {TELEPHONY: 2.0}}
    after = metrics_moved_by(before, result)
    after["mcn_active_calls"][TELEPHONY] = 3.0  # a call still open: it was not simulated
    after["mcn_calls_started_total"][TELEPHONY] -= 1
    talk = tuple(sorted(result["samples"]["mcn_call_talk_seconds_sum"][0]["labels"].items()))
    after["mcn_call_talk_seconds_sum"][talk] += 7
    after["mcn_webhook_rejected_total"] = {(("reason", "malformed"),): 1.0}
    series = f'account="{ACCOUNT}",direction="inbound",extension="",service="telephony"'
    expected_started = next(
        s["value"]
        for s in result["samples"]["mcn_calls_started_total"]
        if tuple(sorted(s["labels"].items())) == TELEPHONY
    )
    differences = truth_differences(before, after, result)
    assert differences[0] == (
        'mcn_webhook_rejected_total{reason="malformed"}: 1 request(s) refused during the run'
    )
    assert f"mcn_active_calls{{{series}}}: expected +0, /metrics moved by +1" in differences
    assert (
        f"mcn_calls_started_total{{{series}}}: expected +{expected_started}, "
        f"/metrics moved by +{expected_started - 1}"
    ) in differences
    assert any(line.startswith("mcn_call_talk_seconds_sum{") for line in differences), differences
    assert len(differences) == 4, differences


def test_deliveries_counted_twice_are_allowed_up_to_the_retries(sim_config: Config) -> None:
    result = run_result(plan(sim_config, calls=100), retries=2)
    after = metrics_moved_by({}, result)
    events = after["mcn_webhook_events_total"]
    labels = next(iter(events))
    events[labels] += 2
    assert truth_differences({}, after, result) == []
    events[labels] += 1
    assert truth_differences({}, after, result) == [
        "mcn_webhook_events_total: 3 more deliveries counted than expected, but only 2 were retried"
    ]


# -- the command against a real exporter ----------------------------------------------------------


def simulate_command(url: str, config: Path, *args: str) -> list[str]:
    command = [sys.executable, "-m", "exporter", "simulate", "--url", url, "--config", str(config)]
    return [*command, *args]


def simulate(
    url: str, config: Path, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        simulate_command(url, config, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_simulate_against_a_closed_port_exits_2_with_the_cause(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(base_config(tmp_path)))
    url = f"http://127.0.0.1:{free_port()}/webhook"
    result = simulate(url, config, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"simulate: {url}: connection refused: is the exporter running and listening on "
        f"{url.removeprefix('http://').removesuffix('/webhook')}?"
    ]
    verify = simulate(url, config, "--verify", timeout=60)
    assert verify.returncode == 2
    assert verify.stderr.startswith(f"simulate: {url.removesuffix('/webhook')}/metrics: ")


def delivered(server: ServerProcess) -> float:
    return sum(server.samples().get("mcn_webhook_events_total", {}).values())


def rejected(server: ServerProcess) -> dict[str, float]:
    series = server.samples().get("mcn_webhook_rejected_total", {})
    return {dict(labels)["reason"]: value for labels, value in series.items() if value}


@pytest.mark.server
@pytest.mark.parametrize(
    ("accounts", "path", "cause"),
    [
        (
            [{"id": ACCOUNT, "secret": "not-the-one"}],
            "/webhook",
            f"401 Unauthorized: the exporter does not take the secret of account {ACCOUNT}",
        ),
        (
            [{"id": 777, "secret": SECRET}],
            "/webhook",
            "403 Forbidden: the exporter has no account 777",
        ),
        (
            [{"id": ACCOUNT, "secret": SECRET}],
            "/hook",
            "404 Not Found: no webhook at /hook: use the path of the exporter's "
            "server.webhook_path (/webhook by default)",
        ),
    ],
)
def test_simulate_pointed_wrong_stops_at_the_first_refusal_with_its_cause(
    start_server: StartServer,
    tmp_path: Path,
    accounts: list[dict[str, Any]],
    path: str,
    cause: str,
) -> None:
    server = start_server(workers=1)
    wrong = tmp_path / "simulate.yaml"
    wrong.write_text(yaml.safe_dump(base_config(tmp_path, accounts=accounts)))

    result = simulate(server.url + path, wrong, "--calls", "200", timeout=120)

    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"simulate: {server.url}{path}: {cause}"), line
    assert sum(rejected(server).values()) <= 1  # the probe alone: not 200 calls' worth


@pytest.mark.server
def test_verify_passes_twice_with_the_same_seed_on_one_store(start_server: StartServer) -> None:
    server = start_server(workers=2, extensions={str(ACCOUNT): {"101": "A", "102": "B"}})
    args = ("--calls", "150", "--pace", "0.01", "--seed", "5", "--verify")
    runs = [simulate(server.url + "/webhook", server.config_path, *args) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["differences"] == []
        assert run.stderr.endswith("verify: /metrics moved exactly as the ground truth says\n")
    first, second = (json.loads(run.stdout) for run in runs)
    assert first["samples"] == second["samples"]
    assert first["run_id"] != second["run_id"]
    started = sum(server.samples()["mcn_calls_started_total"].values())
    expected = sum(s["value"] for s in first["samples"]["mcn_calls_started_total"])
    assert started == 2 * expected  # the second run's calls were new calls, not retries


@pytest.mark.server
def test_verify_exits_1_and_prints_what_another_sender_changed(
    start_server: StartServer,
) -> None:
    server = start_server(workers=2)
    run = subprocess.Popen(
        simulate_command(
            server.url + "/webhook",
            server.config_path,
            *("--verify", "--calls", "40", "--rate", "20", "--concurrency", "4", "--pace", "0"),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not delivered(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    # Posted once simulate has read /metrics and started sending, long before it is done.
    # A call of another sender, at an extension the simulation does not use: it stays open.
    extra = {
        "event_type": "onInCallingStart",
        "abon": "999",
        "call_id": "not-simulated",
        "secret": SECRET,
        "account_id": ACCOUNT,
    }
    assert server.post(json.dumps(extra).encode())[0] == 200
    stdout, stderr = run.communicate(timeout=300)

    assert run.returncode == 1, stderr
    series = f'account="{ACCOUNT}",direction="inbound",extension="999",service="vpbx"'
    moved = [
        f"mcn_active_calls{{{series}}}: expected +0, /metrics moved by +1",
        f"mcn_calls_started_total{{{series}}}: expected +0, /metrics moved by +1",
    ]
    assert set(moved) <= set(json.loads(stdout)["differences"])
    assert stderr.startswith("verify: ")
    assert {f"  {line}" for line in moved} <= set(stderr.splitlines())


# -- the caller level ------------------------------------------------------------------------------

TUESDAY_MORNING = 1_795_496_400.0  # Tue 2026-11-24 06:00 in Bratislava: closed
TUESDAY_NOON = TUESDAY_MORNING + 6 * 3600  # 12:00 in Bratislava: open
SUNDAY_NIGHT = 1_795_986_000.0  # Sun 2026-11-29 22:00 in Bratislava: closed
FIVE_PHONES = {str(ACCOUNT): {str(n): f"Desk {n}" for n in range(201, 206)}}
LINES = {ACCOUNT: {"0222202999": "Main line", "0850123456": "Sales"}}


@pytest.fixture
def office(tmp_path: Path) -> Config:
    """Five phones, open on weekdays 08:00-17:00 in Bratislava."""
    hours = {"timezone": "Europe/Bratislava", "open": {"mon-fri": "08:00-17:00"}}
    return parse_config(base_config(tmp_path, extensions=FIVE_PHONES, hours=hours))


def caller_plan(config: Config, **options: object) -> TrafficPlan:
    """A plan with nothing in it yet, to place chosen scenarios in."""
    return TrafficPlan(config, Options(url="http://unused", run_id="0000000001", **options))  # type: ignore[arg-type]


def sent_at(traffic: TrafficPlan, clock: Callable[[], float]) -> dict[str, dict[Labels, int]]:
    """The caller-level truth once every call was sent at the clock's time, zeros left out."""
    for call in (*traffic.calls, *traffic.follow_ups):
        call.started_at = clock()
    return {
        name: {labels: value for labels, value in counter.items() if value}
        for name, counter in traffic.caller_samples().samples.items()
    }


def labels(**values: str) -> Labels:
    return tuple(sorted({"account": str(ACCOUNT), **values}.items()))


def callers(truth: dict[str, dict[Labels, int]], outcome: str) -> int:
    calls = truth["mcn_inbound_calls_total"]
    return sum(value for key, value in calls.items() if ("outcome", outcome) in key)


def legs(traffic: TrafficPlan, outcome: str) -> int:
    ended = traffic.truth.samples["mcn_calls_ended_total"]
    return sum(value for key, value in ended.items() if ("outcome", outcome) in key)


def test_a_ring_group_nobody_answers_is_one_missed_caller_whatever_its_size(
    office: Config,
) -> None:
    traffic = caller_plan(office, seed=9)
    calls = [traffic._ring_group_unanswered(ACCOUNT) for _ in range(40)]
    traffic.calls.extend(calls)
    sizes = {len({str(b["abon"]) for _, b in c.steps}) for c in calls}
    truth = sent_at(traffic, lambda: TUESDAY_NOON)

    assert sizes == {2, 3, 4, 5}
    unanswered_legs = legs(traffic, "missed") + legs(traffic, "cancelled")
    assert unanswered_legs == sum(len({str(b["abon"]) for _, b in c.steps}) for c in calls) > 80
    assert legs(traffic, "missed")
    assert legs(traffic, "cancelled")
    missed = callers(truth, "missed")
    assert missed == 40
    assert truth["mcn_inbound_call_wait_seconds_count"] == truth["mcn_inbound_calls_total"]
    assert sum(truth["mcn_missed_callers_waiting"].values()) == 40
    assert all(("outcome", "answered") not in k for k in truth["mcn_inbound_calls_total"])


def test_a_hunt_group_is_one_caller_with_and_without_call_id(office: Config) -> None:
    traffic = caller_plan(office, seed=4, missed_ratio=0.0, pace=0.5)
    calls = [traffic._hunt_group(ACCOUNT) for _ in range(30)]
    traffic.calls.extend(calls)
    truth = sent_at(traffic, lambda: TUESDAY_NOON)

    with_id = 0
    for call in calls:
        starts = [(delay, b) for delay, b in call.steps if b["event_type"] == "onInCallingStart"]
        assert len(starts) == 2
        (_, first), (gap, second) = starts
        assert str(first["abon"]) != str(second["abon"])
        assert gap <= 0.5  # the next phone rings at once: well within callers.group_window
        same_call = ("call_id", "did", "did_mcn")
        assert [first.get(key) for key in same_call] == [second.get(key) for key in same_call]
        with_id += "call_id" in first
    assert 0 < with_id < 30
    assert legs(traffic, "missed") == 30
    assert legs(traffic, "answered") == 30
    answered = {k: v for k, v in truth["mcn_inbound_calls_total"].items()}
    assert sum(answered.values()) == 30
    assert all(("outcome", "answered") in k and ("period", "open") in k for k in answered)
    assert not truth["mcn_missed_callers_waiting"]


def digits(number: str) -> str:
    return "".join(c for c in number if c.isdigit())[-9:]


def test_a_missed_caller_called_back_from_another_phone_with_the_number_written_differently(
    office: Config,
) -> None:
    traffic = caller_plan(office, seed=2, lines=LINES)
    stories = [traffic._called_back(ACCOUNT) for _ in range(60)]
    traffic.calls.extend(stories)
    truth = sent_at(traffic, lambda: TUESDAY_NOON)

    reached = attempts_missed = 0
    for missed, follow_up in zip(stories, traffic.follow_ups, strict=True):
        assert missed.followed
        assert follow_up.follow_up
        rung = {str(b["abon"]) for _, b in missed.steps}
        caller = {b["did"] for _, b in missed.steps}
        assert len(caller) == 1
        for _, body in follow_up.steps:
            assert body["event_type"].startswith("onOutCalling")
            assert digits(body["did"]) == digits(*caller)
            assert body["did"] not in caller  # written differently
            assert str(body["abon"]) not in rung or len(rung) == 5
            assert "did_mcn" not in body
        events = [b["event_type"] for _, b in follow_up.steps]
        reached += "onOutCallingAnswered" in events
        attempts_missed += events.count("onOutCallingMissed")
    assert 0 < reached < 60
    assert attempts_missed > 0
    assert truth["mcn_callback_attempts_total"] == {
        labels(outcome="answered"): reached,
        labels(outcome="unanswered"): attempts_missed,
    }
    assert truth["mcn_callback_seconds_count"] == {labels(resolution="called_back"): reached}
    resolved = truth["mcn_missed_callers_resolved_total"]
    assert sum(resolved.values()) == reached
    assert {dict(k)["line"] for k in resolved} == {"", "other", "Main line", "Sales"}
    assert sum(truth["mcn_missed_callers_waiting"].values()) == 60 - reached


def test_callers_who_call_again_are_answered_or_missed_again(office: Config) -> None:
    traffic = caller_plan(office, seed=3)
    again = [traffic._calls_again(ACCOUNT) for _ in range(10)]
    twice = [traffic._missed_again(ACCOUNT) for _ in range(5)]
    traffic.calls.extend(again + twice)
    truth = sent_at(traffic, lambda: TUESDAY_NOON)

    for missed, follow_up in zip(again + twice, traffic.follow_ups, strict=True):
        first = next(b for _, b in missed.steps)
        second = next(b for _, b in follow_up.steps)
        assert second["event_type"] == "onInCallingStart"
        assert digits(first["did"]) == digits(second["did"])
        assert first["did"] != second["did"]
        assert second["call_id"] != first.get("call_id")
    assert callers(truth, "missed") == 15 + 5
    assert callers(truth, "answered") == 10
    assert truth["mcn_callback_seconds_count"] == {labels(resolution="called_again"): 10}
    assert sum(truth["mcn_missed_callers_resolved_total"].values()) == 10
    assert sum(truth["mcn_missed_callers_waiting"].values()) == 5
    assert sum(truth["mcn_repeat_missed_calls_total"].values()) == 5
    assert not truth["mcn_callback_attempts_total"]


def test_withheld_numbers_are_callers_who_never_wait(office: Config) -> None:
    traffic = caller_plan(office, seed=5)
    calls = [traffic._withheld(ACCOUNT) for _ in range(30)]
    traffic.calls.extend(calls)
    truth = sent_at(traffic, lambda: TUESDAY_NOON)

    assert all("did" not in body and "call_id" in body for c in calls for _, body in c.steps)
    missed = callers(truth, "missed")
    assert 0 < missed < 30
    assert not truth["mcn_missed_callers_waiting"]


def test_company_lines_by_name_other_or_none_never_by_number(tmp_path: Path) -> None:
    config = parse_config(base_config(tmp_path, extensions=FIVE_PHONES))
    traffic = caller_plan(config, seed=6, lines=LINES)
    calls = [traffic._ring_group_unanswered(ACCOUNT) for _ in range(60)]
    traffic.calls.extend(calls)
    truth = sent_at(traffic, lambda: TUESDAY_NOON)

    by_line = {dict(k)["line"]: v for k, v in truth["mcn_inbound_calls_total"].items()}
    assert by_line.keys() == {"", "other", "Main line", "Sales"}
    assert sum(by_line.values()) == 60
    for call in calls:
        line = {body.get("did_mcn") for _, body in call.steps}
        assert len(line) == 1  # every leg of a call names the same line
    written = {b["did_mcn"] for c in calls for _, b in c.steps if "did_mcn" in b}
    main = {number for number in written if digits(number) == "222202999"}
    assert len(main) > 1  # the same line written in several ways
    unconfigured = {n for n in written if digits(n) not in ("222202999", "850123456")}
    assert unconfigured
    assert sum(v for k, v in by_line.items() if k == "other") >= 1
    assert all(period == "open" for k in truth["mcn_inbound_calls_total"] for _, period in k[-1:])


def test_a_whole_run_counts_each_caller_once_and_its_caller_numbers_never_repeat(
    office: Config,
) -> None:
    traffic = plan(office, calls=600, seed=8)
    truth = sent_at(traffic, lambda: TUESDAY_NOON)
    inbound: set[str] = set()
    for body in bodies(traffic):
        if body["event_type"] in ("onInCallingStart", "onInCallingMissed") or (
            body["event_type"] == "onInCallingEnd"
        ):
            inbound.add(body.get("call_id") or f"{body['did']}/{body.get('did_mcn')}")
    assert sum(truth["mcn_inbound_calls_total"].values()) == len(inbound)
    first_calls = [c for c in traffic.calls if not c.follow_up]
    assert traffic.calls[: len([c for c in first_calls if c.followed])] == [
        c for c in first_calls if c.followed
    ]
    assert all(c.follow_up for c in traffic.calls[len(first_calls) :])
    assert truth["mcn_missed_callers_resolved_total"]
    assert truth["mcn_repeat_missed_calls_total"]


def test_the_period_is_the_calendar_at_the_moment_each_call_was_sent(office: Config) -> None:
    traffic = caller_plan(office, seed=2)
    traffic.calls.extend(traffic._calls_again(ACCOUNT) for _ in range(6))
    moments = iter([TUESDAY_NOON] * 6 + [SUNDAY_NIGHT] * 6)
    truth = sent_at(traffic, lambda: next(moments))

    # The missed calls were sent while open, the calls again while closed; each caller is
    # resolved in the period of their missed call.
    by_period: Counter[tuple[str, str]] = Counter()
    for key, value in truth["mcn_inbound_calls_total"].items():
        by_period[dict(key)["outcome"], dict(key)["period"]] += value
    assert by_period == {("missed", "open"): 6, ("answered", "closed"): 6}
    periods = {dict(k)["period"] for k in truth["mcn_missed_callers_resolved_total"]}
    assert periods == {"open"}


class AcceptingHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_the_sender_stamps_each_call_by_the_injected_clock_and_sends_follow_ups_last(
    office: Config,
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AcceptingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    clock = FakeClock(TUESDAY_MORNING)
    options = Options(
        url=f"http://127.0.0.1:{server.server_address[1]}/webhook",
        calls=120,
        seed=12,
        concurrency=4,
        pace=0,
        settle=0,
        clock=clock,
        missed_ratio=0.5,
    )
    traffic = TrafficPlan(office, options)
    calls = traffic.build()
    sent_before_follow_ups: list[int] = []

    def open_the_office() -> None:
        sent_before_follow_ups.append(sender.sent)
        clock.now = TUESDAY_NOON

    sender = Sender(options)
    try:
        sender.run(calls, before_follow_ups=open_the_office)
    finally:
        server.shutdown()
    truth = traffic.caller_samples().samples

    follow_ups = [c for c in calls if c.follow_up]
    assert follow_ups
    assert sent_before_follow_ups == [sum(len(c.steps) for c in calls if not c.follow_up)]
    assert {c.started_at for c in calls if not c.follow_up} == {TUESDAY_MORNING}
    assert {c.started_at for c in follow_ups} == {TUESDAY_NOON}
    resolved = truth["mcn_missed_callers_resolved_total"]
    assert resolved
    assert all(("period", "closed") in k for k, v in resolved.items() if v)
    calls_again = {
        k: v for k, v in truth["mcn_inbound_calls_total"].items() if ("period", "open") in k
    }
    again = sum(v for k, v in truth["mcn_callback_seconds_count"].items() if "called_again" in k[1])
    twice = sum(truth["mcn_repeat_missed_calls_total"].values())
    assert sum(calls_again.values()) == again + twice > 0


# -- comparing the caller level ------------------------------------------------------------------


def caller_result(config: Config) -> dict[str, Any]:
    traffic = plan(config, calls=400, seed=8, lines=LINES)
    sent_at(traffic, lambda: TUESDAY_NOON)
    result = run_result(traffic)
    result["callers"] = {"samples": traffic.caller_samples().as_json()}
    return result


WAITING = "mcn_missed_callers_waiting"


def test_a_caller_level_counted_exactly_has_no_difference(office: Config) -> None:
    result = caller_result(office)
    before: Samples = {
        WAITING: {labels(line="Sales"): 3.0},
        "mcn_inbound_calls_ringing": {labels(line=""): 1.0},
        "mcn_inbound_calls_total": {},
    }
    after = metrics_moved_by(before, result)
    assert after[WAITING][labels(line="Sales")] > 3
    assert truth_differences(before, after, result) == []
    # An exporter without the caller level is compared on legs alone.
    legs_only = metrics_moved_by({}, run_result(plan(office, calls=400, seed=8, lines=LINES)))
    assert "mcn_inbound_calls_total" not in legs_only
    assert truth_differences({}, legs_only, result) == []


@pytest.mark.parametrize(
    "name",
    [
        "mcn_inbound_calls_total",
        "mcn_inbound_call_wait_seconds_count",
        "mcn_inbound_calls_ringing",
        "mcn_missed_callers_waiting",
        "mcn_missed_callers_resolved_total",
        "mcn_callback_seconds_count",
        "mcn_repeat_missed_calls_total",
        "mcn_callback_attempts_total",
    ],
)
def test_every_caller_level_metric_that_differs_is_told(office: Config, name: str) -> None:
    result = caller_result(office)
    before: Samples = {"mcn_inbound_calls_total": {}, "mcn_inbound_calls_ringing": {}}
    after = metrics_moved_by(before, result)
    expected = result["callers"]["samples"][name]
    key = tuple(sorted(expected[0]["labels"].items()))
    after.setdefault(name, {})[key] = after.get(name, {}).get(key, 0.0) + 1

    differences = truth_differences(before, after, result)

    value = float(expected[0]["value"])
    series = ",".join(f'{label}="{text}"' for label, text in key)
    assert differences == [
        f"{name}{{{series}}}: expected {value:+g}, /metrics moved by {value + 1:+g}"
    ]


@pytest.fixture
def accepting_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AcceptingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/webhook"
    server.shutdown()


def test_the_command_takes_lines_and_the_settle_and_prints_the_caller_level(
    tmp_path: Path, accepting_server: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(base_config(tmp_path, extensions=FIVE_PHONES)))
    args = ("--calls", "150", "--pace", "0", "--settle", "0.5", "--missed-ratio", "0.5")
    lines = ("--line", "Main line=0222202999", "--line", "Sales=+421 850 123 456")

    result = simulate(accepting_server, config, *args, *lines, timeout=120)

    assert result.returncode == 0, result.stderr
    callers = json.loads(result.stdout)["callers"]
    assert callers["settle"] == 0.5
    shown = {
        sample["labels"]["line"]
        for sample in callers["samples"]["mcn_inbound_calls_total"]
        if sample["value"]
    }
    assert shown == {"", "other", "Main line", "Sales"}
    assert {s["labels"]["period"] for s in callers["samples"]["mcn_inbound_calls_total"]} == {
        "open"
    }
    bad = simulate(accepting_server, config, "--line", "0222202999", timeout=60)
    assert bad.returncode == 2
    assert "must be NAME=NUMBER" in bad.stderr
