"""End to end: the exporter under gunicorn, a real Prometheus on the shipped prometheus.yml and
rules, a real Alertmanager on the shipped alertmanager.yml, and `mcn-exporter simulate` traffic.

Two accounts send traffic at the same time, for about three minutes:
- account 10123 ("Main office"): normal traffic, 10% of inbound calls unanswered. No alert may
  arrive for it, nor may any of its alerts ever become even pending.
- account 20456 ("Branch"): a spike, 90% of inbound calls unanswered. MCNMissedCallSpike must arrive
  at the critical receiver with its labels and annotations.

What the test changes in the shipped files, and nothing else:
- prometheus.yml: scrape and evaluation intervals of 1 s (as the acceptance asks), the exporter's
  and Alertmanager's addresses, and the rule file paths made absolute;
- alertmanager.yml: the webhook URLs point at the test's receiver (same paths).
The rules are loaded as shipped, `for:` durations included. A fresh Prometheus has no history at
this time of day, so the test first backfills (promtool tsdb create-blocks-from openmetrics) the
recorded series account:mcn_calls_missed:rate1h of the three previous days around this time, as
Prometheus would have recorded it then: the spike is then judged against a real baseline, as in
production. Both accounts' baselines are what their normal traffic produces.

Then every query of every dashboard panel, with its variables substituted, is sent to this
Prometheus and must succeed and return data.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ServerProcess
from tests.monitoring.conftest import (
    DASHBOARD_FILES,
    GRAFANA_BUILTINS,
    PROMETHEUS_DIR,
    RULE_FILES,
    AlertReceiver,
    Prometheus,
    iter_panels,
    load_dashboard,
    load_yaml,
    require_tool,
    run,
    shipped_rules,
    start_alert_receiver,
    start_alertmanager,
    start_prometheus,
    substitute,
    variable_query,
    variables,
    wait_until,
)

pytestmark = pytest.mark.server

NORMAL, SPIKE = 10123, 20456
SECRETS = {NORMAL: "MainOfficeSecret", SPIKE: "BranchSecret"}
NAMES = {NORMAL: "Main office", SPIKE: "Branch"}
EXTENSIONS = {
    NORMAL: {"101": "Reception", "102": "Sales", "103": "Support", "104": "Billing"},
    SPIKE: {"201": "Front desk", "202": "Nurse", "203": "Doctor"},
}
# Traffic: (calls, events per second, share of inbound calls missed). About 3.3 events a call,
# so both run for about 2.5 minutes. Per call, the simulator produces ~0.74 * ratio + 0.02 missed
# legs (single calls, ring groups of three, lost starts).
TRAFFIC = {NORMAL: (200, 4.0, 0.1), SPIKE: (250, 6.0, 0.9)}
# The backfilled baseline, missed legs per second at this time of day on previous days: about
# what the normal traffic above produces for the main office (1.2 calls/s * 0.094 missed legs a
# call = 0.11/s), and 0.02/s (12 in 10 minutes) for the small branch office.
BASELINE = {NORMAL: 0.1, SPIKE: 0.02}
ALERT_TIMEOUT = 330.0


@dataclass
class Scenario:
    prometheus: Prometheus
    receiver: AlertReceiver
    exporter_url: str
    started_at: float
    spike_alert: tuple[str, dict[str, Any]]
    truth: dict[int, dict[str, Any]] = field(default_factory=dict)


def exporter_config(workdir: Path) -> dict[str, Any]:
    return {
        "server": {"workers": 2},
        "accounts": [
            {"id": account, "secret": SECRETS[account], "name": NAMES[account]}
            for account in (NORMAL, SPIKE)
        ],
        "extensions": {str(account): exts for account, exts in EXTENSIONS.items()},
        "store": {"path": str(workdir / "calls.sqlite3")},
    }


def simulator_config(workdir: Path, account: int) -> Path:
    """A config listing one account: simulate sends traffic for the accounts it lists."""
    document = exporter_config(workdir)
    document["accounts"] = [a for a in document["accounts"] if a["id"] == account]
    document["extensions"] = {str(account): EXTENSIONS[account]}
    path = workdir / f"simulate-{account}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def prometheus_config(exporter_port: int, alertmanager_url: str) -> dict[str, Any]:
    config: dict[str, Any] = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str((PROMETHEUS_DIR / name).resolve()) for name in config["rule_files"]]
    assert sorted(Path(p) for p in config["rule_files"]) == RULE_FILES, "ship every rule file"
    (alertmanagers,) = config["alerting"]["alertmanagers"]
    alertmanagers["static_configs"] = [{"targets": [alertmanager_url.removeprefix("http://")]}]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "mcn-exporter"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{exporter_port}"]}]
    return config


def alertmanager_config(receiver_url: str) -> dict[str, Any]:
    config: dict[str, Any] = load_yaml(PROMETHEUS_DIR / "alertmanager.yml")
    for receiver in config["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            path = webhook["url"].split("/", 3)[3]
            webhook["url"] = f"{receiver_url}/{path}"
    return config


def backfill_baseline(data_dir: Path, now: float) -> None:
    """Write account:mcn_calls_missed:rate1h for the hour around this time 1, 2 and 3 days ago."""
    lines = ["# TYPE account:mcn_calls_missed:rate1h gauge"]
    for account, rate in sorted(BASELINE.items()):
        for days in (3, 2, 1):
            centre = now - days * 86400 + 1800  # read through `offset 23h30m` and so on
            start = int(centre - 3600)
            for ts in range(start, start + 2 * 3600, 15):
                lines.append(f'account:mcn_calls_missed:rate1h{{account="{account}"}} {rate} {ts}')
    lines.append("# EOF")
    data_dir.mkdir(parents=True, exist_ok=True)
    source = data_dir.parent / "baseline.om"
    source.write_text("\n".join(lines) + "\n")
    done = run(
        [
            require_tool("promtool"),
            "tsdb",
            "create-blocks-from",
            "openmetrics",
            str(source),
            str(data_dir),
        ]
    )
    assert done.returncode == 0, done.stdout + done.stderr


def post_webhook(url: str, body: dict[str, Any]) -> int:
    request = urllib.request.Request(
        url + "/webhook", data=json.dumps(body).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code


def spike_alert(receiver: AlertReceiver) -> tuple[str, dict[str, Any]] | None:
    for path, alert in receiver.alerts():
        labels = alert["labels"]
        if labels.get("alertname") == "MCNMissedCallSpike" and labels.get("account") == str(SPIKE):
            return path, alert
    return None


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    for tool in ("prometheus", "promtool"):
        require_tool(tool)
    workdir = tmp_path_factory.mktemp("e2e")
    config_path = workdir / "exporter.yaml"
    config_path.write_text(yaml.safe_dump(exporter_config(workdir)))

    with ExitStack() as stack:
        receiver = stack.enter_context(start_alert_receiver())
        exporter = ServerProcess(config_path, workers=2)
        stack.callback(_stop_exporter, exporter)
        exporter.start()

        backfill_baseline(workdir / "prometheus" / "data", time.time())
        alertmanager = stack.enter_context(
            start_alertmanager(alertmanager_config(receiver.url), workdir / "alertmanager")
        )
        prometheus = stack.enter_context(
            start_prometheus(
                prometheus_config(exporter.port, alertmanager.url), workdir / "prometheus"
            )
        )
        wait_until(
            "Prometheus to scrape the exporter",
            lambda: prometheus.query('up{job="mcn-exporter"} == 1'),
            timeout=60,
        )

        # One request with a wrong secret: shown on the health dashboard, far below the alert.
        assert (
            post_webhook(
                exporter.url,
                {
                    "event_type": "onInCallingStart",
                    "account_id": NORMAL,
                    "secret": "wrong",
                    "abon": "101",
                },
            )
            == 401
        )

        started_at = time.time()
        simulators: dict[int, subprocess.Popen[str]] = {}
        for account, (calls, rate, missed_ratio) in TRAFFIC.items():
            simulators[account] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "exporter",
                    "simulate",
                    "--url",
                    exporter.url + "/webhook",
                    "--config",
                    str(simulator_config(workdir, account)),
                    "--calls",
                    str(calls),
                    "--rate",
                    str(rate),
                    "--seed",
                    str(account),
                    "--concurrency",
                    "8",
                    "--missed-ratio",
                    str(missed_ratio),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            stack.callback(_stop, simulators[account])

        def arrived() -> tuple[str, dict[str, Any]] | None:
            for program in (prometheus.program, alertmanager.program):
                assert program.running(), f"{program.name} died:\n{program.log()}"
            return spike_alert(receiver)

        try:
            alert = wait_until("MCNMissedCallSpike at the receiver", arrived, ALERT_TIMEOUT, 1.0)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{diagnostics(prometheus, receiver)}") from None

        truth = {}
        for account, simulator in simulators.items():
            out, err = simulator.communicate(timeout=180)
            assert simulator.returncode == 0, err
            truth[account] = json.loads(out)
        yield Scenario(prometheus, receiver, exporter.url, started_at, alert, truth)


def _stop_exporter(exporter: ServerProcess) -> None:
    if exporter.process is not None and exporter.process.poll() is None:
        exporter.stop()


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.communicate()


def diagnostics(prometheus: Prometheus, receiver: AlertReceiver) -> str:
    parts = []
    for expr in (
        "account:mcn_calls_missed:increase10m",
        "600 * account:mcn_calls_missed:rate1h_baseline",
        "ALERTS",
    ):
        try:
            parts.append(f"{expr}: {prometheus.query(expr)}")
        except AssertionError as error:
            parts.append(str(error))
    parts.append(f"received: {receiver.alerts()}")
    parts.append(f"prometheus log: {prometheus.program.log()}")
    return "\n".join(parts)


# -- alerts ------------------------------------------------------------------------------------


def test_missed_call_spike_reaches_the_oncall_receiver(scenario: Scenario) -> None:
    path, alert = scenario.spike_alert
    assert path == "/mcn-oncall", "severity=critical routes to the mcn-oncall receiver"
    assert alert["status"] == "firing"
    assert alert["labels"] == {
        "alertname": "MCNMissedCallSpike",
        "account": str(SPIKE),
        "severity": "critical",
    }
    annotations = alert["annotations"]
    assert annotations["summary"] == f"Missed-call spike on account {SPIKE}"
    # Judged against the backfilled baseline (12 in 10 minutes), not the no-history fallback.
    match = re.fullmatch(
        rf"(\d+) inbound calls were missed on account {SPIKE} in the last 10 minutes, "
        r"against about (\d+) usually at this time of day\.",
        annotations["description"],
    )
    assert match, annotations["description"]
    assert int(match[2]) == round(600 * BASELINE[SPIKE])
    assert int(match[1]) > 3 * int(match[2])
    assert annotations["runbook_url"].endswith("docs/runbooks.md#mcnmissedcallspike")


def test_normal_traffic_raises_no_alert(scenario: Scenario) -> None:
    # The main office's traffic ran as long as the spike; its missed calls passed the minimum
    # volume, so only the baseline kept it quiet.
    missed = scenario.prometheus.query(
        f'account:mcn_calls_missed:increase10m{{account="{NORMAL}"}}'
    )
    assert missed, "no missed calls recorded for the main office"
    assert float(missed[0]["value"][1]) >= 10, missed
    received = [(path, alert["labels"]) for path, alert in scenario.receiver.alerts()]
    assert all(labels.get("account") == str(SPIKE) for _, labels in received), received
    assert {labels["alertname"] for _, labels in received} == {"MCNMissedCallSpike"}, received
    # No alert of the main office was ever even pending, in any evaluation since the start.
    window = int(time.time() - scenario.started_at) + 60
    history = scenario.prometheus.query(f'count_over_time(ALERTS{{account="{NORMAL}"}}[{window}s])')
    assert history == [], history
    # And nothing about the exporter itself (down, rejected webhooks, expiring calls).
    others = scenario.prometheus.query('ALERTS{account=""}')
    assert others == [], others


def test_every_shipped_rule_evaluates_without_error(scenario: Scenario) -> None:
    answer = scenario.prometheus.api("rules")
    rules = [rule for group in answer["data"]["groups"] for rule in group["rules"]]
    assert len(rules) == len(shipped_rules())
    failing = [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"]
    assert failing == []


def test_simulated_missed_calls_are_what_prometheus_counts(scenario: Scenario) -> None:
    """Prometheus sees the simulator's ground truth: the counters behind every rule are exact."""
    for account, truth in scenario.truth.items():
        expected = sum(
            sample["value"]
            for sample in truth["samples"]["mcn_calls_ended_total"]
            if sample["labels"]["account"] == str(account)
            and sample["labels"]["outcome"] == "missed"
        )
        query = f'sum(mcn_calls_ended_total{{account="{account}", outcome="missed"}})'
        deadline = time.monotonic() + 30
        while _value(scenario.prometheus.query(query)) != expected and time.monotonic() < deadline:
            time.sleep(1)
        assert _value(scenario.prometheus.query(query)) == expected, (account, expected)


def _value(result: list[dict[str, Any]]) -> float | None:
    return float(result[0]["value"][1]) if result else None


# -- dashboards --------------------------------------------------------------------------------


def label_values(prometheus: Prometheus, var: dict[str, Any], chosen: dict[str, str]) -> list[str]:
    """The values of a query variable, asked of Prometheus as Grafana would."""
    query = variable_query(var)
    match = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", query)
    assert match, f"{var['name']}: only label_values() queries are supported here: {query}"
    selector, label = match[1], match[2]
    params = {"match[]": substitute(selector, chosen)} if selector else {}
    answer = prometheus.api(f"label/{label}/values", **params)
    assert answer["status"] == "success", answer
    found = [value for value in answer["data"] if value]
    assert found, f"variable {var['name']} has no values ({query})"
    return found


def variable_values(
    prometheus: Prometheus, dashboard: dict[str, Any], chosen: dict[str, str]
) -> dict[str, list[str]]:
    """The values of every query variable."""
    return {
        name: label_values(prometheus, var, chosen)
        for name, var in variables(dashboard).items()
        if var["type"] == "query"
    }


def grafana_regex(values: list[str]) -> str:
    """Several values of a variable as Grafana writes them into a regex matcher."""
    escaped = [re.sub(r"[$^*{}\[\]'+?.()|\\]", r"\\\\\g<0>", value) for value in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def all_values(
    prometheus: Prometheus, dashboard: dict[str, Any], custom: dict[str, str]
) -> dict[str, str]:
    """Every query variable on "All": its allValue, or else all the values it finds, in order
    (a variable's query may use the variables before it)."""
    chosen = dict(custom)
    for name, var in variables(dashboard).items():
        if var["type"] == "query":
            all_value = var.get("allValue") or grafana_regex(label_values(prometheus, var, chosen))
            chosen[name] = all_value
    return chosen


def run_panel_queries(
    prometheus: Prometheus, dashboard: dict[str, Any], values: dict[str, str]
) -> list[str]:
    problems = []
    now = time.time()
    for panel in iter_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = substitute(target["expr"], {**GRAFANA_BUILTINS, **values})
            where = f"{dashboard['uid']} / {panel['title']!r} / {target['refId']} ({values})"
            if target.get("instant"):
                answer = prometheus.api("query", query=expr, time=f"{now:.3f}")
            else:
                answer = prometheus.api(
                    "query_range", query=expr, start=f"{now - 180:.3f}", end=f"{now:.3f}", step="5"
                )
            if answer.get("status") != "success":
                problems.append(f"{where}: {answer.get('error')}\n  {expr}")
            elif answer.get("warnings"):
                problems.append(f"{where}: warnings {answer['warnings']}\n  {expr}")
            elif not answer["data"]["result"]:
                problems.append(f"{where}: no data\n  {expr}")
    return problems


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_every_dashboard_query_returns_data(scenario: Scenario, path: Path) -> None:
    dashboard = load_dashboard(path)
    custom = {
        name: var["current"]["value"]
        for name, var in variables(dashboard).items()
        if var["type"] == "custom"
    }
    # As opened: every query variable on "All".
    every = all_values(scenario.prometheus, dashboard, custom)
    if "job" in every:
        # All jobs are the exporter's, not every job of Prometheus (up and scrape_* have them all).
        assert every["job"] == "mcn-exporter", every["job"]
    problems = run_panel_queries(scenario.prometheus, dashboard, every)
    # Then each account in turn, with its first extension where the dashboard has that variable.
    for account in (str(NORMAL), str(SPIKE)):
        chosen = {**every, "account": account}
        found = variable_values(scenario.prometheus, dashboard, chosen)
        assert account in found["account"]
        for name in found:
            if name != "account":
                chosen[name] = found[name][0]
        problems += run_panel_queries(scenario.prometheus, dashboard, chosen)
    assert problems == [], "\n".join(problems)
