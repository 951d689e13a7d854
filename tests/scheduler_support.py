"""Helpers for tests that drive a real ``airflow scheduler`` through the REST API.

Runs are awaited by polling their states against a deadline (no fixed sleeps): the
condition is always the runs' states, the one-second pause is only the polling interval.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

import httpx
import pytest

TERMINAL = {"success", "failed"}


def runs(client: httpx.Client, dag_id: str) -> dict[str, dict]:
    """Every run of ``dag_id``, by run id."""
    r = client.get(f"/api/v2/dags/{dag_id}/dagRuns", params={"limit": 100})
    assert r.status_code == 200, r.text
    return {run["dag_run_id"]: run for run in r.json()["dag_runs"]}


def wait_for(
    client: httpx.Client,
    dag_id: str,
    done: Callable[[dict[str, dict]], bool],
    what: str,
    timeout: float = 900,
) -> dict[str, dict]:
    """Poll ``dag_id``'s runs until ``done(runs)``; fail with their states at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        current = runs(client, dag_id)
        if done(current):
            return current
        if time.monotonic() > deadline:
            states = {k: v["state"] for k, v in current.items()}
            pytest.fail(f"timed out waiting for {what}: {states}")
        time.sleep(1)  # polling interval only


def prepare_days(days: list[dt.date], orgs: int, events_per_org: int = 60) -> list[str]:
    """Demo orgs in the billing DB and one usage file per arrival day in the landing zone."""
    from billing import orgs as orgs_mod
    from billing import pricing
    from billing.platform import db, settings
    from billing_dev import usage_gen

    catalog = pricing.load_catalog()
    rows = usage_gen.demo_orgs(orgs, catalog)
    with db.transaction() as cx:
        orgs_mod.upsert(cx, rows)
    for i, day in enumerate(days):
        usage_gen.write_day(
            usage_gen.UsageSpec(day, orgs, events_per_org, seed=100 + i),
            sorted(catalog.metrics),
            settings.landing_uri(),
        )
    return sorted(o.org_id for o in rows)
