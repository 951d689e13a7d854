"""Shared Airflow conventions (default_args, schedules, the failure alert) and the one time
vocabulary: arrival day, run end, period, month end and the period pattern.

Imported by every DAG file, so it stays light: nothing here touches a database or the
network at import time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

from billing import settings

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
        from billing import mailer

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


def day_of(moment) -> dt.date:
    """The UTC day of an aware datetime (a data interval bound, a logical date)."""
    return dt.datetime.fromtimestamp(moment.timestamp(), tz=dt.UTC).date()


# ---------------------------------------------------------------- the arrival-day convention
# billing_nightly works on one *arrival day* D (the landing zone's dt=D folder): the UTC day of
# its logical date, data interval [D 00:00, D+1 00:00) UTC. The scheduler creates that run once D
# has ended (run after D+1 00:00); backfills, the Trigger form, `airflow dags test` and
# `billing run-day` all give the same logical date for the same day (billing.timetables makes
# manual runs infer the same interval), so a day has one logical date however it was run.
NIGHTLY_DAG_ID = "billing_nightly"


def arrival_day(logical_date) -> dt.date:
    """The arrival day of a billing_nightly run: the UTC day of its logical date."""
    if logical_date is None:
        raise ValueError(
            f"{NIGHTLY_DAG_ID} needs a logical date: its UTC day is the arrival day it bills"
        )
    return day_of(logical_date)


def day_start(day: dt.date) -> dt.datetime:
    """00:00 UTC of ``day``: where its arrival interval starts."""
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)


def arrival_interval(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """Arrival day ``day`` as the run's data interval: [D 00:00, D+1 00:00) UTC."""
    start = day_start(day)
    return start, start + dt.timedelta(days=1)


def run_end(day: dt.date) -> dt.datetime:
    """The end of arrival day ``day``'s run: D+1 00:00 UTC (what ingest measures lateness from)."""
    return arrival_interval(day)[1]


def logical_date_of(day: dt.date, rerun: int = 0) -> dt.datetime:
    """The logical date of arrival day ``day``: D 00:00 UTC, as the scheduler and backfills use.

    ``rerun`` > 0 is ``billing run-day``'s n-th re-run of a day that already has a finished
    run: n seconds after midnight, still day D, so the earlier run and its history are kept
    (Airflow allows one run per logical date)."""
    if not 0 <= rerun < 86_400:
        raise ValueError(f"rerun must be in 0..86399, got {rerun}")
    return arrival_interval(day)[0] + dt.timedelta(seconds=rerun)


def arrival_run_id(run_type: str, day: dt.date, run_after: dt.datetime) -> str:
    """A run id that names the arrival day: ``scheduled__arrival-2026-11-03_<run after>``."""
    return f"{run_type}__arrival-{day.isoformat()}_{run_after.isoformat()}"


# ---------------------------------------------------------------- periods
# A billing period is a calendar month (UTC), named by its first day or written ``YYYY-MM``.
PERIOD_PATTERN = r"^[0-9]{4}-(0[1-9]|1[0-2])$"
OPTIONAL_PERIOD_PATTERN = rf"^$|{PERIOD_PATTERN}"  # a form field that may stay empty


def period_of(day: dt.date) -> dt.date:
    """The period ``day`` belongs to: the first day of its month."""
    return day.replace(day=1)


def month_end(period: dt.date) -> dt.date:
    """The last day of the month of ``period`` (any day of it)."""
    return period_of(period_of(period) + dt.timedelta(days=32)) - dt.timedelta(days=1)


def parse_period(text: str) -> dt.date:
    """The period written ``YYYY-MM`` (:data:`PERIOD_PATTERN`), as its first day."""
    if not isinstance(text, str) or not re.match(PERIOD_PATTERN, text):
        raise ValueError(f"invalid period {text!r}: expected YYYY-MM")
    return dt.date(int(text[:4]), int(text[5:7]), 1)


def period_close(period: dt.date) -> dt.datetime:
    """The first instant after ``period`` (any day of it): the run end of its last day,
    00:00 UTC on the first of the next month."""
    return run_end(month_end(period))
