"""
### billing_retention_purge

Drops whole monthly partitions of raw usage (`billing.usage_events_pYYYYMM`) older than
the retention window (`BILLING_RETENTION_DAYS`, default 400), plus the exactly-once registry
rows of their events, the quarantine rows and ClickHouse hourly rollups of the same months.
A month that is not yet invoiced AND reconciled is never touched. The cutoff counts back
from the run's data interval end. After a real purge, ingest quarantines any event in or
before a purged month as `too_late` (it could no longer tell a re-sent one from a new one).

- **Weekly (scheduled)**: always a dry run; the log and `billing.retention_purge_audit`
  list, per partition, what would go and why anything stays.
- **Manual trigger**: the form's defaults (dry run, confirmation empty) submit as they
  are: a dry run. For a real purge untick `dry_run` and type `CONFIRM` exactly in `confirm`;
  anything else fails the run with a clear message and deletes nothing.

**Triage notes**
- "refusing to purge": the confirm field was not exactly `CONFIRM`; nothing was deleted.
- A month listed as `kept` with "not invoiced"/"not reconciled" is expected until Stripe
  sync and reconciliation have finished that period; do not force it.
- Retries and clears are safe: dropped partitions stay dropped, audit rows are keyed by run.
- A real purge waits for files that are loading (registry lock); "lock timeout" means ingest
  was busy longer than `BILLING_PG_LOCK_TIMEOUT_MS`: nothing was deleted, clear and rerun.
- Runbook: docs/runbooks/retention-purge.md. Same thing from a shell:
  `billing purge --older-than 400 --as-of YYYY-MM-DD [--confirm CONFIRM]`.
"""

from __future__ import annotations

from airflow.sdk import DAG, Param, task
from airflow.timetables.interval import CronDataIntervalTimetable

from billing.orchestration import CLICKHOUSE_POOL, DEFAULT_ARGS, START_DATE

with DAG(
    dag_id="billing_retention_purge",
    schedule=CronDataIntervalTimetable("0 4 * * 0", timezone="UTC"),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["billing", "retention"],
    doc_md=__doc__,
    params={
        "dry_run": Param(
            True,
            type="boolean",
            title="Dry run",
            description="Report only. Untick (and type CONFIRM below) to really delete.",
        ),
        "confirm": Param(
            None,
            type=["null", "string"],
            title="Confirmation",
            description="Type CONFIRM exactly to allow a real purge; ignored for dry runs.",
        ),
    },
) as dag:

    @task(pool=CLICKHOUSE_POOL)
    def purge_partitions(params=None, dag_run=None, data_interval_end=None, run_id=None) -> dict:
        """Dry-run on schedule; real purge only on a confirmed manual trigger."""
        from billing.purge import run_task

        return run_task(params, str(dag_run.run_type), data_interval_end, run_id)

    purge_partitions()


if __name__ == "__main__":
    dag.test()
