"""The shipped Prometheus rules and example configs, checked by the real tools (promtool,
amtool) and against the contract: the metric names of the README, runbooks, and a firing and a
silent case per alert."""

from __future__ import annotations

import json
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.monitoring.conftest import (
    DASHBOARD_FILES,
    PROMETHEUS_DIR,
    PROMTOOL_TESTS,
    REPO,
    RULE_FILES,
    RUNBOOKS,
    Alertmanager,
    http_json,
    iter_panels,
    load_dashboard,
    load_yaml,
    require_tool,
    run,
    shipped_alerts,
    shipped_rules,
    start_alert_receiver,
    start_alertmanager,
    variable_query,
    variables,
    wait_until,
)
from tests.monitoring.test_dashboards import annotation_queries

# The README's "Metrics": the exporter's metrics (names are fixed), and the samples they expose.
SPEC_METRICS = {
    "mcn_active_calls": "gauge",
    "mcn_calls_started_total": "counter",
    "mcn_calls_ended_total": "counter",
    "mcn_call_ring_seconds": "histogram",
    "mcn_call_talk_seconds": "histogram",
    "mcn_webhook_events_total": "counter",
    "mcn_webhook_rejected_total": "counter",
    "mcn_call_events_unmatched_total": "counter",
    "mcn_last_event_timestamp_seconds": "gauge",
    "mcn_extension_overflow_total": "counter",
    "mcn_extension_info": "gauge",
    "mcn_exporter_build_info": "gauge",
    # Callers (every leg rung for one caller's call), call-backs and opening hours.
    "mcn_inbound_calls_total": "counter",
    "mcn_inbound_call_wait_seconds": "histogram",
    "mcn_inbound_calls_ringing": "gauge",
    "mcn_missed_callers_waiting": "gauge",
    "mcn_missed_callers_oldest_wait_seconds": "gauge",
    "mcn_missed_callers_oldest_wait_wall_seconds": "gauge",
    "mcn_missed_callers_resolved_total": "counter",
    "mcn_callback_seconds": "histogram",
    "mcn_repeat_missed_calls_total": "counter",
    "mcn_callback_attempts_total": "counter",
    "mcn_open": "gauge",
    "mcn_open_next_change_timestamp_seconds": "gauge",
}
SPEC_SAMPLES = {
    f"{name}{suffix}"
    for name, kind in SPEC_METRICS.items()
    for suffix in (("_bucket", "_count", "_sum") if kind == "histogram" else ("",))
}
SEVERITIES = {"critical", "warning", "info"}
RUNBOOK_BASE = "https://github.com/mcn-exporter/mcn-exporter/blob/main/docs/runbooks.md#"


def test_promtool_check_rules_is_clean() -> None:
    promtool = require_tool("promtool")
    assert RULE_FILES, "no rule files shipped"
    done = run([promtool, "check", "rules", *map(str, RULE_FILES)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(RULE_FILES), done.stdout
    assert "WARNING" not in done.stdout + done.stderr


def test_promtool_test_rules_passes() -> None:
    promtool = require_tool("promtool")
    assert PROMTOOL_TESTS, "no promtool test files"
    done = run([promtool, "test", "rules", *map(str, PROMTOOL_TESTS)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(PROMTOOL_TESTS), done.stdout


def test_promtool_tests_load_the_shipped_rules() -> None:
    recording = PROMETHEUS_DIR / "rules" / "mcn-exporter-recording.yml"
    for path in PROMTOOL_TESTS:
        loaded = {(path.parent / name).resolve() for name in load_yaml(path)["rule_files"]}
        assert loaded <= set(RULE_FILES), path
        assert recording in loaded, f"{path.name}: the alerts read the recorded series"


def _alert_tests() -> dict[str, list[tuple[dict[str, Any], dict[str, Any]]]]:
    """alertname -> [(test group, alert_rule_test case)] over every promtool test file."""
    cases: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for path in PROMTOOL_TESTS:
        for group in load_yaml(path)["tests"]:
            for case in group.get("alert_rule_test", []):
                cases.setdefault(case["alertname"], []).append((group, case))
    return cases


IDENTITY = ("account", "extension", "instance", "job")


def _series_identities(group: dict[str, Any]) -> set[tuple[tuple[str, str], ...]]:
    identities = set()
    for series in group["input_series"]:
        labels = dict(re.findall(r'(\w+)="([^"]*)"', series["series"]))
        identities.add(tuple((key, labels[key]) for key in IDENTITY if key in labels))
    return identities


@pytest.mark.parametrize("alert", [a["alert"] for a in shipped_alerts()])
def test_every_alert_is_tested_firing_and_silent(alert: str) -> None:
    cases = _alert_tests().get(alert, [])
    firing = [(group, case) for group, case in cases if case["exp_alerts"]]
    assert firing, f"{alert}: no promtool case where it fires"
    # Silent: an evaluation where it must not fire at all, or input series (an account, an
    # extension, an instance) that are in a test where it fires but are not among the alerts.
    # promtool compares the whole list of alerts, so those series are checked to stay silent.
    silent: list[object] = [case for _, case in cases if not case["exp_alerts"]]
    for group, case in firing:
        fired = {
            tuple((k, str(v)) for k, v in sorted(alert_case["exp_labels"].items()) if k in IDENTITY)
            for alert_case in case["exp_alerts"]
        }
        quiet = [
            identity
            for identity in _series_identities(group)
            if not any(set(f) <= set(identity) for f in fired)
        ]
        silent += quiet
    assert silent, f"{alert}: no promtool case where it stays silent"


@pytest.mark.parametrize("rule", shipped_alerts(), ids=lambda r: r["alert"])
def test_every_alert_has_severity_summary_description_and_runbook(rule: dict[str, Any]) -> None:
    assert re.fullmatch(r"MCN[A-Z][A-Za-z]+", rule["alert"])
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    for key in ("summary", "description", "runbook_url"):
        assert annotations.get(key, "").strip(), f"{rule['alert']}: no {key}"
    assert annotations["runbook_url"] == RUNBOOK_BASE + rule["alert"].lower()
    assert "for" in rule, f"{rule['alert']}: say how long it must hold (for:)"


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_every_runbook_url_has_its_section_in_docs_runbooks() -> None:
    text = RUNBOOKS.read_text()
    anchors = github_anchors(text)
    sections = re.split(r"^## ", text, flags=re.MULTILINE)
    for rule in shipped_alerts():
        anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert anchor in anchors, f"docs/runbooks.md has no section for {rule['alert']}"
        (section,) = [s for s in sections if s.startswith(rule["alert"] + "\n")]
        assert "What it means" in section, rule["alert"]
        assert "What to check first" in section, rule["alert"]


def _names_in(expr: str) -> set[str]:
    expr = re.sub(r"#[^\n]*", "", expr)  # comments
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, templates)
    return set(re.findall(r"\b(?:[a-z_]+:[a-z0-9_]+:[a-z0-9_]+|mcn_[a-z_]+)\b", expr))


def _referenced_expressions(with_variables: bool = True) -> list[tuple[str, str]]:
    found = [
        (f"{r['_file']} {r.get('record') or r.get('alert')}", r["expr"]) for r in shipped_rules()
    ]
    for path in DASHBOARD_FILES:
        dashboard = load_dashboard(path)
        for panel in iter_panels(dashboard["panels"]):
            found += [(f"{path.name} {panel['title']}", t["expr"]) for t in panel["targets"]]
        found += [(f"{path.name} annotation", expr) for expr in annotation_queries(dashboard)]
        for var in variables(dashboard).values():
            # label_values() of a variable lists distinct values: replicas do not matter there.
            if var["type"] == "query" and with_variables:
                found.append((f"{path.name} ${var['name']}", variable_query(var)))
    return found


def test_rules_and_dashboards_use_only_spec_metrics_and_recorded_series() -> None:
    recorded = {rule["record"] for rule in shipped_rules() if "record" in rule}
    unknown = [
        (where, name)
        for where, expr in _referenced_expressions()
        for name in _names_in(expr)
        if name not in SPEC_SAMPLES and name not in recorded
    ]
    assert unknown == []


# Replicas sharing one call store all expose these the same (read at slightly different moments).
SHARED_METRICS = {
    "mcn_active_calls",
    "mcn_calls_started_total",
    "mcn_calls_ended_total",
    "mcn_call_ring_seconds",
    "mcn_call_talk_seconds",
    "mcn_webhook_events_total",
    "mcn_call_events_unmatched_total",
    "mcn_last_event_timestamp_seconds",
    "mcn_extension_overflow_total",
    "mcn_inbound_calls_total",
    "mcn_inbound_call_wait_seconds",
    "mcn_inbound_calls_ringing",
    "mcn_missed_callers_waiting",
    "mcn_missed_callers_oldest_wait_seconds",
    "mcn_missed_callers_oldest_wait_wall_seconds",
    "mcn_missed_callers_resolved_total",
    "mcn_callback_seconds",
    "mcn_repeat_missed_calls_total",
    "mcn_callback_attempts_total",
    # Computed from the shared configuration's calendar: the same on every replica.
    "mcn_open",
    "mcn_open_next_change_timestamp_seconds",
}
# Each replica has its own: summed over the replicas (rejections), or per replica.
PER_REPLICA_METRICS = {
    "mcn_webhook_rejected_total",
    "mcn_exporter_build_info",
    "mcn_extension_info",
}
SHARED_SAMPLES = {
    sample
    for sample in SPEC_SAMPLES
    if re.sub(r"_(bucket|count|sum)$", "", sample) in SHARED_METRICS
}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
AGGREGATIONS |= {"bottomk", "topk", "quantile"}
COUNTER_FUNCTIONS = {"rate", "irate", "increase", "resets"}


@dataclass(frozen=True)
class Call:
    """A function or aggregation whose parentheses enclose a point of a PromQL expression."""

    name: str  # "" for plain parentheses
    grouping: str  # "by", "without" or ""
    labels: frozenset[str]


def _blank(expr: str) -> str:
    """expr with the insides of strings and comments blanked, every position kept."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', lambda m: '"' + " " * (len(m[0]) - 2) + '"', expr)
    return re.sub(r"#[^\n]*", lambda m: " " * len(m[0]), expr)


def _call_opening_at(expr: str, opening: int) -> Call:
    before = expr[:opening]
    grouped = re.search(r"(\w+)\s*(by|without)\s*\(([^()]*)\)\s*$", before)
    if grouped:
        return Call(grouped[1], grouped[2], frozenset(re.findall(r"\w+", grouped[3])))
    named = re.search(r"(\w+)\s*$", before)
    name = named[1] if named else ""
    depth, closing = 0, opening
    for closing in range(opening, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[closing], 0)
        if depth == 0:
            break
    trailing = re.match(r"\s*(by|without)\s*\(([^()]*)\)", expr[closing + 1 :])
    if name in AGGREGATIONS and trailing:
        return Call(name, trailing[1], frozenset(re.findall(r"\w+", trailing[2])))
    return Call(name, "", frozenset())


def enclosing_calls(expr: str, position: int) -> list[Call]:
    """The calls around expr[position], innermost first."""
    calls, depth = [], 0
    for index in range(position - 1, -1, -1):
        if expr[index] == ")":
            depth += 1
        elif expr[index] == "(":
            if depth:
                depth -= 1
            else:
                calls.append(_call_opening_at(expr, index))
    return calls


def _collapses_instances(call: Call) -> bool:
    if call.grouping == "without":
        return "instance" in call.labels
    return "instance" not in call.labels


def replica_faults(expr: str) -> list[str]:
    """Why expr would count a total of the shared store once per replica, or worse.

    Every selector of a shared metric must first meet, outside any rate()/increase() around it,
    a max() that drops instance (`max without (instance)`, or `max by (...)` without it), and no
    rate()/increase() may be taken of that max (a dying replica would make it dip: a reset)."""
    blanked = _blank(expr)
    faults = []
    for found in re.finditer(r"(?<![\w:])(mcn_[a-z_]+)\b", blanked):
        if found[1] not in SHARED_SAMPLES:
            continue
        calls = enclosing_calls(blanked, found.start())
        aggregations = [i for i, call in enumerate(calls) if call.name in AGGREGATIONS]
        if not aggregations:
            faults.append(f"{found[1]}: one series per replica, not collapsed")
            continue
        first = calls[aggregations[0]]
        if first.name != "max" or not _collapses_instances(first):
            faults.append(f"{found[1]}: {first.name} over the replicas before collapsing them")
        outside = {call.name for call in calls[aggregations[0] + 1 :]}
        if outside & COUNTER_FUNCTIONS:
            faults.append(f"{found[1]}: rate() or increase() of a max over the replicas")
    return faults


@pytest.mark.parametrize(
    ("expr", "faults"),
    [
        ("sum by (account) (max without (instance) (rate(mcn_calls_started_total[5m])))", 0),
        ('max by (account) (mcn_last_event_timestamp_seconds{job="x"} > 0)', 0),
        (
            "histogram_quantile(0.5, sum by (le) (max without (instance, pod) ("
            "rate(mcn_call_ring_seconds_bucket[5m]))))",
            0,
        ),
        ("sum(max(increase(mcn_calls_ended_total[1h])) by (account, outcome))", 0),
        ("sum(mcn_webhook_rejected_total) + sum(account:mcn_calls_started:rate5m)", 0),
        ('sum(rate(mcn_calls_ended_total{outcome=~"(missed)"}[5m]))', 1),
        ("sum by (account) (mcn_active_calls)", 1),
        ("mcn_active_calls", 1),
        ("max by (instance, account) (rate(mcn_calls_started_total[5m]))", 1),
        ("max without (job) (rate(mcn_calls_started_total[5m]))", 1),
        ("rate(max without (instance) (mcn_calls_started_total)[5m:])", 1),
        ("sum(max(mcn_calls_ended_total) by (instance))", 1),
        ("topk(3, sum by (le) (rate(mcn_call_talk_seconds_bucket[5m])))", 1),
    ],
)
def test_replica_faults_finds_totals_counted_per_replica(expr: str, faults: int) -> None:
    assert len(replica_faults(expr)) == faults, replica_faults(expr)


def test_every_metric_is_either_shared_or_per_replica() -> None:
    assert set(SPEC_METRICS) == SHARED_METRICS | PER_REPLICA_METRICS
    assert not SHARED_METRICS & PER_REPLICA_METRICS


def test_rules_and_dashboards_collapse_replicas_before_summing_shared_totals() -> None:
    """Several replicas on one store expose the same totals: counted once, whatever their number."""
    faults = [
        (where, fault)
        for where, expr in _referenced_expressions(with_variables=False)
        for fault in replica_faults(expr)
    ]
    assert faults == []


def test_recording_rule_names_follow_the_convention() -> None:
    for rule in shipped_rules():
        if "record" in rule:
            assert re.fullmatch(r"account(_extension|_le)?:mcn_[a-z_]+:[a-z0-9_]+", rule["record"])


def test_example_prometheus_config_is_valid_and_loads_every_rule_file() -> None:
    promtool = require_tool("promtool")
    path = PROMETHEUS_DIR / "prometheus.yml"
    done = run([promtool, "check", "config", str(path)])
    assert done.returncode == 0, done.stdout + done.stderr
    config = load_yaml(path)
    assert sorted((path.parent / name).resolve() for name in config["rule_files"]) == RULE_FILES
    assert [job["job_name"] for job in config["scrape_configs"]] == ["mcn-exporter"]
    alerts_job = {m for r in shipped_alerts() for m in re.findall(r'job="([^"]+)"', r["expr"])}
    assert alerts_job == {"mcn-exporter"}


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=MCNMissedCallSpike", "severity=critical", "account=1"], "mcn-oncall"),
        (["alertname=MCNExporterDown", "severity=critical"], "mcn-oncall"),
        (["alertname=MCNExporterReplicaDown", "severity=warning", "instance=a"], "mcn-team"),
        (["alertname=MCNWebhookFeedSilent", "severity=critical", "account=1"], "mcn-oncall"),
        (["alertname=MCNHighMissedRatio", "severity=warning", "account=1"], "mcn-team"),
        (["alertname=MCNWebhookUnauthorized", "severity=warning"], "mcn-team"),
        (["alertname=MCNMissedCallersWaiting", "severity=warning", "account=1"], "mcn-team"),
        # Information: to the team, never a page.
        (["alertname=MCNAfterHoursDemand", "severity=info", "account=1"], "mcn-team"),
    ],
)
def test_example_alertmanager_config_routes_by_severity(labels: list[str], receiver: str) -> None:
    amtool = require_tool("amtool")
    path = PROMETHEUS_DIR / "alertmanager.yml"
    checked = run([amtool, "check-config", str(path)])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    routed = run([amtool, "config", "routes", "test", f"--config.file={path}", *labels])
    assert routed.returncode == 0, routed.stdout + routed.stderr
    assert routed.stdout.split() == [receiver]


def test_every_severity_has_a_route_and_every_inhibited_alert_exists() -> None:
    config = load_yaml(PROMETHEUS_DIR / "alertmanager.yml")
    routed = {m for route in config["route"]["routes"] for m in route["matchers"]}
    assert {f'severity="{s}"' for s in SEVERITIES} <= routed
    names = {rule["alert"] for rule in shipped_alerts()}
    for inhibit in config["inhibit_rules"]:
        for matcher in inhibit["source_matchers"] + inhibit["target_matchers"]:
            match = re.fullmatch(r'alertname=~?"([^"]+)"', matcher)
            assert match, matcher
            assert set(match[1].split("|")) <= names, matcher


def _post_alerts(alertmanager: Alertmanager, alerts: list[dict[str, str]]) -> None:
    body = json.dumps([{"labels": labels} for labels in alerts]).encode()
    request = urllib.request.Request(
        f"{alertmanager.url}/api/v2/alerts",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


def _muted(alertmanager: Alertmanager) -> dict[str, bool]:
    """alertname -> whether Alertmanager inhibits it, over the alerts it holds."""
    alerts = http_json(f"{alertmanager.url}/api/v2/alerts")
    return {a["labels"]["alertname"]: bool(a["status"]["inhibitedBy"]) for a in alerts}


def test_one_replica_down_mutes_nothing_and_all_down_mutes_the_call_alerts(
    tmp_path: Path,
) -> None:
    """The example's inhibitions, by a real Alertmanager: a replica down of several leaves the
    call alerts (the other replicas still count the calls); the exporter down mutes them, and
    the replica warnings under it."""
    config = load_yaml(PROMETHEUS_DIR / "alertmanager.yml")
    with start_alert_receiver() as receiver:
        for route in config["receivers"]:
            for webhook in route.get("webhook_configs", []):
                webhook["url"] = f"{receiver.url}/{route['name']}"
        with start_alertmanager(config, tmp_path) as alertmanager:
            _check_inhibitions(alertmanager)


def _check_inhibitions(alertmanager: Alertmanager) -> None:
    job = {"job": "mcn-exporter"}
    replica_down = {"alertname": "MCNExporterReplicaDown", "severity": "warning", **job}
    _post_alerts(
        alertmanager,
        [
            {**replica_down, "instance": "a:9880"},
            {"alertname": "MCNMissedCallSpike", "severity": "critical", "account": "1"},
            {"alertname": "MCNCallsExpiring", "severity": "warning", "account": "1"},
        ],
    )
    held = {"MCNExporterReplicaDown", "MCNMissedCallSpike", "MCNCallsExpiring"}
    wait_until("the alerts", lambda: set(_muted(alertmanager)) == held, timeout=60)
    assert not any(_muted(alertmanager).values()), _muted(alertmanager)

    _post_alerts(alertmanager, [{"alertname": "MCNExporterDown", "severity": "critical", **job}])
    every = {**dict.fromkeys(held, True), "MCNExporterDown": False}
    wait_until("the inhibitions", lambda: _muted(alertmanager) == every, timeout=60)


def test_a_silent_feed_pages_once_for_all_accounts() -> None:
    """A network fault silences every account at once: their MCNWebhookFeedSilent share a group."""
    config = load_yaml(PROMETHEUS_DIR / "alertmanager.yml")
    (critical,) = [r for r in config["route"]["routes"] if r["matchers"] == ['severity="critical"']]
    (feed,) = [
        route
        for route in critical["routes"]
        if route["matchers"] == ['alertname="MCNWebhookFeedSilent"']
    ]
    assert feed["group_by"] == ["alertname"]
    assert "receiver" not in feed, "pages go where the other critical alerts go"


def test_docs_describe_every_alert_and_threshold() -> None:
    monitoring = (REPO / "docs" / "monitoring.md").read_text()
    for rule in shipped_alerts():
        assert rule["alert"] in monitoring, f"docs/monitoring.md does not mention {rule['alert']}"
    for path in RULE_FILES:
        assert f"prometheus/rules/{path.name}" in monitoring
