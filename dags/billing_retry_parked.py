"""
### billing_retry_parked

Manual retry of Stripe writes that were **parked** after the push's retry policy gave up
(1, 2, 4, 8, 16 s backoff) or after a non-retryable error. Trigger it with the keys to
retry, or with *all* ticked. Every write that was tried before is first looked up in
Stripe by the idempotency key in its metadata and adopted if Stripe has it, never sent twice.

**Triage notes**
- See what is parked and why: `billing parked list`, `billing parked show KEY` (outbox
  row with attempts, error class, last error, and its Redis copy).
- `not_found` / `invalid_request` errors will fail again until their cause is fixed (a
  deleted customer, a wrong currency): fix it first, then retry.
- `auth`/`permission` errors fail this task at once: the key in `stripe_default` is wrong
  or was rolled (docs/STRIPE_KEYS_ROTATION.md); no write was parked for them.
- While `billing stripe read-only status` is on, this DAG refuses to run: switch it off
  (`billing stripe read-only off`) once Stripe is back, then `billing stripe drain`.
- A retry that still fails stays parked (the task succeeds and returns the counts); it is
  always safe to trigger again.
"""

from __future__ import annotations

from airflow.sdk import DAG, Param, task

from billing.orchestration import DEFAULT_ARGS, START_DATE, STRIPE_POOL

with DAG(
    dag_id="billing_retry_parked",
    schedule=None,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["billing", "stripe", "manual"],
    doc_md=__doc__,
    params={
        "keys": Param(
            [],
            type=["null", "array"],
            items={"type": "string"},
            title="Idempotency keys",
            description="Parked writes to retry (from 'billing parked list'). Leave empty with 'all'.",
        ),
        "all": Param(
            False,
            type="boolean",
            title="Retry all parked writes",
            description="Ignore the key list and retry every parked write, oldest first.",
        ),
    },
) as dag:

    @task(pool=STRIPE_POOL)
    def retry_parked(params=None) -> dict:
        """Re-send the chosen parked writes; returns sent/adopted/parked counts."""
        from billing.stripe_sync import retry_parked as retry

        return retry(params["keys"] or [], all=bool(params["all"]))

    retry_parked()


if __name__ == "__main__":
    dag.test()
