"""
### billing_subscriptions

Finance's form for one subscription change (docs/SUBSCRIPTIONS.md "Managing subscriptions"):
**change** an org's plan from a day on, **start** a subscription for days it has none
(after a cancel), or **cancel** it from a day on. Trigger with config: pick the action, fill
in the org, the plan (change and start), the effective day and a reason. Each edit is logged in
`billing.subscription_changes` as `airflow:<user who triggered the run>` with the reason.

**Triage notes**
- The run fails without retrying and writes nothing when the form is incomplete or wrong
  (unknown org or plan, plan in another currency, a start overlapping a subscription, no
  subscription on the day to change or cancel): the log's last line says which. Trigger a
  new run with the form fixed.
- Retries and clears are safe: a change already made is found and nothing is written again
  (the task returns `changes: []`).
- What happened: `billing subscriptions history --org ID` (who, when, source, reason).
- Same thing from a shell: `billing subscriptions change|start|cancel ...`.
"""

from __future__ import annotations

from airflow.sdk import DAG, Param, task

from billing.orchestration import DEFAULT_ARGS, START_DATE

_OPTIONAL_DAY = {"type": ["null", "string"], "format": "date"}

with DAG(
    dag_id="billing_subscriptions",
    schedule=None,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["billing", "subscriptions"],
    doc_md=__doc__,
    params={
        "action": Param(
            "change",
            type="string",
            enum=["change", "start", "cancel"],
            title="Action",
            description="change: another plan from the effective day; start: a plan for days "
            "without one; cancel: no plan from the effective day on.",
        ),
        "org_id": Param(
            None,
            type=["null", "string"],
            pattern=r"^[A-Za-z0-9_.-]{1,64}$",
            title="Org id",
            description="Required.",
        ),
        "plan": Param(
            None,
            type=["null", "string"],
            pattern=r"^\S+$",
            title="Plan",
            description="A catalog plan in the org's currency. Required for change and start.",
        ),
        "effective": Param(
            None,
            **_OPTIONAL_DAY,
            title="Effective day (UTC)",
            description="Required. change/start: first day on the plan; cancel: first day without.",
        ),
        "ends": Param(
            None,
            **_OPTIONAL_DAY,
            title="Ends (start only)",
            description="Empty: open. The first day without the plan started.",
        ),
        "reason": Param(
            None,
            type=["null", "string"],
            maxLength=500,
            title="Reason",
            description="Required: why (ticket, customer request). Kept in the change log.",
        ),
    },
) as dag:

    @task
    def apply_change(params=None, dag_run=None) -> dict:
        """One change from the form, as the triggering user; a no-op when already made."""
        from airflow.sdk.exceptions import AirflowFailException

        from billing.platform.errors import ConfigError
        from billing.subscriptions import run_task

        try:
            return run_task(dict(params), getattr(dag_run, "triggering_user_name", None))
        except ConfigError as exc:  # a form mistake: retrying changes nothing
            raise AirflowFailException(str(exc)) from None

    apply_change()


if __name__ == "__main__":
    dag.test()
