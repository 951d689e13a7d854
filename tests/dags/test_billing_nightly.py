"""billing_nightly's timetable: scheduled runs, backfills, the Trigger form and
`billing run-day` give an arrival day the same logical date, and a run bills that day."""

from __future__ import annotations

import datetime as dt
import runpy
from pathlib import Path

import pendulum
import pytest

from billing.orchestration import arrival_day, arrival_interval, logical_date_of

DAG_FILE = Path(__file__).resolve().parents[2] / "dags" / "billing_nightly.py"
D = dt.date(2026, 11, 3)
DAYS = [D, D + dt.timedelta(days=1), D + dt.timedelta(days=2)]


@pytest.fixture(scope="module")
def serialized():
    """The DAG as the scheduler, `airflow backfill` and the API server load it."""
    from airflow.serialization.serialized_objects import DagSerialization

    dag = runpy.run_path(str(DAG_FILE))["dag"]
    return DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))


def _utc(moment: dt.datetime) -> pendulum.DateTime:
    return pendulum.instance(moment).in_timezone("UTC")


def test_backfill_over_three_days_bills_those_days(serialized):
    # `airflow backfill create --from-date D --to-date D+2` takes its runs from here.
    infos = list(
        serialized.iter_dagrun_infos_between(
            _utc(logical_date_of(D)), _utc(logical_date_of(DAYS[-1]))
        )
    )
    assert [arrival_day(i.logical_date) for i in infos] == DAYS
    assert [i.logical_date for i in infos] == [logical_date_of(d) for d in DAYS]
    assert [(i.data_interval.start, i.data_interval.end) for i in infos] == [
        arrival_interval(d) for d in DAYS
    ]
    # Each day's run waits until the day has ended.
    assert [i.run_after for i in infos] == [arrival_interval(d)[1] for d in DAYS]


def test_the_scheduler_runs_the_next_day_at_its_logical_date(serialized):
    from airflow.timetables.base import DataInterval, TimeRestriction

    start, end = (_utc(t) for t in arrival_interval(D))
    info = serialized.timetable.next_dagrun_info(
        last_automated_data_interval=DataInterval(start, end),
        restriction=TimeRestriction(earliest=None, latest=None, catchup=True),
    )
    assert info.logical_date == logical_date_of(DAYS[1])
    assert arrival_day(info.logical_date) == DAYS[1]


@pytest.mark.parametrize(
    "clock", [dt.time(0, 0), dt.time(0, 0, 1), dt.time(10, 23), dt.time(23, 59, 59)]
)
def test_a_manual_run_bills_the_day_of_its_logical_date(serialized, clock):
    # The Trigger form and `airflow dags test` infer the interval from the logical date.
    logical = _utc(dt.datetime.combine(D, clock, tzinfo=dt.UTC))
    di = serialized.timetable.infer_manual_data_interval(run_after=logical)
    assert (di.start, di.end) == arrival_interval(D)
    assert arrival_day(logical) == D


def test_run_day_uses_the_logical_date_the_scheduler_uses(serialized):
    infos = list(
        serialized.iter_dagrun_infos_between(_utc(logical_date_of(D)), _utc(logical_date_of(D)))
    )
    assert [i.logical_date for i in infos] == [logical_date_of(D)]  # what `billing run-day D` runs


def test_run_ids_and_summary_name_the_arrival_day(serialized):
    from airflow.utils.types import DagRunType

    tt = serialized.timetable
    start, end = (_utc(t) for t in arrival_interval(D))
    from airflow.timetables.base import DataInterval

    run_id = tt.generate_run_id(
        run_type=DagRunType.SCHEDULED, run_after=end, data_interval=DataInterval(start, end)
    )
    assert run_id == "scheduled__arrival-2026-11-03_2026-11-04T00:00:00+00:00"
    manual = tt.generate_run_id(
        run_type=DagRunType.MANUAL,
        run_after=_utc(dt.datetime(2026, 11, 6, 10, 23, tzinfo=dt.UTC)),
        data_interval=DataInterval(start, end),
    )
    assert manual == "manual__arrival-2026-11-03_2026-11-06T10:23:00+00:00"
    assert tt.summary == "daily 00:00 UTC, logical date = arrival day"


def test_pdfs_are_rendered_after_the_snapshot_is_published_and_synced(serialized):
    tasks = {t.task_id: t for t in serialized.tasks if not t.task_id.startswith("dbt_")}
    assert sorted(tasks) == [
        "ingest",
        "prepare_pricing",
        "publish_snapshot",
        "render_invoice_pdfs",
        "stripe_all_delivered",
        "stripe_close_period",
        "stripe_push",
        "stripe_sync_invoices",
    ]
    render = tasks["render_invoice_pdfs"]
    assert render.upstream_task_ids == {"publish_snapshot", "stripe_sync_invoices"}
    assert render.downstream_task_ids == set()
    assert render.trigger_rule == "all_done"  # a Stripe outage never leaves PDFs unrendered
