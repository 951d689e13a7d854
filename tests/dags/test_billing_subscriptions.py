"""billing_subscriptions: the Trigger form's defaults and validation, the task's checks, and
the task run twice through `airflow dags test` applying the change once, as the triggering
user."""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from billing import orgs, subscriptions
from billing.platform.errors import ConfigError

AIRFLOW = Path(sys.executable).parent / "airflow"
DAGS_DIR = Path(__file__).resolve().parents[2] / "dags"
FORM = {
    "action": "change",
    "org_id": "acme",
    "plan": "growth",
    "effective": "2026-03-15",
    "reason": "TKT-7 upsell",
}


@pytest.fixture(scope="module")
def params():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_DIR / "billing_subscriptions.py"))
    assert bag.import_errors == {}
    return bag.dags["billing_subscriptions"].params


def test_form_defaults_and_a_filled_form_validate(params):
    p = copy.deepcopy(params)
    assert p.validate()["action"] == "change"
    for key, value in {**FORM, "ends": "2026-04-01"}.items():
        p[key] = value
    assert p.validate() == {**FORM, "ends": "2026-04-01"}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("action", "upgrade"),
        ("action", None),
        ("org_id", "acme corp"),
        ("plan", "two words"),
        ("effective", "2026-02-30"),
        ("effective", "15/03/2026"),
        ("ends", "tomorrow"),
        ("reason", "x" * 501),
    ],
)
def test_form_rejects(params, key, value):
    from airflow.sdk.definitions.param import ParamValidationError

    p = copy.deepcopy(params)
    with pytest.raises(ParamValidationError):
        p[key] = value
        p.validate()


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"action": "change"}, "change: fill in org_id, plan, effective, reason"),
        ({**FORM, "reason": "  "}, "change: fill in reason"),
        ({**FORM, "action": "cancel", "plan": None, "reason": None}, "cancel: fill in reason"),
        ({**FORM, "action": "cancel", "ends": "2026-04-01"}, "cancel: ends is for start only"),
        ({**FORM, "action": "pause"}, "action must be one of change, start, cancel"),
        ({**FORM, "effective": "2026-3-1"}, "effective '2026-3-1' is not a day (YYYY-MM-DD)"),
    ],
)
def test_task_refuses_an_incomplete_form(form, message):
    with pytest.raises(ConfigError) as err:
        subscriptions.run_task(form, "finance-amy")  # refused before any connection
    assert message in str(err.value)


def _acme(pg) -> None:
    orgs.upsert(pg, [orgs.Org("acme", "Acme", "a@example.test", "starter", "usd")])
    pg.commit()


def _log(pg) -> list[tuple]:
    return pg.execute(
        """SELECT action, changed_by, source, reason FROM billing.subscription_changes
            WHERE org_id = 'acme' AND action <> 'create' ORDER BY change_id"""
    ).fetchall()


def _intervals(pg) -> list[tuple]:
    return [(s.plan, s.starts, s.ends) for s in subscriptions.history(pg, "acme")]


def test_task_twice_applies_once_for_each_action(clean_db, pg):
    _acme(pg)
    forms = [
        FORM,
        {**FORM, "action": "cancel", "effective": "2026-05-01", "reason": "churn"},
        {**FORM, "action": "start", "effective": "2026-06-01", "ends": "2026-07-01"},
    ]
    for form in forms:
        first = subscriptions.run_task(form, "finance-amy")
        again = subscriptions.run_task(form, "finance-amy")
        assert first["changes"] and again["changes"] == [], form
        assert first["actor"] == "airflow:finance-amy"
    assert _intervals(pg) == [
        ("starter", None, dt.date(2026, 3, 15)),
        ("growth", dt.date(2026, 3, 15), dt.date(2026, 5, 1)),
        ("growth", dt.date(2026, 6, 1), dt.date(2026, 7, 1)),
    ]
    assert _log(pg) == [
        ("change", "airflow:finance-amy", "airflow", "TKT-7 upsell"),
        ("change", "airflow:finance-amy", "airflow", "TKT-7 upsell"),
        ("cancel", "airflow:finance-amy", "airflow", "churn"),
        ("start", "airflow:finance-amy", "airflow", "TKT-7 upsell"),
    ]


def _dags_test(conf: dict) -> subprocess.CompletedProcess:
    cmd = [str(AIRFLOW), "dags", "test", "billing_subscriptions", "-c", json.dumps(conf)]
    env = {**os.environ, "BILLING_RETRY_DELAY_SECONDS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_dag_run_twice_applies_once_as_the_triggering_user(clean_db, pg):
    _acme(pg)
    for _ in range(2):
        out = _dags_test(FORM)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert _intervals(pg) == [
        ("starter", None, dt.date(2026, 3, 15)),
        ("growth", dt.date(2026, 3, 15), None),
    ]
    # `airflow dags test` triggers as "dag_test"; the UI and the REST API as the logged-in user.
    assert _log(pg) == [("change", "airflow:dag_test", "airflow", "TKT-7 upsell")] * 2


@pytest.mark.integration
def test_dag_run_with_a_bad_form_fails_and_writes_nothing(clean_db, pg):
    _acme(pg)
    out = _dags_test({**FORM, "plan": "enterprise"})
    assert out.returncode != 0
    assert "plan 'enterprise' is billed in 'eur' but org 'acme' pays in 'usd'" in (
        out.stdout + out.stderr
    )
    assert _log(pg) == []
    assert _intervals(pg) == [("starter", None, None)]
