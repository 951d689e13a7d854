"""Dashboards load, are provisioned, and every PromQL query uses exported metric names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from billing import observability as obs

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "monitoring" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}  # fmt: skip


def exported_sample_names() -> set[str]:
    """Every sample name GET /billing/metrics can serve."""
    names = {s.name for m in obs.SERVER_REGISTRY.collect() for s in m.samples}
    for m in obs.SERVER_REGISTRY.collect():  # label-less histograms/counters may have no samples
        names |= {m.name, f"{m.name}_total", f"{m.name}_bucket", f"{m.name}_sum", f"{m.name}_count"}
    for name, (kind, _, _) in obs.DURABLE_METRICS.items():
        names |= (
            {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
        )
    return names


def declared_labels() -> dict[str, set[str]]:
    """Sample name -> the label names it is exported with (plus what Prometheus adds)."""
    added = {"job", "instance"}
    out: dict[str, set[str]] = {}

    def put(name: str, kind: str, labels) -> None:
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                out[name + suffix] = (
                    set(labels) | added | ({"le"} if suffix == "_bucket" else set())
                )
        else:
            out[name] = set(labels) | added

    for name, (kind, _, labels) in obs.DURABLE_METRICS.items():
        put(name, kind, labels)
    for collector in list(obs.SERVER_REGISTRY._collector_to_names):
        if hasattr(collector, "_labelnames"):
            kind = collector._type
            base = collector._name
            put(base + "_total" if kind == "counter" else base, kind, collector._labelnames)
    return out


def dag_tasks() -> dict[str, set[str]]:
    """Every DAG in dags/ and its task ids, as Airflow parses them."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return {dag_id: set(dag.task_ids) for dag_id, dag in bag.dags.items()}


MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def label_names(expr: str) -> set[str]:
    """Label names an expression selects on or groups by."""
    names = {m.group(1) for sel in re.findall(r"\{([^}]*)\}", expr) for m in MATCHER.finditer(sel)}
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        names |= {g.strip() for g in group.split(",") if g.strip()}
    return names


def selectors(expr: str, metric: str) -> list[list[tuple[str, str, str]]]:
    """The label matchers of each selector of ``metric`` in ``expr``."""
    return [
        [m.groups() for m in MATCHER.finditer(sel)]
        for sel in re.findall(rf"\b{metric}(?:_bucket|_sum|_count)?\{{([^}}]*)\}}", expr)
    ]


def _matches(op: str, pattern: str, value: str) -> bool:
    hit = re.fullmatch(pattern, value) is not None if "~" in op else value == pattern
    return hit != op.startswith("!")


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (identifiers that are not functions or keywords)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    found = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[m.end() :].lstrip()
        if rest.startswith("(") or m.group(0).lower() in KEYWORDS:
            continue
        if m.start() > 0 and (expr[m.start() - 1].isdigit() or expr[m.start() - 1] == "."):
            continue  # 1e3, durations like 5m
        found.add(m.group(0))
    return found


def test_metric_name_parser():
    assert metric_names(
        'histogram_quantile(0.95, sum by (le, task) (rate(x_bucket{task=~"a|b"}[1d]))) '
        "/ on() group_left y_total > bool 1e3"
    ) == {"x_bucket", "y_total"}


def _prom_targets(dash: dict):
    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dash["panels"]):
        for t in p.get("targets", []):
            ds = t.get("datasource") or p.get("datasource") or {}
            if ds.get("type") == "prometheus":
                yield p["title"], t["expr"]


def _all_prom_exprs():
    for path in DASHBOARDS:
        for title, expr in _prom_targets(json.loads(path.read_text())):
            yield path.name, title, expr


def test_queries_use_only_exported_label_names():
    declared = declared_labels()
    for name, title, expr in _all_prom_exprs():
        allowed = set().union(*(declared.get(m, set()) for m in metric_names(expr)))
        unknown = label_names(expr) - allowed
        assert not unknown, f"{name} / {title}: labels {sorted(unknown)} not exported"


@pytest.fixture(scope="module")
def dags() -> dict[str, set[str]]:
    return dag_tasks()


def test_task_queries_match_real_dag_tasks(dags):
    """Every dag/task selector of billing_task_* matches a task Airflow parses from dags/."""
    tasks = [(d, t) for d, ts in dags.items() for t in ts]
    for name, title, expr in _all_prom_exprs():
        for metric in ("billing_task_runs_total", "billing_task_duration_seconds"):
            for sel in selectors(expr, metric):
                wanted = [(k, op, v) for k, op, v in sel if k in ("dag", "task")]
                assert any(
                    all(_matches(op, v, {"dag": d, "task": t}[k]) for k, op, v in wanted)
                    for d, t in tasks
                ), f"{name} / {title}: {sel} matches no task of dags/"


def test_every_dag_is_on_a_dashboard(dags):
    shown = set()
    for _, _, expr in _all_prom_exprs():
        for k, op, v in (m.groups() for m in MATCHER.finditer(expr)):
            if k == "dag" and not op.startswith("!"):
                shown |= {d for d in dags if _matches(op, v, d)}
    assert set(dags) - shown == set(), "DAGs on no dashboard"
    assert {p.stem for p in (ROOT / "dags").glob("billing_*.py")} == set(dags)


def test_the_four_dashboards_exist():
    titles = {json.loads(p.read_text())["title"] for p in DASHBOARDS}
    assert titles == {"Billing health", "Stripe sync", "Reconciliation drift", "Usage"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_loads_and_queries_exported_metrics(path):
    dash = json.loads(path.read_text())
    assert dash["uid"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    known = exported_sample_names()
    for title, expr in _prom_targets(dash):
        names = metric_names(expr)
        assert names or expr.startswith("vector("), f"{path.name} / {title}: no metric in {expr!r}"
        assert names <= known, f"{path.name} / {title}: unknown {sorted(names - known)}"


def test_usage_dashboard_reads_clickhouse_rollups():
    dash = json.loads((GRAFANA / "dashboards" / "usage.json").read_text())
    sqls = [t["rawSql"] for p in dash["panels"] for t in p["targets"]]
    assert all(p["datasource"]["type"] == "grafana-clickhouse-datasource" for p in dash["panels"])
    assert {"fct_usage_hourly", "fct_usage_daily", "fct_usage_monthly"} <= {
        m for s in sqls for m in re.findall(r"\bfct_usage_\w+", s)
    }


def test_alert_rules_use_exported_metrics():
    doc = yaml.safe_load((ROOT / "monitoring" / "prometheus" / "billing_alerts.yml").read_text())
    known = exported_sample_names()
    for rule in (r for g in doc["groups"] for r in g["rules"]):
        names = metric_names(rule["expr"])
        assert names <= known, f"{rule['alert']}: unknown {sorted(names - known)}"


def test_provisioning_matches_dashboard_datasources():
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "billing.yml").read_text())
    provisioned = {(d["type"], d["uid"]) for d in ds["datasources"]}
    assert ("grafana-clickhouse-datasource", "billing-clickhouse") in provisioned
    used = set()
    for path in DASHBOARDS:
        for p in json.loads(path.read_text())["panels"]:
            if p.get("datasource"):
                used.add((p["datasource"]["type"], p["datasource"]["uid"]))
    assert used <= provisioned
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "billing.yml").read_text())
    assert prov["providers"][0]["type"] == "file"
