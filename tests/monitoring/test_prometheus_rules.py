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
