"""The shipped Grafana dashboards and provisioning files, checked for what makes them importable
and portable: stable uid, a datasource variable used everywhere and no datasource uid of ours, a
title and a unit on every panel, variables that exist, PromQL that parses (promtool).

That every query also returns data on real traffic is test_end_to_end.py's job."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.monitoring.conftest import (
    DASHBOARD_FILES,
    DASHBOARDS_DIR,
    GRAFANA_BUILTINS,
    PROVISIONING_DIR,
    REPO,
    iter_panels,
    load_dashboard,
    load_yaml,
    referenced_variables,
    require_tool,
    run,
    substitute,
    variable_query,
    variables,
)

# file -> uid: links and bookmarks point at the uid, so it never changes.
UIDS = {
    "mcn-calls-overview.json": "mcn-calls-overview",
    "mcn-exporter-health.json": "mcn-exporter-health",
}
REQUIRED_VARIABLES = {
    "mcn-calls-overview": {"datasource", "account", "extension"},
    "mcn-exporter-health": {"datasource", "account", "extension"},
}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Series Prometheus itself writes for every target it scrapes, whatever the job: up,
# scrape_duration_seconds, scrape_samples_scraped... A dashboard confines them to the exporter.
TARGET_SERIES = re.compile(r"\b(up|scrape_[a-z_]+)\b(\{[^}]*\})?")
# Grafana's value for "All" where a variable has no allValue: its discovered values, as a regex.
ALL_DISCOVERED = "(value-1|value-2)"
# Grafana's unit ids used here (a typo shows as a raw number in Grafana, so catch it).
UNITS = {"short", "none", "percentunit", "s", "cpm", "cps", "reqps", "ops"}
PANEL_TYPES = {"stat", "timeseries", "table", "bargauge", "state-timeline"}

dashboards = pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)


def annotation_queries(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL of the dashboard's Prometheus annotations (Grafana's built-in one has none)."""
    return [
        str(annotation["expr"])
        for annotation in dashboard.get("annotations", {}).get("list", [])
        if "expr" in annotation
    ]


def test_the_dashboards_are_shipped() -> None:
    assert sorted(p.name for p in DASHBOARD_FILES) == sorted(UIDS)


@dashboards
def test_identity_and_import_readiness(path: Path) -> None:
    dashboard = load_dashboard(path)
    assert dashboard["uid"] == UIDS[path.name]
    assert dashboard["id"] is None, "an id ties the JSON to one Grafana database"
    assert dashboard["title"].strip()
    assert dashboard["schemaVersion"] >= 36
    # Importable as it is: no __inputs / __requires of an "export for sharing externally".
    assert "__inputs" not in dashboard
    assert "__requires" not in dashboard
    assert "mcn-exporter" in dashboard["tags"]


@dashboards
def test_datasource_is_a_variable(path: Path) -> None:
    dashboard = load_dashboard(path)
    first = dashboard["templating"]["list"][0]
    assert first["name"] == "datasource"
    assert first["type"] == "datasource"
    assert first["query"] == "prometheus"
    assert REQUIRED_VARIABLES[dashboard["uid"]] <= set(variables(dashboard))
    for var in variables(dashboard).values():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE, var["name"]
            assert var["includeAll"], var["name"]
            # ".*" for the exporter's own labels; none (All = the values found) for job and
            # instance, which also select Prometheus's series of every other target.
            assert var.get("allValue") == (None if var["name"] in ("job", "instance") else ".*")


def _matches_anything(var: dict[str, Any]) -> bool:
    """Whether the variable's "All" is a catch-all regex rather than the values it found."""
    all_value = var.get("allValue")
    return isinstance(all_value, str) and re.fullmatch(all_value, "node-exporter") is not None


@dashboards
def test_series_of_every_target_are_confined_to_the_exporter(path: Path) -> None:
    """up{job=~"$job"} on "All" must mean the exporter's targets, not every target scraped."""
    dashboard = load_dashboard(path)
    defined = variables(dashboard)
    for panel in iter_panels(dashboard["panels"]):
        for target in panel["targets"]:
            for name, matchers in TARGET_SERIES.findall(target["expr"]):
                where = f"{panel['title']}: {name}{matchers}"
                assert re.search(r'\bjob=~?"', matchers), f"{where} has no job matcher"
                for variable in referenced_variables(matchers):
                    assert not _matches_anything(defined[variable]), (
                        f"{where}: ${variable} on All matches every target"
                    )


@dashboards
def test_every_panel_uses_the_datasource_variable(path: Path) -> None:
    dashboard = load_dashboard(path)
    panels = list(iter_panels(dashboard["panels"]))
    assert panels
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]
            assert target["refId"], panel["title"]


def _walk(node: Any, key: str) -> list[Any]:
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(v)
            found += _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            found += _walk(item, key)
    return found


@dashboards
def test_no_hard_coded_datasource(path: Path) -> None:
    dashboard = load_dashboard(path)
    for datasource in _walk(dashboard, "datasource"):
        if isinstance(datasource, dict):
            # Grafana's own annotations datasource is built in, the same in every Grafana.
            assert datasource.get("uid") in ("${datasource}", "-- Grafana --"), datasource
        else:
            assert datasource in ("${datasource}", None), datasource
    uids = [uid for uid in _walk(dashboard, "uid") if uid != dashboard["uid"]]
    assert set(uids) <= {"${datasource}", "-- Grafana --"}


@dashboards
def test_every_panel_has_a_title_and_a_unit(path: Path) -> None:
    dashboard = load_dashboard(path)
    titles = []
    for panel in iter_panels(dashboard["panels"]):
        assert panel["type"] in PANEL_TYPES, panel["type"]
        assert panel["title"].strip(), panel
        assert panel.get("description", "").strip(), panel["title"]
        titles.append(panel["title"])
        assert panel["fieldConfig"]["defaults"].get("unit") in UNITS, panel["title"]
        for override in panel["fieldConfig"].get("overrides", []):
            for prop in override["properties"]:
                if prop["id"] == "unit":
                    assert prop["value"] in UNITS, panel["title"]
    assert len(titles) == len(set(titles)), "two panels with the same title"


@dashboards
def test_layout_ids_are_unique_and_panels_do_not_overlap(path: Path) -> None:
    dashboard = load_dashboard(path)
    every = list(dashboard["panels"])
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in every:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] < grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def _variable_values(dashboard: dict[str, Any]) -> dict[str, str]:
    values = dict(GRAFANA_BUILTINS)
    for name, var in variables(dashboard).items():
        if var["type"] == "custom":
            values[name] = var["current"]["value"]
        elif var["type"] == "query":
            values[name] = var.get("allValue") or ALL_DISCOVERED
    return values


@dashboards
def test_every_variable_used_is_defined(path: Path) -> None:
    dashboard = load_dashboard(path)
    defined = set(_variable_values(dashboard)) | {"datasource"}
    texts = [t["expr"] for p in iter_panels(dashboard["panels"]) for t in p["targets"]]
    texts += [p["title"] for p in iter_panels(dashboard["panels"])]
    texts += [variable_query(v) for v in variables(dashboard).values() if v["type"] == "query"]
    for text in texts:
        assert referenced_variables(text) <= defined, text


@dashboards
def test_every_query_is_valid_promql(path: Path, tmp_path: Path) -> None:
    """Each panel query, variables substituted, as a recording rule: promtool parses it."""
    promtool = require_tool("promtool")
    dashboard = load_dashboard(path)
    values = _variable_values(dashboard)
    rules = []
    for number, panel in enumerate(iter_panels(dashboard["panels"])):
        for target in panel["targets"]:
            rules.append(
                {
                    "record": f"dashboard:query_{number}:{target['refId'].lower()}",
                    "expr": substitute(target["expr"], values),
                }
            )
    for number, annotation in enumerate(annotation_queries(dashboard)):
        rules.append(
            {
                "record": f"dashboard:annotation_{number}:expr",
                "expr": substitute(annotation, values),
            }
        )
    rules_file = tmp_path / "queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    done = run([promtool, "check", "rules", str(rules_file)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_overview_covers_what_the_user_asks_each_morning() -> None:
    """How many callers did we miss, where, and were we told in time: the panels that answer it."""
    overview = load_dashboard(DASHBOARDS_DIR / "mcn-calls-overview.json")
    exprs = {
        p["title"]: " ".join(t["expr"] for t in p["targets"])
        for p in iter_panels(overview["panels"])
    }
    wanted = {
        "call legs per minute": "mcn_calls_started_total",
        "in progress by extension": "mcn_active_calls",
        "missed callers, last 10 minutes": 'outcome="missed", period="open"}[10m]',
        "missed callers in the time range": "[$__range]",
        "missed ratio of callers": 'outcome=~"answered|missed", period="open"',
        "answer rate": 'outcome="answered"',
        "service level": "mcn_inbound_call_wait_seconds_bucket",
        "ring time": "histogram_quantile",
        "talk time": "mcn_call_talk_seconds_bucket",
        "extensions: legs answered, missed and in progress": "mcn_active_calls",
        "top 10 extensions by missed legs": "topk",
        "against the usual": "account:mcn_inbound_calls_missed:rate1h_baseline",
        # Callers, opening hours and call-backs.
        "open or closed": "mcn_open",
        "open hours and after hours": "by (outcome, period)",
        "waiting for a call back now": "mcn_missed_callers_waiting",
        "longest wait for a call back": "mcn_missed_callers_oldest_wait_seconds",
        "time to call back": "mcn_callback_seconds_bucket",
        "waiting for a call back, per line": "by (line)",
        "lines: callers answered, missed, after hours": 'period="closed"',
    }
    for words, needle in wanted.items():
        matching = [t for t in exprs if words in t.lower()]
        assert matching, f"no panel about {words}"
        assert any(needle in exprs[t] for t in matching), (words, needle)


def test_health_dashboard_covers_the_feed() -> None:
    health = load_dashboard(DASHBOARDS_DIR / "mcn-exporter-health.json")
    exprs = " ".join(t["expr"] for p in iter_panels(health["panels"]) for t in p["targets"])
    for metric in (
        "mcn_webhook_events_total",
        "mcn_webhook_rejected_total",
        "mcn_call_events_unmatched_total",
        "mcn_last_event_timestamp_seconds",
        "up{",
    ):
        assert metric in exprs


def test_provisioning_points_grafana_at_the_dashboards() -> None:
    datasources = load_yaml(PROVISIONING_DIR / "datasources" / "prometheus.yml")
    assert datasources["apiVersion"] == 1
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus"
    assert prometheus["access"] == "proxy"
    assert re.fullmatch(r"https?://[\w.-]+:\d+", prometheus["url"])
    providers = load_yaml(PROVISIONING_DIR / "dashboards" / "mcn.yml")
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    # The path is where the docs mount grafana/dashboards in the Grafana container.
    mount = f"grafana/dashboards:{provider['options']['path']}"
    assert mount in (REPO / "docs" / "monitoring.md").read_text().replace("./", "")


@dashboards
def test_panels_per_extension_say_they_count_legs(path: Path) -> None:
    """A ring group nobody answers is one missed caller but a missed leg at every phone."""
    dashboard = load_dashboard(path)
    for panel in iter_panels(dashboard["panels"]):
        exprs = " ".join(t["expr"] for t in panel["targets"])
        if re.search(r"by \([^)]*\bextension\b", exprs) and "mcn_calls_" in exprs:
            assert "leg" in panel["title"].lower(), panel["title"]


def test_overview_shades_open_hours_and_shows_after_hours_apart() -> None:
    overview = load_dashboard(DASHBOARDS_DIR / "mcn-calls-overview.json")
    assert any("mcn_open" in expr for expr in annotation_queries(overview))
    exprs = [t["expr"] for p in iter_panels(overview["panels"]) for t in p["targets"]]
    callers = [e for e in exprs if "mcn_inbound_calls_total" in e]
    assert any('period="closed"' in e or "period)" in e for e in callers)
    # Whatever counts missed callers as a failure counts only open-hours calls.
    for expr in callers:
        if 'outcome="missed"' in expr and "closed" not in expr:
            assert 'period="open"' in expr, expr
