"""billing_nightly's steps and their order: the one definition.

The DAG wires its tasks from :data:`STEPS` (:func:`wire`); ``billing transform`` runs the
transform steps in that order (:func:`run`, through ``transform.transform_day``); the month
simulation runs every step it stands in for, in the same order, and names the ones it leaves
out and why. A new step therefore goes here first, and everything that runs nights without
the scheduler has to say what it does with it.

The order is the DAG's dependency order; steps on parallel branches (the rollups, the Stripe
push and the PDFs all follow the publish) run in the order they are listed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Step:
    name: str  # the task id (or Cosmos task group id) in billing_nightly
    after: tuple[str, ...]  # the steps it waits for
    what: str  # one line for people


STEPS: tuple[Step, ...] = (
    Step("ingest", (), "the arrival day's usage files into Postgres, exactly once"),
    Step("prepare_pricing", ("ingest",), "the catalog into Postgres; orgs' plans checked"),
    Step("dbt_snapshot", ("prepare_pricing",), "dbt: daily charges and the invoice snapshot"),
    Step("publish_snapshot", ("dbt_snapshot",), "the tested build becomes the readers' snapshot"),
    Step("dbt_rollups", ("publish_snapshot",), "dbt: the usage rollups in ClickHouse"),
    Step("stripe_push", ("publish_snapshot",), "the day's overage items through the outbox"),
    Step("stripe_close_period", ("stripe_push",), "the day recorded; due months closed"),
    Step("stripe_sync_invoices", ("stripe_close_period",), "invoice status back from Stripe"),
    Step(
        "render_invoice_pdfs",
        ("publish_snapshot", "stripe_sync_invoices"),
        "PDFs of invoices not stored yet",
    ),
    Step("stripe_all_delivered", ("stripe_sync_invoices",), "the sentinel: nothing parked"),
)
NAMES = tuple(step.name for step in STEPS)
# The steps `billing transform` and transform.transform_day run: catalog, dbt, publish.
TRANSFORM_STEPS = ("prepare_pricing", "dbt_snapshot", "publish_snapshot", "dbt_rollups")


def order(steps: tuple[Step, ...] = STEPS) -> list[str]:
    """The step names in dependency order (listing order among the ready ones)."""
    done: list[str] = []
    pending = list(steps)
    while pending:
        ready = next((s for s in pending if set(s.after) <= set(done)), None)
        if ready is None:
            raise ValueError(f"steps wait on each other or on unknown steps: {pending}")
        done.append(ready.name)
        pending.remove(ready)
    return done


def run(
    day: dt.date,
    handlers: Mapping[str, Callable[[dt.date], Any]],
    *,
    only: Collection[str] | None = None,
    skip: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``handlers[step](day)`` for each step in order (within ``only`` if given).

    Every step in scope needs a handler or a reason in ``skip``: a step added to the DAG
    fails here until each caller decides what to do with it."""
    skip = dict(skip or {})
    scope = [name for name in order() if only is None or name in only]
    unknown = (set(handlers) | set(skip) | set(only or ())) - set(NAMES)
    missing = [name for name in scope if name not in handlers and name not in skip]
    if unknown or missing:
        raise ValueError(f"nightly steps: unknown {sorted(unknown)}, unhandled {missing}")
    return {name: handlers[name](day) for name in scope if name in handlers}


def wire(nodes: Sequence[Any]) -> None:
    """Set the DAG's dependencies from :data:`STEPS`. ``nodes`` are the DAG's tasks, TaskFlow
    calls or task groups, named by their id; they must be exactly the steps."""
    tasks = {getattr(node, "operator", node).node_id: node for node in nodes}
    if len(tasks) != len(nodes) or set(tasks) != set(NAMES):
        raise ValueError(
            f"billing_nightly's tasks {sorted(tasks)} are not its steps {sorted(NAMES)}"
        )
    for step in STEPS:
        for upstream in step.after:
            tasks[upstream] >> tasks[step.name]
