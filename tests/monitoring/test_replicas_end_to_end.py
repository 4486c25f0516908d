"""End to end with two replicas: two exporters under gunicorn on one PostgreSQL call store, one
Prometheus scraping both as two targets of job mcn-exporter with the shipped rules, Alertmanager
on the shipped configuration, and `mcn-exporter simulate` sending each event to a replica at
random (some to both at once). Midway one replica is SIGKILLed, as when its host dies; the
traffic goes on to the survivor.

What must hold (docs/monitoring.md, "One or several replicas"):
- the recorded series count every call once: not twice while both replicas are up, and with no
  counter-reset artefact (a false jump) when one dies;
- the kill raises MCNExporterReplicaDown for the dead replica (pending: its `for:` of 2 minutes
  runs out after this test) and nothing else: not MCNExporterDown, not a missed-call spike, not
  a silent webhook feed; no notification reaches the receiver;
- the survivor's /metrics show the simulator's ground truth exactly, and so does Prometheus.

Prometheus runs on the shipped prometheus.yml changed as in test_end_to_end.py (1 s intervals,
addresses, absolute rule paths), with both replicas as the job's targets. The rules are loaded as
shipped. So that MCNWebhookFeedSilent is armed (it needs calls at this time on previous days),
the test first backfills account:mcn_calls_started:increase15m of yesterday around this time.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from exporter.simulate import truth_differences
from tests.conftest import ACCOUNT, ServerProcess, base_config
from tests.monitoring.conftest import (
    AlertReceiver,
    Prometheus,
    require_tool,
    run,
    start_alert_receiver,
    start_alertmanager,
    start_prometheus,
    wait_until,
)
from tests.monitoring.test_end_to_end import alertmanager_config, prometheus_config
from tests.test_server import EXTENSIONS, events_delivered, simulate_command
from tests.test_server_postgresql import kill_replica

if TYPE_CHECKING:
    from tests.pgcluster import PgCluster

pytest_plugins = ["tests.pgcluster"]
pytestmark = [pytest.mark.server, pytest.mark.postgresql]

# About 3.3 events a call, plus the retries of the events drawn for the dead replica: some
# 80 s of traffic at 20 events/s, the kill after about 30 s.
CALLS, RATE = 400, 20.0
KILL_AFTER_EVENTS = 600  # taken by the survivor: about half the events, plus the copies
# Call legs started in 15 minutes at this time yesterday: MCNWebhookFeedSilent's expectation.
YESTERDAY_STARTED = 300.0
# What rate()/increase() may add over the true count: extrapolation by half a scrape interval
# at either end of a series. A doubled count or a reset artefact adds the whole count.
TOLERANCE = 1.1
CALL_TOTALS = ("mcn_calls_started_total", "mcn_calls_ended_total")


@dataclass
class Scenario:
    prometheus: Prometheus
    receiver: AlertReceiver
    survivor: ServerProcess
    killed_instance: str
    traffic_from: float
    killed_at: float
    replica_down: dict[str, Any]
    before_kill: dict[str, float]
    truth: dict[str, Any]

    def window(self, since: float) -> str:
        """A range selector reaching back to `since`, read now."""
        return f"[{int(time.time() - since) + 2}s]"


def backfill_yesterday(data_dir: Path, now: float) -> None:
    """account:mcn_calls_started:increase15m around this time yesterday, as Prometheus would
    have recorded it then (read by account:mcn_calls_started:expected15m as `offset 1d`)."""
    name = "account:mcn_calls_started:increase15m"
    lines = [f"# TYPE {name} gauge"]
    start = int(now - 86400 - 1800)
    for ts in range(start, start + 3600, 15):
        lines.append(f'{name}{{account="{ACCOUNT}"}} {YESTERDAY_STARTED} {ts}')
    lines.append("# EOF")
    data_dir.mkdir(parents=True, exist_ok=True)
    source = data_dir.parent / "yesterday.om"
    source.write_text("\n".join(lines) + "\n")
    command = [require_tool("promtool"), "tsdb", "create-blocks-from", "openmetrics"]
    done = run([*command, str(source), str(data_dir)])
    assert done.returncode == 0, done.stdout + done.stderr


def replica(workdir: Path, name: str, store_url: str) -> ServerProcess:
    config = base_config(workdir, store={"url": store_url}, extensions=EXTENSIONS)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return ServerProcess(path, workers=2)


def value(result: list[dict[str, Any]]) -> float:
    """The value of a one-series answer (a ValueError, which wait_until retries, otherwise)."""
    if len(result) != 1:
        raise ValueError(f"expected one series: {result}")
    return float(result[0]["value"][1])


def collapsed(metric: str) -> str:
    """The shared totals counted once: the replicas collapsed as the shipped rules do."""
    return f'sum(max without (instance) ({metric}{{job="mcn-exporter"}}))'


def truth_total(truth: dict[str, Any], metric: str, **labels: str) -> float:
    return float(
        sum(
            sample["value"]
            for sample in truth["samples"][metric]
            if all(sample["labels"].get(k) == v for k, v in labels.items())
        )
    )


@pytest.fixture(scope="module")
def scenario(
    tmp_path_factory: pytest.TempPathFactory, postgres_cluster: PgCluster
) -> Iterator[Scenario]:
    for tool in ("prometheus", "promtool"):
        require_tool(tool)
    workdir = tmp_path_factory.mktemp("e2e-replicas")
    store_url = postgres_cluster.create_database()

    with ExitStack() as stack:
        receiver = stack.enter_context(start_alert_receiver())
        survivor, victim = (replica(workdir, name, store_url) for name in ("first", "second"))
        for server in (survivor, victim):
            stack.callback(_stop_replica, server)
            server.start()
        victim_instance = f"127.0.0.1:{victim.port}"

        backfill_yesterday(workdir / "prometheus" / "data", time.time())
        alertmanager = stack.enter_context(
            start_alertmanager(alertmanager_config(receiver.url), workdir / "alertmanager")
        )
        config = prometheus_config(survivor.port, alertmanager.url)
        (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "mcn-exporter"]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{survivor.port}", victim_instance]}]
        prometheus = stack.enter_context(start_prometheus(config, workdir / "prometheus"))
        wait_until(
            "Prometheus to scrape both replicas",
            lambda: value(prometheus.query('sum(up{job="mcn-exporter"})')) == 2,
            timeout=60,
        )

        traffic_from = time.time()
        simulate = subprocess.Popen(
            simulate_command(
                survivor,
                *("--url", victim.url + "/webhook", "--copies", "0.1"),
                *("--calls", str(CALLS), "--rate", f"{RATE:g}", "--concurrency", "8"),
                *("--seed", "9"),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        stack.callback(_stop_simulate, simulate)
        wait_until(
            "traffic to reach the survivor",
            lambda: events_delivered(survivor) >= KILL_AFTER_EVENTS,
            timeout=120,
        )
        # Both replicas scraped with traffic counted: what one replica's counters hold, and
        # what summing the replicas (the mistake the rules avoid) would give.
        before_kill = {
            name: value(prometheus.query(expr))
            for name, expr in {
                "recorded": f'account:mcn_calls_started:increase15m{{account="{ACCOUNT}"}}',
                "one_replica": collapsed("mcn_calls_started_total"),
                "summed": 'sum(mcn_calls_started_total{job="mcn-exporter"})',
                "up": 'sum(up{job="mcn-exporter"})',
            }.items()
        }
        killed_at = time.time()
        kill_replica(victim)
        assert simulate.poll() is None, "the kill came mid-traffic"

        replica_down = wait_until(
            "MCNExporterReplicaDown to be pending",
            lambda: prometheus.query('ALERTS{alertname="MCNExporterReplicaDown"}'),
            timeout=60,
        )
        out, err = simulate.communicate(timeout=300)
        assert simulate.returncode == 0, err
        truth: dict[str, Any] = json.loads(out)
        wait_until(
            "Prometheus to scrape the final totals",
            lambda: all(
                value(prometheus.query(collapsed(metric))) == truth_total(truth, metric)
                for metric in CALL_TOTALS
            ),
            timeout=60,
        )
        yield Scenario(
            prometheus,
            receiver,
            survivor,
            victim_instance,
            traffic_from,
            killed_at,
            replica_down[0],
            before_kill,
            truth,
        )


def _stop_replica(server: ServerProcess) -> None:
    if server.process is not None and server.process.poll() is None:
        server.stop()


def _stop_simulate(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.communicate()


def test_the_survivor_shows_the_ground_truth_exactly(scenario: Scenario) -> None:
    truth = scenario.truth
    assert truth["failed"] == 0
    assert truth["copies"] > 0  # events sent to both replicas at once
    assert truth["retries"] > 0  # events drawn for the dead replica went to the survivor
    assert truth_differences({}, scenario.survivor.samples(), truth) == []


def test_prometheus_counts_the_shared_totals_once(scenario: Scenario) -> None:
    before = scenario.before_kill
    assert before["up"] == 2
    # Both replicas expose the same shared totals: summing them would double the count ...
    assert before["one_replica"] > 0
    assert before["summed"] >= 1.8 * before["one_replica"], before
    # ... while the recorded series counts what one replica's counters hold.
    assert 0 < before["recorded"] <= TOLERANCE * before["one_replica"] + 2, before

    # At the end, every call total Prometheus holds, collapsed, is the simulator's truth.
    for metric in CALL_TOTALS:
        shown = {
            _labels(series["metric"]): float(series["value"][1])
            for series in scenario.prometheus.query(
                f'max without (instance) ({metric}{{job="mcn-exporter"}}) > 0'
            )
        }
        expected = {
            # Prometheus drops empty labels (telephony legs have extension="").
            tuple(sorted((k, v) for k, v in s["labels"].items() if v)): float(s["value"])
            for s in scenario.truth["samples"][metric]
            if s["value"]
        }
        assert shown == expected, metric


def _labels(metric: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in metric.items() if k not in ("__name__", "job")))


def test_the_recorded_series_never_jump_when_a_replica_dies(scenario: Scenario) -> None:
    """No counter-reset artefact: at no evaluation, before or after the kill, did a recorded
    series count more than the calls of the whole run (a reset would add the whole count)."""
    truth, prometheus = scenario.truth, scenario.prometheus
    window = scenario.window(scenario.traffic_from)
    account = f'{{account="{ACCOUNT}"}}'
    started = truth_total(truth, "mcn_calls_started_total")
    callers = truth["callers"]["samples"]["mcn_inbound_calls_total"]
    missed = sum(sample["value"] for sample in callers if sample["labels"]["outcome"] == "missed")
    assert started > 0
    assert missed > 0
    bounds = {
        f"account:mcn_calls_started:increase15m{account}": started,
        f"account:mcn_inbound_calls_missed:increase10m{account}": missed,
        # A rate over 5 minutes, of a run shorter than that: its count over 5 minutes.
        f"300 * sum by (account) (account:mcn_calls_started:rate5m{account})": started,
    }
    for expr, total in bounds.items():
        highest = value(prometheus.query(f"max_over_time(({expr}){window[:-1]}:1s])"))
        assert highest <= TOLERANCE * total + 2, (expr, highest, total)
    # And the recorded count is the run's, not less: both replicas' counts, once.
    final = value(prometheus.query(f"account:mcn_calls_started:increase15m{account}"))
    assert final >= started / TOLERANCE, (final, started)
    # Each replica's own series stayed monotonic.
    resets = prometheus.query(f'resets(mcn_calls_started_total{{job="mcn-exporter"}}{window}) > 0')
    assert resets == []


def test_a_replica_killed_raises_only_the_replica_warning(scenario: Scenario) -> None:
    alert = scenario.replica_down
    assert alert["metric"] == {
        "__name__": "ALERTS",
        "alertname": "MCNExporterReplicaDown",
        "alertstate": "pending",  # for 2 minutes before it fires: longer than this test
        "instance": scenario.killed_instance,
        "job": "mcn-exporter",
        "severity": "warning",
    }
    prometheus = scenario.prometheus
    assert value(prometheus.query('sum(up{job="mcn-exporter"})')) == 1
    # MCNWebhookFeedSilent was armed: calls came in at this time yesterday.
    expected = prometheus.query(f'account:mcn_calls_started:expected15m{{account="{ACCOUNT}"}}')
    assert value(expected) == YESTERDAY_STARTED
    # Nothing else, in any evaluation: not even pending.
    since_start = scenario.window(scenario.traffic_from)
    since_kill = scenario.window(scenario.killed_at)
    never = {
        "MCNExporterDown": since_start,
        "MCNMissedCallSpike": since_start,
        "MCNWebhookFeedSilent": since_kill,  # pending before the traffic began, rightly
    }
    for name, window in never.items():
        history = prometheus.query(f'count_over_time(ALERTS{{alertname="{name}"}}{window})')
        assert history == [], (name, history)
    others = prometheus.query('ALERTS{alertname!="MCNExporterReplicaDown"}')
    assert others == [], others
    assert scenario.receiver.alerts() == []
