"""billing_retry_parked end to end with `airflow dags test`, and the `billing parked` /
`billing stripe` commands, against the real stack (parked writes made through the fault proxy)."""

from __future__ import annotations

import json
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

AIRFLOW = Path(sys.executable).parent / "airflow"

pytestmark = pytest.mark.integration


@pytest.fixture
def parked(stack, clean_db, monkeypatch):
    """One org whose writes are all parked (every Stripe call answered 503)."""
    from billing import stripe_sync
    from billing.stripe_sync import Engine

    env_for_tests(monkeypatch)
    reset_state()
    random_snapshot(n_orgs=1, n_days=1, seed=2).save()
    proxy = FaultProxy(emulator_url(), sticky_rate=1.0).start()
    point_stripe_at(monkeypatch, proxy.url)
    stripe_sync.push_day(PERIOD, engine=Engine(sleep=lambda s: None))
    proxy.stop()
    point_stripe_at(monkeypatch, emulator_url())
    assert stripe_sync.list_parked()
    return monkeypatch


def test_dag_retries_all_parked(parked):
    from billing import stripe_sync

    conf = json.dumps({"all": True, "keys": []})
    env = {**os.environ, "BILLING_RETRY_DELAY_SECONDS": "1"}
    out = subprocess.run(
        [str(AIRFLOW), "dags", "test", "billing_retry_parked", "-c", conf],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert stripe_sync.list_parked() == []
    assert {r["status"] for r in outbox_rows()} == {"sent"}


def test_cli_parked_and_read_only(parked, capsys):
    from billing import cli

    assert cli.main(["parked", "list"]) == 0
    listing = capsys.readouterr().out
    key = listing.splitlines()[2].split()[0]  # header, rule, then one row per parked write
    assert "1 parked write(s)" in listing and key.startswith("billing:customer:")
    assert cli.main(["parked", "show", key]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["outbox"]["status"] == "parked" and shown["redis"]["error_class"] == "server"

    assert cli.main(["stripe", "read-only", "on", "--reason", "incident 42"]) == 0
    assert "on since" in capsys.readouterr().out
    assert cli.main(["parked", "retry", "--all"]) != 0  # refused while read-only
    assert "read-only" in capsys.readouterr().err
    assert cli.main(["stripe", "read-only", "off"]) == 0
    assert "off" in capsys.readouterr().out

    assert cli.main(["parked", "retry", key]) == 0  # the customer, then what it was blocking
    result = json.loads(capsys.readouterr().out)
    assert result["parked"] == 0 and result["sent"] >= 2
    assert cli.main(["parked", "list"]) == 0
    assert "0 parked write(s)" in capsys.readouterr().out
    assert cli.main(["stripe", "counters"]) == 0
    assert json.loads(capsys.readouterr().out)["retries"] == 5
