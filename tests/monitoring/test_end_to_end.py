"""End to end: the exporter under gunicorn, a real Prometheus on the shipped prometheus.yml and
rules, a real Alertmanager on the shipped alertmanager.yml, and `mcn-exporter simulate` traffic.

Three accounts send traffic at the same time, for about three minutes. Each has opening hours
(in UTC), and the exporter settles a caller's call 4 s after its last leg, so that the missed
callers whom the simulator calls back at the end of its run are called back within the test:
- account 10123 ("Main office"): open now; normal traffic of a quiet office, 2% of inbound calls
  unanswered. No alert may arrive for it, nor may any of its alerts ever become even pending.
- account 20456 ("Branch"): open now; a spike, 90% of inbound calls unanswered.
  MCNMissedCallSpike must arrive at the critical receiver with its labels and annotations.
- account 30789 ("Shop"): usually open at this time, but today (and tomorrow) is a closed day of
  its calendar; the same flood of missed callers as the branch's. They count as after-hours
  demand: no page (MCNMissedCallSpike never even pending), MCNAfterHoursDemand at info level.

What the test changes in the shipped files, and nothing else:
- prometheus.yml: scrape and evaluation intervals of 1 s (as the acceptance asks), the exporter's
  and Alertmanager's addresses, and the rule file paths made absolute;
- alertmanager.yml: the webhook URLs point at the test's receiver (same paths).
The rules are loaded as shipped, `for:` durations included. A fresh Prometheus has no history at
this time of day, so the test first backfills (promtool tsdb create-blocks-from openmetrics) the
recorded series account:mcn_inbound_calls_missed:rate1h (missed callers per second while open) of
the three previous days around this time, as Prometheus would have recorded it then: the spike is
then judged against a real baseline, as in production. Each account's baseline is what its normal
traffic produces; the shop's flood is more than three times its own, so only its closed day keeps
it from paging.

Then every query of every dashboard panel, with its variables substituted, is sent to this
Prometheus and must succeed and return data, the caller panels included (missed callers called
back, the longest wait, the time to call back).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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

NORMAL, SPIKE, CLOSED = 10123, 20456, 30789
ACCOUNTS = (NORMAL, SPIKE, CLOSED)
SECRETS = {NORMAL: "MainOfficeSecret", SPIKE: "BranchSecret", CLOSED: "ShopSecret"}
NAMES = {NORMAL: "Main office", SPIKE: "Branch", CLOSED: "Shop"}
EXTENSIONS = {
    NORMAL: {"101": "Reception", "102": "Sales", "103": "Support", "104": "Billing"},
    SPIKE: {"201": "Front desk", "202": "Nurse", "203": "Doctor"},
    CLOSED: {"301": "Counter", "302": "Workshop"},
}
# Traffic: (calls, events per second, share of inbound calls missed). About 3.2 events a call,
# so each runs for about 2 to 2.5 minutes. The simulator sends the missed calls it follows up
# first, and the follow-ups (call-backs, calls again) last, once those have settled. At 2%, the main
# office's 250 calls hold 14 missed callers (ring groups nobody answers, hunt groups, withheld
# numbers and callers who call again included), some 8% of its callers, and about 15% at most
# once 20 callers have called (far from MCNHighMissedRatio's 25%): what a quiet office misses.
TRAFFIC = {NORMAL: (250, 5.0, 0.02), SPIKE: (250, 6.0, 0.9), CLOSED: (100, 3.0, 0.9)}
# The backfilled baseline, missed callers per second while open at this time of day on previous
# days: about what the normal traffic above produces for the main office (14 callers in 2.5
# minutes = 0.09/s), and 0.02/s (12 in 10 minutes) for the small branch office and shop.
BASELINE = {NORMAL: 0.1, SPIKE: 0.02, CLOSED: 0.02}
ALERT_TIMEOUT = 330.0
# callers: a missed caller's call settles (and the simulator calls them back) 4 s after its last
# leg; the next leg of a hunt group joins the call when it starts within 3 s of the previous
# leg's end. The simulator sends one call's events about --concurrency / --rate apart, plus a
# ring pause of up to 0.2 s: about 1.2 s, well within that window on a loaded machine.
CALLERS = {"settle": "4s", "group_window": "3s"}


@dataclass
class Scenario:
    prometheus: Prometheus
    receiver: AlertReceiver
    exporter_url: str
    started_at: float
    spike_alert: tuple[str, dict[str, Any]]
    truth: dict[int, dict[str, Any]] = field(default_factory=dict)


def opening_hours(now: float) -> dict[int, dict[str, Any]]:
    """Every account open every day all day; the shop closed today and tomorrow (UTC), so that
    it stays closed however long the test runs, even across midnight."""
    every_day = {"timezone": "UTC", "open": {"mon-sun": "00:00-24:00"}}
    today = datetime.fromtimestamp(now, UTC).date()
    closed = [str(today), str(today + timedelta(days=1))]
    return {
        NORMAL: every_day,
        SPIKE: every_day,
        CLOSED: {**every_day, "holidays": {"closed": closed}},
    }


def exporter_config(workdir: Path, now: float) -> dict[str, Any]:
    hours = opening_hours(now)
    return {
        "server": {"workers": 2},
        "accounts": [
            {
                "id": account,
                "secret": SECRETS[account],
                "name": NAMES[account],
                "hours": hours[account],
            }
            for account in ACCOUNTS
        ],
        "extensions": {str(account): exts for account, exts in EXTENSIONS.items()},
        "store": {"path": str(workdir / "calls.sqlite3")},
        # The simulator reads these too: its call-backs wait for callers.settle.
        "callers": CALLERS,
    }


def simulator_config(workdir: Path, account: int, now: float) -> Path:
    """A config listing one account: simulate sends traffic for the accounts it lists."""
    document = exporter_config(workdir, now)
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
    """Write account:mcn_inbound_calls_missed:rate1h for the hour around this time 1, 2 and 3
    days ago (each account was open then)."""
    series = "account:mcn_inbound_calls_missed:rate1h"
    lines = [f"# TYPE {series} gauge"]
    for account, rate in sorted(BASELINE.items()):
        for days in (3, 2, 1):
            centre = now - days * 86400 + 1800  # read through `offset 23h30m` and so on
            start = int(centre - 3600)
            for ts in range(start, start + 2 * 3600, 15):
                lines.append(f'{series}{{account="{account}"}} {rate} {ts}')
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


def received(
    receiver: AlertReceiver, alertname: str, account: int
) -> tuple[str, dict[str, Any]] | None:
    for path, alert in receiver.alerts():
        labels = alert["labels"]
        if labels.get("alertname") == alertname and labels.get("account") == str(account):
            return path, alert
    return None


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    for tool in ("prometheus", "promtool"):
        require_tool(tool)
    workdir = tmp_path_factory.mktemp("e2e")
    now = time.time()
    config_path = workdir / "exporter.yaml"
    config_path.write_text(yaml.safe_dump(exporter_config(workdir, now)))

    with ExitStack() as stack:
        receiver = stack.enter_context(start_alert_receiver())
        exporter = ServerProcess(config_path, workers=2)
        stack.callback(_stop_exporter, exporter)
        exporter.start()

        backfill_baseline(workdir / "prometheus" / "data", now)
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
                    str(simulator_config(workdir, account, now)),
                    "--calls",
                    str(calls),
                    "--rate",
                    str(rate),
                    "--seed",
                    str(account),
                    "--concurrency",
                    str(max(2, round(rate))),
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
            return received(receiver, "MCNMissedCallSpike", SPIKE)

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
        "account:mcn_inbound_calls_missed:increase10m",
        "600 * account:mcn_inbound_calls_missed:rate1h_baseline",
        "account:mcn_inbound_calls_missed:ratio_rate1h",
        "account:mcn_open:max",
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
        rf"(\d+) callers were not answered on account {SPIKE} in the last 10 minutes, "
        r"against about (\d+) usually at this time of day\.",
        annotations["description"],
    )
    assert match, annotations["description"]
    assert int(match[2]) == round(600 * BASELINE[SPIKE])
    assert int(match[1]) > 3 * int(match[2])
    assert annotations["runbook_url"].endswith("docs/runbooks.md#mcnmissedcallspike")


def test_normal_traffic_raises_no_alert(scenario: Scenario) -> None:
    # The main office's traffic ran as long as the spike; its missed callers passed the minimum
    # volume, so only the baseline kept it quiet.
    missed = scenario.prometheus.query(
        f'account:mcn_inbound_calls_missed:increase10m{{account="{NORMAL}"}}'
    )
    assert missed, "no missed callers recorded for the main office"
    assert float(missed[0]["value"][1]) >= 10, missed
    alerts = [(path, alert["labels"]) for path, alert in scenario.receiver.alerts()]
    expected = {(str(SPIKE), "MCNMissedCallSpike"), (str(CLOSED), "MCNAfterHoursDemand")}
    got = {(labels.get("account"), labels["alertname"]) for _, labels in alerts}
    assert got <= expected, alerts
    # No alert of the main office was ever even pending, in any evaluation since the start.
    window = int(time.time() - scenario.started_at) + 60
    history = scenario.prometheus.query(f'count_over_time(ALERTS{{account="{NORMAL}"}}[{window}s])')
    assert history == [], history
    # And nothing about the exporter itself (down, rejected webhooks, expiring calls).
    others = scenario.prometheus.query('ALERTS{account=""}')
    assert others == [], others


def test_a_flood_of_missed_callers_on_a_closed_day_pages_nobody(scenario: Scenario) -> None:
    prometheus = scenario.prometheus
    open_now = {
        sample["metric"]["account"]: float(sample["value"][1])
        for sample in prometheus.query("account:mcn_open:max")
    }
    assert open_now == {str(NORMAL): 1.0, str(SPIKE): 1.0, str(CLOSED): 0.0}
    # The flood arrived and was counted: more missed callers than would page an open branch...
    flood = _value(
        prometheus.query(
            f'sum(mcn_inbound_calls_total{{account="{CLOSED}", outcome="missed", period="closed"}})'
        )
    )
    assert flood is not None
    assert flood >= 3 * 600 * BASELINE[CLOSED], flood
    # ... but none of them as an open-hours missed caller.
    during_open = prometheus.query(
        f'sum(mcn_inbound_calls_total{{account="{CLOSED}", period="open"}})'
    )
    assert _value(during_open) == 0, during_open
    # Information at the team's receiver, never a page.
    path, alert = wait_until(
        "MCNAfterHoursDemand at the receiver",
        lambda: received(scenario.receiver, "MCNAfterHoursDemand", CLOSED),
        timeout=120,
    )
    assert path == "/mcn-team", "severity=info routes to the mcn-team receiver"
    assert alert["labels"] == {
        "alertname": "MCNAfterHoursDemand",
        "account": str(CLOSED),
        "severity": "info",
    }
    assert alert["annotations"]["runbook_url"].endswith("docs/runbooks.md#mcnafterhoursdemand")
    # No other alert of the shop was ever even pending, in any evaluation since the start.
    window = int(time.time() - scenario.started_at) + 60
    history = prometheus.query(
        f'count_over_time(ALERTS{{account="{CLOSED}", alertname!="MCNAfterHoursDemand"}}'
        f"[{window}s])"
    )
    assert history == [], history
    pages = [
        (path, alert["labels"])
        for path, alert in scenario.receiver.alerts()
        if alert["labels"].get("account") == str(CLOSED) and path == "/mcn-oncall"
    ]
    assert pages == []


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


def test_simulated_callers_are_what_prometheus_counts(scenario: Scenario) -> None:
    """Prometheus sees the simulator's ground truth of the caller level, missed callers called
    back included."""
    expected = {
        (account, name): _by_labels(
            (sample["labels"], sample["value"])
            for sample in samples
            if sample["labels"]["account"] == str(account)
        )
        for account, truth in scenario.truth.items()
        for name, samples in truth["callers"]["samples"].items()
    }

    def differences() -> list[str]:
        found = {
            (account, name): _by_labels(
                (sample["metric"], float(sample["value"][1]))
                for sample in scenario.prometheus.query(f'{name}{{account="{account}"}}')
            )
            for account, name in expected
        }
        return [
            f"{key}: Prometheus {found[key]}, truth {expected[key]}"
            for key in sorted(expected)
            if found[key] != expected[key]
        ]

    deadline = time.monotonic() + 30
    while differences() and time.monotonic() < deadline:
        time.sleep(1)
    assert differences() == [], "\n".join(differences())
    called_back = 0.0
    for truth in scenario.truth.values():
        called_back += sum(
            sample["value"]
            for sample in truth["callers"]["samples"]["mcn_missed_callers_resolved_total"]
            if sample["labels"]["resolution"] == "called_back"
        )
    assert called_back > 0, "no missed caller was called back"


def _by_labels(
    samples: Iterable[tuple[dict[str, str], float]],
) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples by their labels (without Prometheus's own), zeros left out: the truth lists only
    what moved, the exporter every configured series. An empty label is no label, as in
    Prometheus (line="" for calls without a company line)."""
    ignored = ("__name__", "job", "instance")
    return {
        tuple(sorted((k, v) for k, v in labels.items() if k not in ignored and v)): value
        for labels, value in samples
        if value != 0
    }


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


def share_of_open_hours_callers(expr: str) -> bool:
    """A share of the callers who called while open. On an account's closed day there are none,
    so it has no value: Grafana shows "No data", not a misleading 0%."""
    return re.search(r'/ \(sum\(.*period="open"[^/]*> 0\)$', expr) is not None


def run_panel_queries(
    prometheus: Prometheus,
    dashboard: dict[str, Any],
    values: dict[str, str],
    may_be_empty: Callable[[str], bool] | None = None,
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
            elif not answer["data"]["result"] and not (may_be_empty and may_be_empty(expr)):
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
    for account in map(str, ACCOUNTS):
        chosen = {**every, "account": account}
        found = variable_values(scenario.prometheus, dashboard, chosen)
        assert account in found["account"]
        for name in found:
            if name != "account":
                chosen[name] = found[name][0]
        closed_today = share_of_open_hours_callers if account == str(CLOSED) else None
        problems += run_panel_queries(scenario.prometheus, dashboard, chosen, closed_today)
    assert problems == [], "\n".join(problems)
