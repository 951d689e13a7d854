"""Reconciliation: our invoice snapshot against Stripe, per org and period.

Playbook "Reconciliation": 0.5 % tolerance (Great Expectations), every diff in
``billing_audit``, an incident above it. ``billing_reconcile`` and ``billing reconcile``
call :func:`reconcile`.

* ``compare``: both sides in exact cents, the expectations, the audit rows and incidents.
"""

from __future__ import annotations

from billing.reconcile.compare import (
    ReconcileMismatch,
    incidents,
    open_incidents,
    reconcile,
    resolve_incident,
    run_task,
)

__all__ = [
    "ReconcileMismatch",
    "incidents",
    "open_incidents",
    "reconcile",
    "resolve_incident",
    "run_task",
]
