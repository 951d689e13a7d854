"""
### billing_dunning

Daily at 06:00 UTC: refresh invoice status from Stripe, then send the dunning notice each
overdue invoice is due for (reminder 1 day past due, second notice 7, final notice 14,
service degraded 21, escalation to Finance 30; `include/config/dunning.yaml`). The run is
"as of" the day its data interval ends (the day it runs), never the clock, so a backfill
of day D sends what was due on D and nothing already sent. Contract: docs/DUNNING.md.

- Each (invoice, stage) is a `billing.dunning_notices` row claimed before the send:
  exactly one notice across retries, clears and backfills. After a week of downtime an
  invoice gets only its current stage; the missed ones are recorded as `skipped`.
- Paid, void or uncollectible invoices stop their sequence; degraded orgs go back to
  `normal` (Postgres + Redis `billing:org:<id>:service_level`) once nothing is overdue.

**Triage notes**
- The task succeeds when a recipient is refused: look for "dunning notice(s) failed" in
  the log or `billing dunning status --org ID`; failed rows are retried on the next run.
- `TemplateError` / `ConfigError` (policy): a template or `dunning.yaml` change broke the
  run before anything was sent; fix and clear the task.
- A `claimed` row that never became `sent` (crash mid-send) is resent by the next run
  with the same Message-ID, so the receiving side can drop a duplicate.
- Clearing or re-running a day is safe. Same thing from a shell:
  `billing dunning run --as-of YYYY-MM-DD [--dry-run]`.
"""

from __future__ import annotations

from airflow.sdk import DAG, task
from airflow.timetables.interval import CronDataIntervalTimetable

from billing.orchestration import DEFAULT_ARGS, START_DATE, STRIPE_POOL

with DAG(
    dag_id="billing_dunning",
    schedule=CronDataIntervalTimetable("0 6 * * *", timezone="UTC"),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["billing", "dunning"],
    doc_md=__doc__,
) as dag:

    @task(pool=STRIPE_POOL)
    def sync_invoice_status() -> dict:
        """Read-only: copy each open invoice's Stripe status into billing.stripe_invoices."""
        from billing import stripe_sync

        return stripe_sync.sync_invoices()

    @task
    def send_notices(data_interval_end=None, run_id=None) -> dict:
        """Claim, send and record today's notices; degrade/restore service levels."""
        from billing.dunning import run_task

        return run_task(data_interval_end, run_id)

    sync_invoice_status() >> send_notices()


if __name__ == "__main__":
    dag.test()
