"""The failure email says what failed, why, and where the log is, also for dbt tasks whose
Cosmos exception only says "dbt command failed"."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
from types import SimpleNamespace

import pytest

from billing.orchestration import failure_message, take_failure_cause

IDS = {
    "dag_id": "billing_nightly",
    "run_id": "arrival-2025-02-04",
    "task_id": "dbt_snapshot.int_subscription_segments_run",
    "try_number": 3,
}


def test_message_carries_the_cause_and_the_log_link():
    subject, body = failure_message(
        **IDS,
        exc=RuntimeError("dbt command failed. The command returned a non-zero exit code 1."),
        cause="org_plan_is_in_catalog: Got 1 result, configured to fail if != 0",
        log_url="http://airflow.example/dags/billing_nightly/runs/r/tasks/t?try_number=3",
    )
    assert subject == (
        "[billing] billing_nightly.dbt_snapshot.int_subscription_segments_run failed: "
        "org_plan_is_in_catalog: Got 1 result, configured to fail if != 0"
    )
    lines = body.splitlines()
    assert "Cause: org_plan_is_in_catalog: Got 1 result, configured to fail if != 0" in lines
    assert (
        "Error: RuntimeError: dbt command failed. The command returned a non-zero exit code 1."
        in lines
    )
    assert "Log: http://airflow.example/dags/billing_nightly/runs/r/tasks/t?try_number=3" in lines
    assert "Task: dbt_snapshot.int_subscription_segments_run (try 3)" in lines


def test_without_a_dbt_cause_the_exception_is_the_cause():
    subject, body = failure_message(**IDS, exc=ValueError("bad day"), log_url=None)
    assert subject.endswith("failed: bad day")
    assert "Cause: bad day" in body.splitlines()
    assert "Log: open the task in the Airflow UI" in body.splitlines()


@pytest.mark.integration
def test_a_failed_dbt_task_emails_the_failing_test_and_its_log(stack, clean_db, monkeypatch):
    from billing import pricing
    from billing.orchestration import alert_on_failure
    from billing.platform import db, settings
    from billing.pricing import catalog_sync
    from billing.transform import project as transform

    with db.connect(autocommit=True) as cx:
        catalog_sync.sync(cx, pricing.load_catalog())  # the catalog is fine; one org is not
        cx.execute(
            "INSERT INTO billing.organizations (org_id, name, email, plan, currency, created_at)"
            " VALUES ('ghost', 'Ghost', 'g@example.test', 'platinum', 'usd', '2020-01-01')"
        )
    # As under Airflow: the task runner exports its context to the dbt child's environment.
    for key, env in [("dag_id", "DAG_ID"), ("run_id", "DAG_RUN_ID"), ("task_id", "TASK_ID")]:
        monkeypatch.setenv(f"AIRFLOW_CTX_{env}", str(IDS[key]))
    monkeypatch.setenv("AIRFLOW_CTX_TRY_NUMBER", str(IDS["try_number"]))
    result = transform.run_dbt(
        "postgres", "build", vars=transform.run_vars(dt.date(2025, 2, 4)), check=False
    )
    assert result.returncode == 1

    before = set(settings.mail_dir().glob("*.eml"))
    ti = SimpleNamespace(
        dag_id=IDS["dag_id"],
        task_id=IDS["task_id"],
        try_number=IDS["try_number"],
        log_url="http://127.0.0.1:8080/dags/billing_nightly/runs/arrival-2025-02-04/tasks/x",
    )
    alert_on_failure(
        {
            "ti": ti,
            "run_id": IDS["run_id"],
            "exception": RuntimeError(
                "dbt command failed. The command returned a non-zero exit code 1."
            ),
        }
    )
    [path] = set(settings.mail_dir().glob("*.eml")) - before
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert msg["Subject"].startswith(
        "[billing] billing_nightly.dbt_snapshot.int_subscription_segments_run failed: org_plan_is_in_catalog"
    )
    body = msg.get_body(("plain",)).get_content()
    assert "Cause: org_plan_is_in_catalog" in body
    assert f"Log: {ti.log_url}" in body.splitlines()
    # The cause is handed over once: a later failure of another try does not reuse it.
    assert take_failure_cause(**IDS) is None
