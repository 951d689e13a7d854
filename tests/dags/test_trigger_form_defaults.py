"""Every Trigger form submits with its defaults: no param is required unless it has a real
default, and the defaults validate to values that mean "derive it" / "dry run"."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

DAGS_DIR = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_DIR))


def _types(schema: dict) -> list[str]:
    t = schema.get("type", [])
    return t if isinstance(t, list) else [t]


def _required_by_the_form(schema: dict) -> bool:
    # Airflow's Trigger form marks a field required unless its type allows null, and an
    # emptied field is null: the Trigger button stays disabled until it is filled.
    return bool(schema.get("type")) and "null" not in _types(schema)


def test_no_empty_default_is_required(dagbag):
    for dag_id, dag in dagbag.dags.items():
        for name in dag.params:
            param = dag.params.get_param(name)
            if param.value in (None, "", []) or "Empty" in (param.description or ""):
                assert not _required_by_the_form(param.schema), f"{dag_id}.{name} is required"


@pytest.mark.parametrize(
    ("dag_id", "resolved"),
    [
        ("billing_reconcile", {"period": None, "org_ids": [], "idempotency_key": None}),
        ("billing_retention_purge", {"dry_run": True, "confirm": None}),
        ("billing_retry_parked", {"keys": [], "all": False}),
        (
            "billing_subscriptions",
            {
                "action": "change",
                "org_id": None,
                "plan": None,
                "effective": None,
                "ends": None,
                "reason": None,
            },
        ),
    ],
)
def test_defaults_validate_to_derive(dagbag, dag_id, resolved):
    params = copy.deepcopy(dagbag.dags[dag_id].params)
    assert params.validate() == resolved


def test_emptied_fields_validate(dagbag):
    # What the form sends after a user clears a field.
    for dag_id, names in {
        "billing_reconcile": ["period", "org_ids", "idempotency_key"],
        "billing_retention_purge": ["confirm"],
        "billing_retry_parked": ["keys"],
        "billing_subscriptions": ["org_id", "plan", "effective", "ends", "reason"],
    }.items():
        params = copy.deepcopy(dagbag.dags[dag_id].params)
        for name in names:
            params[name] = None
        assert all(params.validate()[n] is None for n in names), dag_id


def test_default_purge_is_a_dry_run_needing_no_confirmation(dagbag):
    from billing.purge import check_confirm

    resolved = copy.deepcopy(dagbag.dags["billing_retention_purge"].params).validate()
    check_confirm(resolved["dry_run"], resolved["confirm"])  # no PurgeRefused
