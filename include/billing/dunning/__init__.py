"""Dunning: staged notices for overdue invoices, each sent exactly once.

Playbook "Dunning policy". ``billing_dunning`` and ``billing dunning run|status`` call
:func:`run` and :func:`status`; docs/DUNNING.md is the contract.

* ``notices``: the policy (YAML), overdue invoices, claimed-then-sent notices,
  service degradation and escalation.
"""

from __future__ import annotations

from billing.dunning.notices import (
    format_run,
    format_status,
    load_policy,
    run,
    run_task,
    status,
)

__all__ = [
    "format_run",
    "format_status",
    "load_policy",
    "run",
    "status",
    "run_task",
]
