"""
### billing_nightly

The nightly billing cycle for one **arrival day** (the run's data interval, UTC):
ingest the day's usage files from the landing zone into Postgres, exactly once.
Later stages (dbt snapshot and rollups, Stripe push, reconciliation) chain after ingest.

**Triage notes**
- Every task works on the run's data interval and writes with upserts or claims:
  clearing a failed task, re-running a day or backfilling is always safe.
- `ingest` failed: read the log's per-file summary. A file that failed is rolled back
  whole; fix the cause (often the database) and clear the task. Bad lines never fail
  the task: they are quarantined with a reason (`billing ingest report --day D`).
- Re-run one day from a shell: `billing run-day YYYY-MM-DD`.
"""

from __future__ import annotations

from airflow.sdk import DAG, task
from airflow.timetables.interval import CronDataIntervalTimetable

from billing.orchestration import DEFAULT_ARGS, START_DATE, day_of

with DAG(
    dag_id="billing_nightly",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["billing", "nightly"],
    doc_md=__doc__,
) as dag:

    @task
    def ingest(data_interval_start=None, data_interval_end=None) -> dict:
        """Load the arrival day's usage files; returns the per-file summary."""
        from billing.ingest import ingest_day

        return ingest_day(day_of(data_interval_start), data_interval_end)

    ingest()


if __name__ == "__main__":
    dag.test()
