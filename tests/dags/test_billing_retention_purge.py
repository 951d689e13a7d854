"""billing_retention_purge end to end with `airflow dags test`: dry run by default, the
CONFIRM gate refuses anything else, and the run shows up in the exported metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

AIRFLOW = Path(sys.executable).parent / "airflow"
RUN_AT = "2026-03-01T04:00:00+00:00"


def _dags_test(conf: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(AIRFLOW), "dags", "test", "billing_retention_purge", RUN_AT]
    if conf is not None:
        cmd += ["-c", json.dumps(conf)]
    env = {**os.environ, "BILLING_RETRY_DELAY_SECONDS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _partition_count(pg) -> int:
    return pg.execute(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'billing.usage_events'::regclass"
    ).fetchone()[0]


@pytest.mark.integration
def test_default_run_is_a_dry_run(clean_db, pg):
    pg.execute("SELECT billing.ensure_usage_partition('2020-01-01')")
    pg.commit()
    before = _partition_count(pg)
    out = _dags_test()
    assert out.returncode == 0, out.stderr[-3000:]
    assert _partition_count(pg) == before
    rows = pg.execute(
        """SELECT object, action, dry_run, as_of::text FROM billing.retention_purge_audit
            WHERE object = 'billing.usage_events_p202001'"""
    ).fetchall()
    # Empty partition, past retention, but no reconciliation table yet -> kept, in a dry run.
    assert len(rows) == 1
    assert rows[0][1:] == (rows[0][1], True, "2026-03-01")
    assert rows[0][1] in ("kept", "would_drop")

    from billing.observability import export as metrics_export

    f, up = metrics_export._Families(), {}
    metrics_export.collect_airflow(f, up)
    assert up == {"airflow": 1}
    dags = {s.labels["dag"] for s in f.out["billing_last_successful_run_timestamp_seconds"].samples}
    assert "billing_retention_purge" in dags
    pg.execute("DROP TABLE billing.usage_events_p202001")
    pg.commit()


@pytest.mark.integration
def test_real_purge_without_confirm_fails_and_deletes_nothing(clean_db, pg):
    out = _dags_test({"dry_run": False, "confirm": "yes please"})
    assert out.returncode != 0
    assert "refusing to purge: confirm must be exactly 'CONFIRM'" in (out.stdout + out.stderr)
    n = pg.execute("SELECT count(*) FROM billing.retention_purge_audit").fetchone()[0]
    assert n == 0
