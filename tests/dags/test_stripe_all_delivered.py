"""Degraded is visible: with Stripe unreachable, the real push parks its writes, and
billing_nightly's sentinel ``stripe_all_delivered`` (run by Airflow, ``airflow tasks test``)
is skipped with the degraded line, exit 0, so ``billing run-day`` / ``demo`` / ``simulate``
keep working. Once the writes are sent, the same task succeeds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from faultproxy import FaultProxy
from stripe_support import (
    PERIOD,
    emulator_url,
    env_for_tests,
    outbox_rows,
    point_stripe_at,
    random_snapshot,
    reset_state,
)

from billing.platform.dates import logical_date_of

AIRFLOW = Path(sys.executable).parent / "airflow"

pytestmark = pytest.mark.integration


def sentinel() -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(AIRFLOW),
            "tasks",
            "test",
            "billing_nightly",
            "stripe_all_delivered",
            logical_date_of(PERIOD).isoformat(),
        ],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_unreachable_stripe_day_is_degraded_not_green(stack, clean_db, monkeypatch):
    from billing import stripe_sync
    from billing.stripe_sync import Engine

    env_for_tests(monkeypatch)
    reset_state()
    random_snapshot(n_orgs=2, n_days=1, seed=3).save()
    proxy = FaultProxy(emulator_url()).start()
    point_stripe_at(monkeypatch, proxy.url)
    proxy.stop()  # Stripe unreachable: connection refused
    summary = stripe_sync.push_day(PERIOD, engine=Engine(sleep=lambda s: None))
    parked = sum(r["status"] == "parked" for r in outbox_rows())
    queued = sum(r["status"] == "pending" for r in outbox_rows())
    assert summary["status"] == "parked" and summary["parked"] == parked > 0, summary
    assert summary["still_pending"] == queued

    out = sentinel()
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    line = (
        f"degraded: {parked} parked, {queued} queued (billing parked list); last error connection"
    )
    assert "Skipping task." in log and line in log, log[-3000:]
    assert "new_state=skipped" in log, log[-3000:]

    point_stripe_at(monkeypatch, emulator_url())  # Stripe is back; on-call retries
    assert stripe_sync.retry_parked(all=True, engine=Engine(sleep=lambda s: None))["parked"] == 0
    assert {r["status"] for r in outbox_rows()} == {"sent"}
    out = sentinel()
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "degraded:" not in log and "new_state=success" in log, log[-3000:]
