"""Run a DAG for one day without a scheduler (``airflow dags test``), as on-call would."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

from billing.errors import ServiceError


def run_day(day: dt.date, dag_id: str = "billing_nightly", quiet: bool = False) -> int:
    """Run ``dag_id`` for the data interval starting at ``day``; non-zero exit if any task failed."""
    from billing.stack.manager import current

    stack = current()
    env = {**os.environ}
    if stack.state_file.exists():
        env.update(stack.env())
    env.setdefault("BILLING_RETRY_DELAY_SECONDS", "3")
    airflow = Path(sys.executable).parent / "airflow"
    # A manual run's data interval is the one that ends at its logical date, so the run
    # responsible for arrival day D is the one at D+1 00:00 UTC: interval [D, D+1).
    run_at = day + dt.timedelta(days=1)
    cmd = [str(airflow), "dags", "test", dag_id, f"{run_at.isoformat()}T00:00:00+00:00"]
    out = subprocess.run(cmd, env=env, capture_output=quiet, text=True)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout or "").strip().splitlines()[-3:] if quiet else []
        raise ServiceError(
            f"{dag_id} failed for {day} (exit {out.returncode}) {' | '.join(tail)}".strip()
        )
    return 0
