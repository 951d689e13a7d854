"""How the flows run in Airflow: shared conventions (default_args, start date, pools, the
``billing://stripe/pushed`` asset, the failure alert), billing_nightly's timetable
(:mod:`.timetables`) and its steps in order (:mod:`.nightly`). Days and periods are
:mod:`billing.platform.dates`.

Imported by every DAG file, so it stays light: nothing here touches a database or the
network at import time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import tempfile
from pathlib import Path

from billing.platform import settings

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
    its config before the CLI or test fixtures set AIRFLOW_HOME (billing_dev.stack imports us)."""
    if name == "STRIPE_PUSHED":
        from airflow.sdk import Asset

        globals()[name] = asset = Asset(STRIPE_PUSHED_URI)
        return asset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def failure_message(
    *,
    dag_id: str,
    task_id: str,
    run_id: str,
    try_number: int | str,
    exc: BaseException | None,
    cause: str | None = None,
    log_url: str | None = None,
) -> tuple[str, str]:
    """(subject, body) of the failure email: what failed, why, and where the log is.

    ``cause`` is what a dbt child left (failed models and tests with their messages): Cosmos
    itself only raises "dbt command failed", which says nothing to on-call.
    """
    error = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"
    why = cause or str(exc or "") or error
    first = " ".join(why.split())[:140]
    subject = f"[billing] {dag_id}.{task_id} failed: {first}"
    body = "\n".join(
        [
            f"DAG: {dag_id}",
            f"Task: {task_id} (try {try_number})",
            f"Run: {run_id}",
            f"Cause: {why}",
            *([f"Error: {error}"] if cause else []),
            f"Log: {log_url or 'open the task in the Airflow UI'}",
            "",
            "Triage: the task's doc and the DAG's Triage notes say what to check; tasks are "
            "idempotent, so clear and re-run once the cause is fixed.",
        ]
    )
    return subject, body


def failure_cause_path(dag_id: str, run_id: str, task_id: str, try_number: int | str) -> Path:
    """Where a task's failed child process (dbt) leaves its cause for the task's alert (same
    worker: the callback runs in the task's own process right after the child exits)."""
    key = hashlib.sha256(f"{dag_id}\x1f{run_id}\x1f{task_id}\x1f{try_number}".encode())
    return Path(tempfile.gettempdir()) / "billing-dbt-failures" / f"{key.hexdigest()[:32]}.txt"


def leave_failure_cause(cause: str) -> None:
    """Called by a failing child process of a task (a dbt run): the cause its alert will say."""
    env = os.environ
    ids = [env.get(f"AIRFLOW_CTX_{k}") for k in ("DAG_ID", "DAG_RUN_ID", "TASK_ID", "TRY_NUMBER")]
    if not all(ids):  # not under an Airflow task: the CLI prints the cause itself
        return
    path = failure_cause_path(*ids)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text(cause[:2000])


def take_failure_cause(dag_id: str, run_id: str, task_id: str, try_number) -> str | None:
    """The cause a child process left for this try of this task (and forget it), if any."""
    path = failure_cause_path(dag_id, run_id, task_id, try_number)
    try:
        cause = path.read_text()
    except OSError:
        return None
    path.unlink(missing_ok=True)
    return cause


def alert_on_failure(context) -> None:
    """Email on-call when a task fails for good. Never raises: alerting must not mask the error."""
    try:
        from billing.platform import mailer

        ti = context.get("task_instance") or context.get("ti")
        dag_id = getattr(ti, "dag_id", "?")
        task_id = getattr(ti, "task_id", "?")
        run_id = context.get("run_id", "?")
        try_number = getattr(ti, "try_number", "?")
        try:
            log_url = ti.log_url
        except Exception:  # a context without a base URL still gets its email
            log_url = None
        subject, body = failure_message(
            dag_id=dag_id,
            task_id=task_id,
            run_id=run_id,
            try_number=try_number,
            exc=context.get("exception"),
            cause=take_failure_cause(dag_id, run_id, task_id, try_number),
            log_url=log_url,
        )
        mailer.send(mailer.build(mailer.addresses()["engineering"], subject, body))
    except Exception:  # pragma: no cover - alert path must never raise
        log.exception("failure alert could not be sent")


DEFAULT_ARGS = {
    "owner": OWNER,
    "retries": 2,
    # Local `dags test` runs shorten the delay (BILLING_RETRY_DELAY_SECONDS); production keeps 2 min.
    "retry_delay": dt.timedelta(seconds=settings.retry_delay_seconds()),
    "retry_exponential_backoff": True,
    "max_retry_delay": dt.timedelta(minutes=20),
    "on_failure_callback": alert_on_failure,
}


# billing_nightly works on one *arrival day* D: billing.platform.dates has the convention.
NIGHTLY_DAG_ID = "billing_nightly"
