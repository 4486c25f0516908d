"""The traffic simulator: deterministic plans, a ground truth that matches them, retries."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.config import Config, parse_config
from exporter.events import WebhookParser
from exporter.simulate import Options, Sender, TrafficPlan
from tests.conftest import base_config


@pytest.fixture
def sim_config(tmp_path: Path) -> Config:
    return parse_config(base_config(tmp_path, extensions={"10123": {"201": "A", "202": "B"}}))


def plan(config: Config, **options: object) -> TrafficPlan:
    traffic = TrafficPlan(config, Options(url="http://unused", **options))  # type: ignore[arg-type]
    traffic.build()
    return traffic


def test_same_seed_same_traffic(sim_config: Config) -> None:
    first, second = plan(sim_config, calls=50, seed=3), plan(sim_config, calls=50, seed=3)
    assert [c.steps for c in first.calls] == [c.steps for c in second.calls]
    assert first.truth == second.truth
    assert [c.steps for c in plan(sim_config, calls=50, seed=4).calls] != [
        c.steps for c in first.calls
    ]


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
    options = Options(url=flaky_server, calls=20, concurrency=1, pace=0)
    traffic = TrafficPlan(sim_config, options)
    calls = traffic.build()
    sender = Sender(options)
    sender.run(calls)
    events = sum(len(call.steps) for call in calls)
    assert sender.sent == events
    assert sender.retries == events
    assert sender.failed == []
