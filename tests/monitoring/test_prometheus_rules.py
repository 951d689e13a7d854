"""Alert rules: promtool checks and unit tests, and every runbook link resolves."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "monitoring" / "prometheus"
RULES = PROM / "billing_alerts.yml"
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    hint = "promtool not found: run scripts/install-system-deps.sh (Debian package 'prometheus')"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(hint)  # CI must never skip the rule tests silently
    pytest.skip(hint)


def _alerts() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_check_rules(promtool):
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in out.stdout


def test_promtool_rule_unit_tests(promtool):
    assert RULE_TESTS
    out = subprocess.run(
        [promtool, "test", "rules", *[p.name for p in RULE_TESTS]],
        cwd=PROM / "tests",
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAILED" not in out.stdout + out.stderr


def test_every_alert_is_tested_firing_and_not_firing():
    fires, quiet = set(), set()
    for path in RULE_TESTS:
        for t in yaml.safe_load(path.read_text())["tests"]:
            for case in t.get("alert_rule_test", []):
                (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert names - fires == set(), "alerts never shown to fire"
    assert names - quiet == set(), "alerts never shown to stay quiet"


def _series(selector: str) -> tuple[str, dict[str, str]]:
    name, _, rest = selector.partition("{")
    labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
    return name, labels


def test_rule_tests_feed_series_the_exporter_produces():
    """Hand-written input_series use exported names, labels and label values, bucket bounds as
    prometheus_client renders them, whole numbers for counters, and real DAG ids."""
    from test_grafana_dashboards import declared_labels

    from billing import observability as obs
    from billing.observability.export import _le

    declared = declared_labels()
    buckets = {f"{n}_bucket": {*map(_le, b), "+Inf"} for n, b in obs.DURABLE_BUCKETS.items()}
    for collector in list(obs.SERVER_REGISTRY._collector_to_names):
        if getattr(collector, "_type", None) == "histogram":
            buckets[f"{collector._name}_bucket"] = {
                "+Inf" if b == float("inf") else _le(b) for b in collector._upper_bounds
            }
    dags = {p.stem for p in (ROOT / "dags").glob("billing_*.py")}
    for path in RULE_TESTS:
        for t in yaml.safe_load(path.read_text())["tests"]:
            for s in t["input_series"]:
                name, labels = _series(s["series"])
                where = f"{path.name} / {t['name']} / {s['series']}"
                assert name in declared, f"{where}: not exported"
                assert set(labels) <= declared[name], f"{where}: labels not exported"
                if "le" in labels:
                    assert labels["le"] in buckets[name], f"{where}: no such bucket bound"
                if "dag" in labels:
                    assert labels["dag"] in dags, f"{where}: no such DAG"
                if name.endswith(("_total", "_bucket", "_count")):
                    numbers = re.findall(r"[-+]?\d*\.?\d+(?:e[-+]?\d+)?", s["values"])
                    assert all(float(x).is_integer() for x in numbers), f"{where}: fractional count"


def _anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    return {_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", md.read_text(), re.M)}


@pytest.mark.parametrize("alert", _alerts(), ids=lambda a: a["alert"])
def test_runbook_url_points_to_an_existing_section(alert):
    url = alert["annotations"]["runbook_url"]
    m = re.fullmatch(
        r"\{\{ \$externalLabels\.runbook_base \}\}/(docs/runbooks/[\w.-]+\.md)#([\w-]+)", url
    )
    assert m, f"{alert['alert']}: runbook_url must be <runbook_base>/docs/runbooks/FILE.md#anchor"
    path, anchor = ROOT / m[1], m[2]
    assert path.is_file(), f"{alert['alert']}: {m[1]} does not exist"
    assert anchor in _anchors(path), f"{alert['alert']}: no heading #{anchor} in {m[1]}"


def test_every_alert_has_severity_and_summary():
    for a in _alerts():
        assert a["labels"]["severity"] in ("page", "ticket"), a["alert"]
        assert a["annotations"]["summary"], a["alert"]
