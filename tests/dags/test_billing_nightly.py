"""billing_nightly: its tasks, their order, pools and retries; its timetable (scheduled
runs, backfills, the Trigger form and `billing run-day` give an arrival day the same logical
date, and a run bills that day)."""

from __future__ import annotations

import datetime as dt
import runpy
from pathlib import Path

import pendulum
import pytest

from billing.platform.dates import arrival_day, arrival_interval, logical_date_of

DAG_FILE = Path(__file__).resolve().parents[2] / "dags" / "billing_nightly.py"
D = dt.date(2026, 11, 3)
DAYS = [D, D + dt.timedelta(days=1), D + dt.timedelta(days=2)]


@pytest.fixture(scope="module")
def dag():
    return runpy.run_path(str(DAG_FILE))["dag"]


@pytest.fixture(scope="module")
def serialized(dag):
    """The DAG as the scheduler, `airflow backfill` and the API server load it."""
    from airflow.serialization.serialized_objects import DagSerialization

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


# The dbt task groups, one task per model (`dbt build`: the model and its tests) plus the
# tests spanning models; ephemeral models are empty tasks. Cosmos selects them by folder.
DBT_SNAPSHOT = {
    "billing_invoice_lines_sum_to_total_fct_invoices__test",
    "fct_daily_charges_model_build",
    "fct_invoice_lines_model_build",
    "fct_invoices_model_build",
    "int_periods_affected_model_build",
    "int_subscription_segments_model_build",
    "int_usage_days_aggregated_model_build",
    "int_usage_period_to_date_model_build",
    "relationships_fct_invoice_lines_invoice_id__invoice_id__ref_fct_invoices__test",
    "relationships_fct_invoices_org_id__org_id__ref_stg_billing__organizations__test",
    "relationships_stg_billing__catalog_plan_metrics_plan__plan__ref_stg_billing__catalog_plans__test",
    "stg_billing__catalog_metrics_model_build",
    "stg_billing__catalog_plan_metrics_model_build",
    "stg_billing__catalog_plan_tiers_model_build",
    "stg_billing__catalog_plans_model_build",
    "stg_billing__catalog_versions_in_force_model_build",
    "stg_billing__organizations_model_build",
    "stg_billing__subscriptions_model_build",
    "stg_billing__usage_events_model_build",
    "usage_org_is_known_test",
}
DBT_ROLLUPS = {
    "fct_charges_monthly_model_build",
    "fct_usage_daily_model_build",
    "fct_usage_hourly_model_build",
    "fct_usage_monthly_model_build",
    "stg_pg_billing__usage_events_model_build",
    "stg_pg_billing_snapshot__invoice_lines_model_build",
}
STEPS = {  # task -> its upstream tasks (the dbt groups apart)
    "ingest": set(),
    "prepare_pricing": {"ingest"},
    "stripe_push": {"publish_snapshot"},
    "stripe_close_period": {"stripe_push"},
    "stripe_sync_invoices": {"stripe_close_period"},
    "render_invoice_pdfs": {"publish_snapshot", "stripe_sync_invoices"},
    "stripe_all_delivered": {"stripe_sync_invoices"},
}


def _group(dag, group: str) -> dict:
    return {
        t.task_id.removeprefix(f"{group}."): t
        for t in dag.tasks
        if t.task_id.startswith(f"{group}.")
    }


def test_the_dag_runs_one_arrival_day_at_a_time(serialized):
    from billing.orchestration.timetables import ArrivalDayTimetable

    assert serialized.dag_id == "billing_nightly"
    assert isinstance(serialized.timetable, ArrivalDayTimetable)
    assert serialized.max_active_runs == 1
    assert serialized.catchup is False
    assert set(serialized.tags) == {"billing", "nightly"}
    assert dict(serialized.params) == {}  # the logical date is the day: nothing else to ask


def test_every_task_and_its_upstreams(dag):
    snapshot, rollups = _group(dag, "dbt_snapshot"), _group(dag, "dbt_rollups")
    assert set(snapshot) == DBT_SNAPSHOT
    assert set(rollups) == DBT_ROLLUPS
    steps = {t.task_id: t for t in dag.tasks if not t.task_id.startswith("dbt_")}
    assert {k: t.upstream_task_ids for k, t in steps.items() if k in STEPS} == STEPS
    assert sorted(steps) == sorted([*STEPS, "publish_snapshot"])
    # The snapshot is published once every model and test of its build passed (the build's
    # last tasks), and nothing downstream starts before: the rollups and the Stripe push
    # read the published one.
    assert steps["publish_snapshot"].upstream_task_ids == {
        f"dbt_snapshot.{k}"
        for k in (
            "billing_invoice_lines_sum_to_total_fct_invoices__test",
            "relationships_fct_invoice_lines_invoice_id__invoice_id__ref_fct_invoices__test",
            "relationships_fct_invoices_org_id__org_id__ref_stg_billing__organizations__test",
            "relationships_stg_billing__catalog_plan_metrics_plan__plan__ref_stg_billing__catalog_plans__test",
            "usage_org_is_known_test",
        )
    }
    assert {k for k, t in snapshot.items() if t.downstream_task_ids == {"publish_snapshot"}} == {
        k.removeprefix("dbt_snapshot.") for k in steps["publish_snapshot"].upstream_task_ids
    }
    # the staging models read the billing tables right after prepare_pricing, the catalog
    # ones through the versions in force
    in_force = "stg_billing__catalog_versions_in_force_model_build"
    catalog_staging = {k for k in DBT_SNAPSHOT if k.startswith("stg_billing__catalog_")} - {
        in_force
    }
    assert {k for k, t in snapshot.items() if "prepare_pricing" in t.upstream_task_ids} == {
        k for k in DBT_SNAPSHOT if k.startswith("stg_")
    } - catalog_staging
    for k in catalog_staging:
        assert snapshot[k].upstream_task_ids == {f"dbt_snapshot.{in_force}"}
    assert {t.task_id for t in steps["publish_snapshot"].downstream_list} == {
        "stripe_push",
        "render_invoice_pdfs",
        "dbt_rollups.stg_pg_billing__usage_events_model_build",
        "dbt_rollups.stg_pg_billing_snapshot__invoice_lines_model_build",
    }
    ordered = [t.task_id for t in dag.topological_sort()]
    for before, after in [
        ("ingest", "prepare_pricing"),
        ("prepare_pricing", "dbt_snapshot.stg_billing__usage_events_model_build"),
        ("dbt_snapshot.fct_invoices_model_build", "publish_snapshot"),
        ("publish_snapshot", "dbt_rollups.fct_usage_monthly_model_build"),
        ("publish_snapshot", "dbt_rollups.fct_charges_monthly_model_build"),
        ("publish_snapshot", "stripe_push"),
        ("stripe_push", "stripe_close_period"),
        ("stripe_close_period", "stripe_sync_invoices"),
        ("stripe_sync_invoices", "stripe_all_delivered"),
    ]:
        assert ordered.index(before) < ordered.index(after), (before, after)


def test_pools_retries_and_outlets(dag):
    from billing.orchestration import CLICKHOUSE_POOL, STRIPE_POOL, STRIPE_PUSHED

    pools = {t.task_id: t.pool for t in dag.tasks}
    stripe = {"stripe_push", "stripe_close_period", "stripe_sync_invoices"}
    # chDB: one process per data path, so the rollups' dbt runs take turns (the ephemeral
    # staging model is an empty task: no dbt process).
    clickhouse = {f"dbt_rollups.{k}" for k in DBT_ROLLUPS if k.startswith("fct_")}
    assert {k for k, p in pools.items() if p == STRIPE_POOL} == stripe
    assert {k for k, p in pools.items() if p == CLICKHOUSE_POOL} == clickhouse
    assert {p for k, p in pools.items() if k not in stripe | clickhouse} == {"default_pool"}
    assert {dag.get_task(k).max_active_tis_per_dagrun for k in clickhouse} == {1}
    assert {t.retries for t in dag.tasks} == {2}
    assert all(t.retry_exponential_backoff for t in dag.tasks)
    assert [t.task_id for t in dag.tasks if t.outlets] == ["stripe_push"]
    assert list(dag.get_task("stripe_push").outlets) == [STRIPE_PUSHED]
    assert {t.task_id for t in dag.tasks if t.trigger_rule != "all_success"} == {
        "render_invoice_pdfs"
    }
