"""`billing run-day D` against the real stack and Airflow metadata DB: a second concurrent
run-day of D is refused in one line, the run has the scheduler's logical date for D (so a
backfill over D..D+2 creates only D+1 and D+2), and a finished run of D is kept."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time

import pytest

from billing.platform.dates import arrival_day, logical_date_of

pytestmark = pytest.mark.integration

DAY = dt.date(2026, 6, 15)  # no other test runs billing_nightly for this day
DAG_ID = "billing_nightly"


def billing(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "billing.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _wait_until_blocked(proc: subprocess.Popen, tables: list[str], log, timeout=300) -> None:
    """Until a backend waits for the table locks this test holds (a condition on pg_locks)."""
    from billing.platform import db

    deadline = time.monotonic() + timeout
    with db.connect(autocommit=True) as cx:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"run-day ended early ({proc.returncode}): {log.read_text()[-3000:]}")
            waiting = cx.execute(
                """SELECT count(*) FROM pg_locks
                    WHERE locktype = 'relation' AND NOT granted
                      AND relation = ANY(%s::regclass[])""",
                (tables,),
            ).fetchone()[0]
            if waiting:
                return
            cx.execute("SELECT pg_sleep(0.05)")
    pytest.fail("the first run-day never reached ingest")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["run-day", "2025-12-31"],
            "day 2025-12-31 is before billing_nightly's start date 2026-01-01",
        ),
        (
            ["run-day", "2026-06-15", "--dag", "billing_dunning"],
            "invalid choice: 'billing_dunning'",
        ),
    ],
)
def test_out_of_range_arguments_are_one_line(args, message):
    out = billing(*args)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr


def test_concurrent_run_day_is_refused_and_the_day_runs_once(stack, clean_db, tmp_path):
    from airflow.models.backfill import ReprocessBehavior, _do_dry_run
    from airflow.utils.session import create_session

    from billing import pricing
    from billing.platform import db, settings
    from billing.platform.errors import RunRefused
    from billing_dev import runner, usage_gen

    usage_gen.write_day(
        usage_gen.UsageSpec(DAY, 2, 40, seed=7),
        sorted(pricing.load_catalog().metrics),
        settings.landing_uri(),
    )
    assert runner.runs_of_day(DAG_ID, DAY) == []
    env = {**os.environ, "BILLING_PG_LOCK_TIMEOUT_MS": "600000"}
    tables = ["billing.usage_files", "billing.usage_events"]
    log = tmp_path / "first.log"
    blocker = db.connect()  # holds ingest's tables until the second run-day has been refused
    blocker.execute(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")
    with open(log, "w") as out:
        first = subprocess.Popen(
            [sys.executable, "-m", "billing.cli", "run-day", DAY.isoformat()],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_blocked(first, tables, log)
        second = billing("run-day", DAY.isoformat(), env=env)
        assert (second.returncode, second.stdout) == (4, "")
        assert second.stderr == f"billing: error: {DAG_ID} for {DAY} is already running\n"
        # Past the lock, Airflow's own record refuses too: the first run is running.
        with pytest.raises(RunRefused, match=rf"^{DAG_ID} for {DAY} is already running \(run "):
            runner._free_logical_date(DAG_ID, DAY)
    finally:
        blocker.rollback()
        blocker.close()
    assert first.wait(timeout=900) == 0, log.read_text()[-3000:]

    runs = runner.runs_of_day(DAG_ID, DAY)
    assert [(r["logical_date"], r["state"], r["arrival_day"]) for r in runs] == [
        (logical_date_of(DAY), "success", DAY)
    ]
    with db.connect() as cx:
        files = cx.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = 'loaded') FROM billing.usage_files"
            " WHERE arrival_day = %s",
            (DAY,),
        ).fetchone()
    assert files == (1, 1)

    # A backfill over D..D+2 bills D+1 and D+2: D has its run at the same logical date.
    with create_session() as session:
        infos = _do_dry_run(
            dag_id=DAG_ID,
            from_date=logical_date_of(DAY),
            to_date=logical_date_of(DAY + dt.timedelta(days=2)),
            reverse=False,
            reprocess_behavior=ReprocessBehavior.NONE,
            session=session,
        )
        assert [arrival_day(i.logical_date) for i in infos] == [
            DAY + dt.timedelta(days=1),
            DAY + dt.timedelta(days=2),
        ]
        from airflow.models.dagrun import DagRun
        from sqlalchemy import select

        note = session.scalar(select(DagRun).where(DagRun.run_id == runs[0]["run_id"])).note
    assert note == f"arrival day {DAY} (billing run-day)"

    # Running D again keeps that run: the next one is D 00:00:01, still arrival day D.
    assert runner._free_logical_date(DAG_ID, DAY) == logical_date_of(DAY, 1)
