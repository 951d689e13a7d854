"""Shared Airflow conventions: default_args, schedules and the failure alert.

Imported by every DAG file, so it stays light: nothing here touches a database or the
network at import time.
"""

from __future__ import annotations

import datetime as dt
import logging
import os

log = logging.getLogger(__name__)

OWNER = "platform"
START_DATE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
# Pools keep outside rate limits and the single-writer embedded ClickHouse safe.
CLICKHOUSE_POOL = "billing_clickhouse"
STRIPE_POOL = "billing_stripe"
# billing_nightly's Stripe push updates this Asset (outlets=[STRIPE_PUSHED]); it schedules
# billing_reconcile. Events may carry extra {"day": "YYYY-MM-DD"}, the pushed run day.
STRIPE_PUSHED_URI = "billing://stripe/pushed"


def __getattr__(name: str):
    """``STRIPE_PUSHED`` is built on first use: importing Airflow here would make it read
    its config before the CLI or test fixtures set AIRFLOW_HOME (billing.stack imports us)."""
    if name == "STRIPE_PUSHED":
        from airflow.sdk import Asset

        globals()[name] = asset = Asset(STRIPE_PUSHED_URI)
        return asset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def alert_on_failure(context) -> None:
    """Email on-call when a task fails for good. Never raises: alerting must not mask the error."""
    try:
        from billing import mailer

        ti = context.get("task_instance") or context.get("ti")
        dag_id = getattr(ti, "dag_id", "?")
        task_id = getattr(ti, "task_id", "?")
        run_id = context.get("run_id", "?")
        exc = context.get("exception")
        to = mailer.addresses()["engineering"]
        msg = mailer.build(
            to,
            f"[billing] task failed: {dag_id}.{task_id}",
            f"DAG: {dag_id}\nTask: {task_id}\nRun: {run_id}\nError: {exc}\n\n"
            "Triage: open the task log in the Airflow UI; tasks are idempotent, so clear and re-run "
            "once the cause is fixed.",
        )
        mailer.send(msg)
    except Exception:  # pragma: no cover - alert path must never raise
        log.exception("failure alert could not be sent")


DEFAULT_ARGS = {
    "owner": OWNER,
    "retries": 2,
    # Local `dags test` runs shorten the delay (BILLING_RETRY_DELAY_SECONDS); production keeps 2 min.
    "retry_delay": dt.timedelta(seconds=int(os.environ.get("BILLING_RETRY_DELAY_SECONDS", "120"))),
    "retry_exponential_backoff": True,
    "max_retry_delay": dt.timedelta(minutes=20),
    "on_failure_callback": alert_on_failure,
}


def day_of(data_interval_start) -> dt.date:
    """The arrival day a run is responsible for: the start of its data interval, in UTC."""
    return dt.datetime.fromtimestamp(data_interval_start.timestamp(), tz=dt.UTC).date()
