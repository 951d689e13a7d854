"""The month close under a real ``airflow scheduler`` (LocalExecutor, the stack's metadata DB).

The month's last days are run by the scheduler, the last day's run never happens (as with
``catchup=False`` when the scheduler was down that night), and the month closes anyway in
the scheduler's next run. The scheduler is started once for the module and driven through
the real REST API of the session's api-server; runs are awaited by polling their states
with a deadline (no fixed sleeps). Slow: one nightly run through Cosmos costs ~75 s here.
"""

from __future__ import annotations

import datetime as dt
import time

import pytest
from scheduler_support import TERMINAL, prepare_days, runs, wait_for

from billing.orchestration import NIGHTLY_DAG_ID
from billing.platform.dates import logical_date_of

pytestmark = pytest.mark.integration


def _yesterday() -> dt.date:
    return dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)


def test_skipped_last_day_the_month_closes_in_the_schedulers_next_run(scheduler, clean_db):
    airflow_client = scheduler.client
    from billing.platform import db

    yesterday = _yesterday()
    # Month M: the month before the one the scheduler's next run (arrival day yesterday) bills.
    month_end = yesterday.replace(day=1) - dt.timedelta(days=1)
    month = month_end.replace(day=1)
    days = [month_end - dt.timedelta(days=1)]  # one run of the month's last days is enough
    orgs = prepare_days([*days, month_end], orgs=2)  # the last day has files: never ingested

    before = set(runs(airflow_client, NIGHTLY_DAG_ID))
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

    def all_done(current: dict[str, dict]) -> bool:
        mine = {k: v for k, v in current.items() if k not in before}
        scheduled = [v for v in mine.values() if v["run_type"] == "scheduled"]
        return (
            len(mine) == len(days) + 1
            and len(scheduled) == 1
            and all(v["state"] in TERMINAL for v in mine.values())
        )

    found = wait_for(
        airflow_client, NIGHTLY_DAG_ID, all_done, "the triggered run and the scheduled one"
    )
    elapsed = time.monotonic() - started
    mine = {k: v for k, v in found.items() if k not in before}
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
