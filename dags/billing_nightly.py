"""
### billing_nightly

The nightly billing cycle for one **arrival day** D (the landing zone's `dt=D` folder).
**The logical date is the arrival day**: the run for D has logical date D 00:00 UTC and
data interval [D, D+1), and the scheduler starts it once D has ended. A backfill from D1 to
D2 bills D1..D2; the Trigger form's logical date is the day to bill (its default, now, bills
today so far). Run ids of scheduled and triggered runs name the day (`arrival-D`).

1. `ingest`: the day's usage files from the landing zone into Postgres, exactly once.
2. `prepare_pricing`: load the pricing catalog, check every org's plan and currency.
3. `dbt_snapshot` (Cosmos): daily charges and the invoice snapshot in Postgres, built in
   `billing_snapshot_build`, which no reader uses.
   `publish_snapshot`: once every model and test passed, the build replaces the published
   snapshot (`billing_snapshot`) in one transaction, so readers never see it half-built.
4. `dbt_rollups` (Cosmos): hourly/daily/monthly usage rollups in ClickHouse.
5. `stripe_push`: the day's overage items through the outbox (updates the
   `billing://stripe/pushed` asset, which schedules `billing_reconcile`).
6. `stripe_close_period`: records the day as run, then closes every month that is due
   (one finalized Stripe invoice per org). Month M closes in the first run that finds all
   of M's arrival days run (its last day's run, or any run of a backfill), else in the
   first run of a later month (missing days recorded): a missed last day never leaves M
   open. Each invoice takes M's items explicitly, so next month's items never block it.
   The close is at month end, not after the snapshot's grace days: late events go on the
   next invoice as items of M. docs/MONTH_CLOSE.md.
7. `stripe_sync_invoices`: invoice status back into Postgres for dunning.
8. `render_invoice_pdfs` (after 3 and 7, even if they failed): stores PDFs not stored yet.
9. `stripe_all_delivered`: the sentinel. **Skipped** (pink) when writes are parked or
   queued: "degraded: N parked, M queued (billing parked list)". The run stays green
   on purpose (nothing is lost), but a degraded day is visible here and on the Billing page.

**Triage notes**
- Every task works on the run's arrival day and writes with upserts, claims or the
  outbox: clearing a failed task, re-running a day or backfilling is always safe.
- `ingest` failed: read the log's per-file summary. A failed file is rolled back whole;
  fix the cause (often the database) and clear the task. Bad lines never fail the task:
  they are quarantined with a reason (`billing ingest report --day D`); files not loaded
  at all are `rejected` in the manifest or listed in `billing.usage_skipped`.
- `prepare_pricing` failed: the message names the catalog field, or the org on an
  unknown plan / with the wrong currency. Fix the catalog or the org, then clear.
- `dbt_*` failed: a dbt test names the broken rule; nothing partial reaches the published
  snapshot (readers keep the previous one until `publish_snapshot` runs).
- `stripe_all_delivered` skipped: the day is degraded. Parked: `billing parked list`,
  then `billing_retry_parked`; queued: Stripe read-only is on (`billing stripe read-only
  status`; docs/runbooks/stripe-outage.md). Once sent, clear the sentinel: it succeeds.
- `render_invoice_pdfs` failed: the API renders misses on request; fix `BILLING_PDF_STORE`, clear.
- `stripe_close_period` returned `status: open`: a month could not be closed yet (items
  parked or queued; `left_open`, `blocked`); the next run retries it. Runbook:
  docs/runbooks/month-close.md (also for invoices parked with `foreign_pending_items`).
- Re-run a day: clear its run (UI, or `airflow tasks clear billing_nightly -s D -e D -y`);
  a day never run: trigger logical date D. Without a scheduler: `billing run-day D`, which
  refuses while a run of D is running or a scheduler is up, and keeps earlier runs of D.
  See docs/runbooks/clearing-failed-tasks.md.
"""

from __future__ import annotations

from airflow.sdk import DAG, task

from billing.orchestration import DEFAULT_ARGS, START_DATE, STRIPE_POOL, STRIPE_PUSHED, nightly
from billing.orchestration.timetables import ArrivalDayTimetable
from billing.platform.dates import arrival_day, arrival_interval
from billing.transform import dbt_task_group

with DAG(
    dag_id="billing_nightly",
    schedule=ArrivalDayTimetable(),
    description="Nightly billing of one arrival day: logical date = arrival day (UTC)",
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["billing", "nightly"],
    doc_md=__doc__,
) as dag:

    @task
    def ingest(logical_date=None) -> dict:
        """Load the arrival day's usage files; returns the per-file summary."""
        from billing.ingest import ingest_day

        day = arrival_day(logical_date)
        return ingest_day(day, arrival_interval(day)[1])

    @task
    def prepare_pricing() -> str:
        """Sync the catalog into Postgres and check orgs against it; returns its version."""
        from billing import transform
        from billing.platform import db

        with db.connect() as cx:
            return transform.prepare(cx)

    @task
    def publish_snapshot() -> dict:
        """Swap the built (and tested) snapshot in for every reader, all marts at once."""
        from billing import transform

        return transform.publish_snapshot()

    @task(pool=STRIPE_POOL, outlets=[STRIPE_PUSHED])
    def stripe_push(logical_date=None, outlet_events=None) -> dict:
        """Push day D's overage items (C_now(D) minus what was pushed) via the outbox."""
        from billing.stripe_sync import push_day

        day = arrival_day(logical_date)
        summary = push_day(day)
        # billing_reconcile's day, and the snapshot publish the push planned from
        outlet_events[STRIPE_PUSHED].extra = {
            "day": day.isoformat(),
            "snapshot_seq": summary["snapshot_seq"],
        }
        return summary

    @task(pool=STRIPE_POOL)
    def stripe_close_period(logical_date=None, run_id=None) -> dict:
        """Record the day as run; close every month that is due (billing.stripe_sync.closing)."""
        from billing.stripe_sync import close_due

        return close_due(arrival_day(logical_date), run_id=run_id)

    @task(pool=STRIPE_POOL)
    def stripe_sync_invoices() -> dict:
        """Copy Stripe invoice status (open/paid/void/uncollectible, due date) into Postgres."""
        from billing.stripe_sync import sync_invoices

        return sync_invoices()

    @task(trigger_rule="all_done")
    def render_invoice_pdfs() -> dict:
        """Render and store the PDF of every invoice whose ETag is not stored yet (idempotent)."""
        from billing.invoices.store import render_pending

        return render_pending()

    @task
    def stripe_all_delivered() -> dict:
        """Skips (never fails) while writes are parked or queued: the day is degraded."""
        from billing.stripe_sync.delivery import sentinel

        return sentinel()

    nightly.wire(  # the order: billing.orchestration.nightly.STEPS
        [ingest(), prepare_pricing(), dbt_task_group("postgres"), publish_snapshot()]
        + [dbt_task_group("clickhouse"), stripe_push(), stripe_close_period()]
        + [stripe_sync_invoices(), render_invoice_pdfs(), stripe_all_delivered()]
    )

if __name__ == "__main__":
    dag.test()
