"""billing_nightly's steps, defined once: their order, running them, wiring the DAG."""

from __future__ import annotations

import datetime as dt

import pytest

from billing.orchestration import nightly
from billing.orchestration.nightly import Step

DAY = dt.date(2026, 11, 3)


def test_the_nightly_order():
    assert nightly.order() == [
        "ingest",
        "prepare_pricing",
        "dbt_snapshot",
        "publish_snapshot",
        "dbt_rollups",
        "stripe_push",
        "stripe_close_period",
        "stripe_sync_invoices",
        "render_invoice_pdfs",
        "stripe_all_delivered",
    ]


def test_order_follows_dependencies_not_the_listing():
    steps = (Step("c", ("b",), ""), Step("b", ("a",), ""), Step("a", (), ""))
    assert nightly.order(steps) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="wait on each other"):
        nightly.order((Step("a", ("b",), ""), Step("b", ("a",), "")))


def test_run_calls_each_handler_in_order_with_the_day():
    calls = []
    handlers = {name: (lambda day, n=name: calls.append((n, day)) or n) for name in nightly.NAMES}
    done = nightly.run(DAY, handlers)
    assert calls == [(name, DAY) for name in nightly.order()]
    assert done == {name: name for name in nightly.NAMES}


def test_run_within_the_transform_steps_and_with_named_skips():
    calls = []
    done = nightly.run(
        DAY,
        {
            "prepare_pricing": lambda d: calls.append("p"),
            "dbt_rollups": lambda d: calls.append("r"),
        },
        only=nightly.TRANSFORM_STEPS,
        skip={"dbt_snapshot": "not asked", "publish_snapshot": "not asked"},
    )
    assert calls == ["p", "r"] and set(done) == {"prepare_pricing", "dbt_rollups"}


def test_an_unhandled_or_unknown_step_is_refused_before_anything_runs():
    calls = []
    with pytest.raises(ValueError, match=r"unhandled \['dbt_rollups'\]"):
        nightly.run(
            DAY,
            {name: calls.append for name in ("prepare_pricing", "dbt_snapshot")},
            only=nightly.TRANSFORM_STEPS,
            skip={"publish_snapshot": "x"},
        )
    with pytest.raises(ValueError, match=r"unknown \['typo'\]"):
        nightly.run(DAY, {"typo": calls.append}, skip=dict.fromkeys(nightly.NAMES, "x"))
    assert calls == []


class _Task:
    """What wire needs of a DAG node: its ``node_id`` and ``>>``."""

    def __init__(self, name, edges):
        self.node_id, self.edges = name, edges

    def __rshift__(self, other):
        self.edges.append((self.node_id, other.node_id))
        return other


class _TaskFlowCall:  # a TaskFlow call's XComArg: the task is its .operator
    def __init__(self, task):
        self.operator = task

    def __rshift__(self, other):
        return self.operator >> getattr(other, "operator", other)


def test_wire_sets_exactly_the_steps_dependencies():
    edges: list[tuple[str, str]] = []
    nodes = [_Task(name, edges) for name in nightly.NAMES]
    nodes[0] = _TaskFlowCall(nodes[0])
    nightly.wire(list(reversed(nodes)))
    assert sorted(edges) == sorted((up, s.name) for s in nightly.STEPS for up in s.after)
    with pytest.raises(ValueError, match="are not its steps"):
        nightly.wire([_Task(name, edges) for name in nightly.NAMES[:-1]])
    with pytest.raises(ValueError, match="are not its steps"):  # a step given twice
        nightly.wire([_Task(name, edges) for name in (*nightly.NAMES, "ingest")])
