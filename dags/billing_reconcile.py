"""
### billing_reconcile

Internal invoice snapshot vs Stripe for every org of a period (tolerance 0.5 %), one
`billing.billing_audit` row per org. Runs when the nightly push updates
`billing://stripe/pushed`, or by hand with a period. See docs/RECONCILIATION.md.

**Triage notes**
- The task **fails on purpose** when an org is above tolerance, missing on one side, or
  billed in another currency: an incident (Engineering + Finance) is open in
  `billing.billing_incidents` and the alert email went out. Follow
  docs/runbooks/reconciliation-mismatch.md; do not just clear the task.
- Clearing or retrying a run replays the stored result of its idempotency key (no new
  audit rows, no second email). After fixing the cause, trigger a **new** run.
- Other failures (Stripe or Postgres down) are retried; nothing is stored until done.
- From a shell: `billing reconcile --period YYYY-MM [--org ID] --json`.
"""

from __future__ import annotations

from airflow.sdk import DAG, Param, task

from billing.orchestration import DEFAULT_ARGS, START_DATE, STRIPE_POOL, STRIPE_PUSHED
from billing.platform.dates import OPTIONAL_PERIOD_PATTERN

with DAG(
    dag_id="billing_reconcile",
    schedule=[STRIPE_PUSHED],
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["billing", "reconcile"],
    doc_md=__doc__,
    params={
        "period": Param(
            None,
            type=["null", "string"],
            pattern=OPTIONAL_PERIOD_PATTERN,
            title="Period (YYYY-MM)",
            description="Empty: the period of the pushed day (or of the run's data interval).",
        ),
        "org_ids": Param(
            [],
            type=["null", "array"],
            items={"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}$"},
            title="Org ids",
            description="Only these orgs. Empty: every org in the snapshot or in Stripe.",
        ),
        "idempotency_key": Param(
            None,
            type=["null", "string"],
            maxLength=200,
            title="Idempotency key",
            description="Same key, same stored result. Empty: derived from this run's id.",
        ),
    },
) as dag:

    @task(pool=STRIPE_POOL)
    def reconcile(params=None, run_id=None, triggering_asset_events=None, dag_run=None):
        """Reconcile the period; fails without retries when Stripe and the snapshot disagree."""
        from airflow.sdk.exceptions import AirflowFailException

        from billing.reconcile import ReconcileMismatch, run_task

        events = [e for found in (triggering_asset_events or {}).values() for e in found]
        days = [
            e.extra.get("day") or getattr(e.source_dag_run, "data_interval_start", None)
            for e in events
        ] or [dag_run.data_interval_start or dag_run.logical_date]
        pushed = [
            (e.extra["day"], e.extra["snapshot_seq"]) for e in events if "snapshot_seq" in e.extra
        ]
        try:
            return run_task(params, run_id, days, pushed)
        except ReconcileMismatch as exc:  # a finding, not a fault: retrying changes nothing
            raise AirflowFailException(str(exc)) from exc

    reconcile()


if __name__ == "__main__":
    dag.test()
