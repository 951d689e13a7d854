"""``billing run-day D``: billing_nightly for arrival day D without a scheduler
(``airflow dags test``), and never over a run that Airflow already has for D.

- Logical date D (``orchestration.logical_date_of``): the one the scheduler and backfills use
  for D, so a later backfill over D skips it instead of billing D a second time.
- A second ``billing run-day D`` while the first runs (an advisory lock in the billing
  Postgres, held for the whole run), or a queued/running Airflow run of D, or a live
  scheduler (it owns every day: clear or trigger there) is refused in one line.
- D already has a finished run: it is kept (``dags test`` would delete a run of the same
  logical date) and D runs again at D 00:00:0n, still arrival day D; tasks are idempotent.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

from billing.orchestration import NIGHTLY_DAG_ID, START_DATE
from billing.platform.dates import arrival_day, arrival_interval, logical_date_of
from billing.platform.errors import ConfigError, RunRefused, ServiceError

RUN_DAY_LOCK = 7_203_104  # advisory lock class: (RUN_DAY_LOCK, day ordinal) = one run-day per day
_ACTIVE = ("queued", "running")


def check_day(day: dt.date) -> None:
    """Arrival days before the DAG's start date are out of range (Airflow refuses them)."""
    if day < START_DATE.date():
        raise ConfigError(f"day {day} is before {NIGHTLY_DAG_ID}'s start date {START_DATE.date()}")


def run_day(day: dt.date, dag_id: str = NIGHTLY_DAG_ID, quiet: bool = False) -> int:
    """Run ``dag_id`` for arrival day ``day``; refuses (RunRefused) to collide with another run."""
    from billing.platform import db
    from billing_dev.stack.manager import current

    check_day(day)
    stack = current()
    env = {**os.environ}
    if stack.state_file.exists():
        env.update(stack.env())
    env.setdefault("BILLING_RETRY_DELAY_SECONDS", "3")
    with db.connect(autocommit=True) as lock_cx:
        got = lock_cx.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (RUN_DAY_LOCK, day.toordinal())
        ).fetchone()[0]
        if not got:
            raise RunRefused(f"{dag_id} for {day} is already running")
        logical_date = _free_logical_date(dag_id, day)
        try:
            _dags_test(dag_id, day, logical_date, env, quiet)
        finally:
            _note(dag_id, logical_date, f"arrival day {day} (billing run-day)")
    return 0


def _free_logical_date(dag_id: str, day: dt.date) -> dt.datetime:
    """D's logical date for this run, or RunRefused; see the module docstring."""
    if scheduler_alive():
        raise RunRefused(
            f"a scheduler is running: let it run {dag_id} for {day}: clear the day's run "
            f"(airflow tasks clear {dag_id} -s {day} -e {day} -y) or trigger logical date {day}"
        )
    runs = runs_of_day(dag_id, day)
    active = [r for r in runs if r["state"] in _ACTIVE]
    if active:
        r = active[0]
        raise RunRefused(f"{dag_id} for {day} is already running (run {r['run_id']}, {r['state']})")
    taken = {r["logical_date"] for r in runs}
    n = next(i for i in range(len(taken) + 1) if logical_date_of(day, i) not in taken)
    if runs:
        last = runs[-1]
        print(
            f"{dag_id} for {day} already ran ({last['state']}, run {last['run_id']}); running it "
            f"again at logical date {logical_date_of(day, n).isoformat()} (earlier runs are kept)",
            flush=True,
        )
    return logical_date_of(day, n)


def _dags_test(dag_id: str, day: dt.date, logical_date: dt.datetime, env: dict, quiet: bool):
    airflow = Path(sys.executable).parent / "airflow"
    cmd = [str(airflow), "dags", "test", dag_id, logical_date.isoformat()]
    out = subprocess.run(cmd, env=env, capture_output=quiet, text=True)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout or "").strip().splitlines()[-3:] if quiet else []
        raise ServiceError(
            f"{dag_id} failed for {day} (exit {out.returncode}) {' | '.join(tail)}".strip()
        )


# ---------------------------------------------------------------- Airflow metadata (lazy imports)
def runs_of_day(dag_id: str, day: dt.date) -> list[dict]:
    """Airflow's runs of ``dag_id`` whose logical date falls on arrival day ``day``, oldest first."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    start, end = arrival_interval(day)
    with create_session() as session:
        rows = session.scalars(
            select(DagRun)
            .where(
                DagRun.dag_id == dag_id,
                DagRun.logical_date >= start,
                DagRun.logical_date < end,
            )
            .order_by(DagRun.logical_date)
        ).all()
        return [
            {
                "run_id": r.run_id,
                "state": str(r.state),
                "logical_date": r.logical_date.astimezone(dt.UTC),
                "arrival_day": arrival_day(r.logical_date),
            }
            for r in rows
        ]


def scheduler_alive() -> bool:
    """A scheduler heartbeating against this metadata DB owns the DAG's runs."""
    from airflow.jobs.job import most_recent_job
    from airflow.utils.session import create_session

    with create_session() as session:
        job = most_recent_job("SchedulerJob", session=session)
        return bool(job and job.is_alive())


def _note(dag_id: str, logical_date: dt.datetime, note: str) -> None:
    """Name the arrival day on the run ``dags test`` made (its run id names the clock)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        dr = session.scalar(
            select(DagRun).where(DagRun.dag_id == dag_id, DagRun.logical_date == logical_date)
        )
        if dr is not None:
            dr.note = note
