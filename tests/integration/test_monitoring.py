"""`billing monitoring up`: a real Prometheus with the alert rules scrapes the real api-server's
/billing/metrics with a JWT, and its query API sees the exporter's series."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from billing_dev import monitoring
from billing_dev.stack import process

pytestmark = pytest.mark.integration


def test_prometheus_scrapes_the_api_server_and_loads_the_rules(stack, airflow_server):
    if not shutil.which("prometheus"):
        pytest.fail("prometheus not found: run scripts/install-system-deps.sh")
    s = monitoring.up(stack, base=airflow_server.base, password=airflow_server.password)
    try:
        assert s["started"]
        token = monitoring.folder(stack) / "billing_api_token"
        assert token.stat().st_mode & 0o777 == 0o600
        assert (
            airflow_server.password not in (monitoring.folder(stack) / "prometheus.yml").read_text()
        )

        def scraped() -> bool:
            r = httpx.get(
                f"{s['url']}/api/v1/query",
                params={"query": 'billing_metrics_source_up{source="dunning"}'},
                trust_env=False,
            ).json()
            return bool(r["data"]["result"])

        process.wait_until(scraped, "the first scrape", 90)
        st = monitoring.status(stack)
        assert [t["health"] for t in st["targets"]] == ["up"], st["targets"]
        assert st["targets"][0]["url"] == f"{airflow_server.base}/billing/metrics"
        assert "BillingDunningSendFailures" in st["rules"] and len(st["rules"]) >= 11
        r = httpx.get(
            f"{s['url']}/api/v1/query",
            params={"query": 'billing_dunning_send_failures_total{stage="reminder"}'},
            trust_env=False,
        ).json()
        assert len(r["data"]["result"]) == 1  # exported (from zero) before any failure
        # every task of every serialized billing DAG has its failed-runs series (from zero)
        r = httpx.get(
            f"{s['url']}/api/v1/query",
            params={"query": 'count by (dag) (billing_task_runs_total{state="failed"})'},
            trust_env=False,
        ).json()
        dags = {p.stem for p in (Path(__file__).parents[2] / "dags").glob("billing_*.py")}
        assert {x["metric"]["dag"] for x in r["data"]["result"]} == dags
        # a second up refreshes the token and the config of the running server
        assert (
            monitoring.up(stack, base=airflow_server.base, password=airflow_server.password)[
                "started"
            ]
            is False
        )
    finally:
        assert monitoring.down(stack)
    assert monitoring.status(stack) == {"running": False}
