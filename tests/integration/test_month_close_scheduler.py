"""The month close under a real ``airflow scheduler`` (LocalExecutor, the stack's metadata DB).

The month's last days are run by the scheduler, the last day's run never happens (as with
``catchup=False`` when the scheduler was down that night), and the month closes anyway in
the scheduler's next run. The scheduler is started once for the module and driven through
the real REST API of the session's api-server; runs are awaited by polling their states
with a deadline (no fixed sleeps). Slow: one nightly run through Cosmos costs ~75 s here.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from billing.orchestration import NIGHTLY_DAG_ID, logical_date_of

pytestmark = pytest.mark.integration

TERMINAL = {"success", "failed"}


def _yesterday() -> dt.date:
    return dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)


@pytest.fixture(scope="module")
def scheduler(stack, tmp_path_factory) -> Iterator[httpx.Client]:
    """``airflow scheduler`` plus its own api-server (REST API, and the execution API its
    workers report to, with the same JWT secret); yields an admin client of that server.
    billing_nightly is paused again and both are stopped after the module."""
    import json

    from billing.stack.api_server import run_api_server

    home = tmp_path_factory.mktemp("scheduler")
    airflow = str(Path(sys.executable).parent / "airflow")
    r = subprocess.run([airflow, "dags", "reserialize"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    password = json.loads((stack.airflow_home / "passwords.json").read_text())["admin"]
    shared = {"AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32)}
    with run_api_server(home, shared) as (base, _pid):
        env = {
            **os.environ,
            **shared,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
            "BILLING_RETRY_DELAY_SECONDS": "1",
        }
        with (home / "scheduler.log").open("wb") as log:
            proc = subprocess.Popen(
                [airflow, "scheduler"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        token = httpx.post(
            f"{base}/auth/token", json={"username": "admin", "password": password}, timeout=30
        ).json()["access_token"]
        client = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )
        try:
            yield client
        finally:
            client.patch(f"/api/v2/dags/{NIGHTLY_DAG_ID}", json={"is_paused": True})
            client.close()
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _runs(client: httpx.Client) -> dict[str, dict]:
    r = client.get(f"/api/v2/dags/{NIGHTLY_DAG_ID}/dagRuns", params={"limit": 100})
    assert r.status_code == 200, r.text
    return {run["dag_run_id"]: run for run in r.json()["dag_runs"]}


def _wait_for(client: httpx.Client, done, what: str, timeout: float = 900) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        runs = _runs(client)
        if done(runs):
            return runs
        if time.monotonic() > deadline:
            states = {k: v["state"] for k, v in runs.items()}
            pytest.fail(f"timed out waiting for {what}: {states}")
        time.sleep(1)  # polling interval only: the condition is the run states


def _prepare_days(days: list[dt.date], orgs: int) -> list[str]:
    from billing import db, pricing, settings, usage_gen
    from billing import orgs as orgs_mod

    catalog = pricing.load_catalog()
    rows = usage_gen.demo_orgs(orgs, catalog)
    with db.transaction() as cx:
        orgs_mod.upsert(cx, rows)
    for i, day in enumerate(days):
        usage_gen.write_day(
            usage_gen.UsageSpec(day, orgs, 60, seed=100 + i),
            sorted(catalog.metrics),
            settings.landing_uri(),
        )
    return sorted(o.org_id for o in rows)


def test_skipped_last_day_the_month_closes_in_the_schedulers_next_run(scheduler, clean_db):
    airflow_client = scheduler
    from billing import db

    yesterday = _yesterday()
    # Month M: the month before the one the scheduler's next run (arrival day yesterday) bills.
    month_end = yesterday.replace(day=1) - dt.timedelta(days=1)
    month = month_end.replace(day=1)
    days = [month_end - dt.timedelta(days=1)]  # one run of the month's last days is enough
    orgs = _prepare_days([*days, month_end], orgs=2)  # the last day has files: never ingested

    before = set(_runs(airflow_client))
    for day in days:  # the month's last days but one, as the scheduler would have run them
        r = airflow_client.post(
            f"/api/v2/dags/{NIGHTLY_DAG_ID}/dagRuns",
            json={
                "logical_date": logical_date_of(day).isoformat(),
                "run_after": (logical_date_of(day) + dt.timedelta(days=1)).isoformat(),
                "dag_run_id": f"scheduler_test__arrival-{day.isoformat()}",
            },
        )
        assert r.status_code == 200, r.text
    started = time.monotonic()
    # Unpausing makes the scheduler create its own next run: catchup=False, so only
    # yesterday's; the month's last day gets no run at all.
    r = airflow_client.patch(f"/api/v2/dags/{NIGHTLY_DAG_ID}", json={"is_paused": False})
    assert r.status_code == 200, r.text

    def all_done(runs: dict[str, dict]) -> bool:
        mine = {k: v for k, v in runs.items() if k not in before}
        scheduled = [v for v in mine.values() if v["run_type"] == "scheduled"]
        return (
            len(mine) == len(days) + 1
            and len(scheduled) == 1
            and all(v["state"] in TERMINAL for v in mine.values())
        )

    runs = _wait_for(airflow_client, all_done, "the triggered run and the scheduled one")
    elapsed = time.monotonic() - started
    mine = {k: v for k, v in runs.items() if k not in before}
    by_day = {dt.date.fromisoformat(v["logical_date"][:10]): v for v in mine.values()}
    assert sorted(by_day) == [*days, yesterday], by_day
    assert {d: v["state"] for d, v in by_day.items()} == dict.fromkeys(by_day, "success")
    assert by_day[yesterday]["run_type"] == "scheduled"

    with db.connect() as cx:
        closes = cx.execute(
            "SELECT period, closed_on_day, missing_days, invoices FROM billing.period_closes"
        ).fetchall()
        ingested = cx.execute(
            "SELECT DISTINCT arrival_day FROM billing.usage_files ORDER BY 1"
        ).fetchall()
        invoices = cx.execute(
            "SELECT org_id, status FROM billing.stripe_invoices WHERE period = %s ORDER BY 1",
            (month,),
        ).fetchall()
    (period, closed_on, missing, n) = next(c for c in closes if c[0] == month)
    assert closed_on == yesterday  # the scheduler's next run closed it
    assert month_end in missing and not set(days) & set(missing)
    assert n == len(orgs) and [o for o, _ in invoices] == orgs
    assert {s for _, s in invoices} == {"open"}
    assert [d for (d,) in ingested] == days  # the skipped last day was never ingested
    print(f"scheduler: {len(days) + 1} nightly runs in {elapsed:.0f} s")
