"""CI-sized month-boundary simulation: 3 orgs, 200 events/day, 9 days, every fault.

Runs ``billing simulate`` once (its own private stack, so counts are exact) and asserts
each invariant of its report, plus that every fault and business event really happened
(issue 20: an upgrade before the close, a cancellation after it, prepaid credits, a late
event of the closed month and a retroactive downgrade re-rated twice). A few minutes: one
day goes through the real DAG (``airflow dags test``) and one task is killed under Airflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAYS = 9

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("simulate")
    out = base / "report.json"
    billing = Path(sys.executable).parent / "billing"
    cmd = [str(billing), "simulate", "--days", str(DAYS), "--orgs", "3"]
    cmd += ["--events-per-day", "200", "--seed", "11", "--faults", "all"]
    cmd += ["--stack-dir", str(base / "stack"), "--report", str(out), "--json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    finally:  # the private stack's data, also PostgreSQL's outside tmp (/var/tmp/billing-*)
        subprocess.run(
            [str(billing), "stack", "destroy"],
            env={**env, "BILLING_LOCAL_DIR": str(base / "stack")},
            capture_output=True,
            timeout=300,
        )
    if not out.exists():
        pytest.fail(
            f"billing simulate wrote no report (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    rep = json.loads(out.read_text())
    rep["_exit"] = proc.returncode
    return rep


def inv(report, name) -> dict:
    return report["invariants"][name]


def test_runs_across_a_month_boundary(report):
    days = report["days"]
    assert len(days) == DAYS
    assert len({d[:7] for d in days}) == 2


def test_every_accepted_event_counted_once(report):
    v = inv(report, "events_counted_once")
    assert v["ok"], v
    n = v["expected_unique_valid"]
    assert n > 0
    assert v["usage_events"] == v["distinct_event_ids"] == v["registry"] == n
    assert v["manifest_accepted"] == n
    assert v["duplicates"] == v["expected_duplicates"] > 0


def test_every_quarantined_line_has_a_reason(report):
    v = inv(report, "quarantine_has_reasons")
    assert v["ok"], v
    assert v["quarantined"] == v["expected_bad_lines"] > 0
    assert v["without_reason"] == 0


def test_stripe_equals_snapshot_to_the_cent(report):
    v = inv(report, "stripe_equals_snapshot")
    assert v["ok"], v
    assert v["differences"] == [] and v["idempotency_keys_doubled"] == {}
    assert v["closed_invoices"] == 3
    # the per-period sum counts credit notes and prepaid credits (issue 20)
    assert v["credit_notes"] > 0 and v["credits_applied_cents"] > 0, v


def test_every_invoice_reconciled_or_incident(report):
    v = inv(report, "reconciled_or_incident")
    assert v["ok"], v
    assert v["never_reconciled"] == [] and v["above_tolerance_without_incident"] == []
    # the outage and the parked writes leave Stripe behind for a while: incidents were filed
    assert v["incidents"] >= 1


def test_dunning_each_stage_at_most_once(report):
    v = inv(report, "dunning_once_per_stage")
    assert v["ok"], v
    assert v["sent_twice"] == [] and v["unpaid_missing_stages"] == {}
    assert v["emails"] == v["notices_sent"] > 0
    # the org that never pays went through every stage, the others stopped when they paid
    assert set(v["by_stage"]) == {
        "reminder",
        "second_notice",
        "final_notice",
        "service_degraded",
        "escalation",
    }
    statuses = sorted(i["status"] for i in v["invoices"].values())
    assert statuses == ["open", "paid", "paid"]  # one never pays, one at once, one after 2nd


def test_parked_queue_empty_after_retries(report):
    v = inv(report, "parked_queue_empty")
    assert v["ok"], v


def test_no_orphan_outbox_rows(report):
    v = inv(report, "no_orphan_outbox_rows")
    assert v["ok"], v
    assert set(v["by_status"]) <= {"sent", "cancelled"}


def test_rerun_twice_changes_nothing(report):
    v = inv(report, "rerun_changes_nothing")
    assert v["ok"], v


def test_no_usage_lost_after_close(report):
    """Late events for a month whose invoice is final are still charged, tagged with it."""
    v = inv(report, "no_usage_after_close")
    assert v["ok"], v
    # The run really has such events (late files after the month-end close) and charged them.
    assert v["billable_events_after_close"] > 0, v
    assert v["late_cents_pushed_after_close"] > 0, v


def test_every_fault_happened(report):
    events = {e["event"]: e for e in report["faults"]["events"]}
    assert events["postgres_stopped_mid_ingest"]["error"] == "IngestError"
    assert events["ingest_resumed"].get("skipped", 0) >= 1
    assert events["stripe_push_killed"]["pending_rows_left"] > 0
    assert events["stripe_push_rerun"]["pending_rows_left"] == 0
    assert events["stripe_outage_off"]["drained"] > 0
    assert events["parked_after_push"]["parked"] > 0
    # on-call's retry the day after the sticky failures sent what they had parked
    retry = next(
        e
        for e in report["faults"]["events"]
        if e["event"] == "retry_parked_all" and e["day"] > events["parked_after_push"]["day"]
    )
    assert retry["parked_before"] > 0 and retry["sent"] >= retry["parked_before"], retry
    assert events["day_rerun_twice"]["unchanged"] is True
    assert "backfill" in events
    assert "billing_nightly_dags_test" in events
    injected = report["faults"]["stripe_injected"]
    for kind in ("500", "429", "409", "reset", "timeout", "lost", "sticky"):
        assert injected.get(kind, 0) >= 1, injected


def test_exit_code_says_which_invariants_failed(report):
    failing = [k for k, v in report["invariants"].items() if not v["ok"]]
    assert report["ok"] is (not failing)
    assert report["_exit"] == (0 if not failing else 1)


def test_plan_changes_priced_and_cancelled_org_not_billed(report):
    v = inv(report, "plan_changes")
    assert v["ok"], v
    kinds = [c["kind"] for c in v["changes"]]
    assert sorted(kinds) == ["plan_cancel", "plan_retroactive", "plan_upgrade"], v
    assert v["plan_changes"] == 3 and v["not_written"] == []
    assert sum(v["change_rows_logged"].values()) >= 3
    # the upgraded month is priced in segments and its base fee re-prorated in Stripe
    assert v["segment_labels_of_upgraded_month"] > 0
    assert v["base_fee_adjustments_sent"] > 0
    # the cancelled org's usage still arrives but is charged nothing from that day on
    assert v["cancelled_org_billable_events_after_cancel"] > 0
    assert v["cancelled_org_charge_rows_after_cancel"] == 0
    upgrade = next(c for c in v["changes"] if c["kind"] == "plan_upgrade")
    cancel = next(c for c in v["changes"] if c["kind"] == "plan_cancel")
    close = next(d for d in report["days"] if d[:7] != report["days"][-1][:7])
    assert (
        upgrade["effective"]
        == upgrade["recorded_on"]
        < max(d for d in report["days"] if d[:7] == close[:7])
    )
    assert cancel["effective"] > upgrade["effective"]


def test_credits_applied_exactly_once(report):
    v = inv(report, "credits_applied_exactly")
    assert v["ok"], v
    assert v["grants"] == 3
    assert v["applications"] >= 2 and v["applied_cents"] > 0
    assert v["expected"] == v["credit_applications"] == v["stripe_credit_items"]
    assert v["applied_twice"] == [] and v["above_invoice_total"] == []
    # oldest expiring first: the cancelled org's expiring grant paid its whole invoice and
    # its older, never-expiring grant was left untouched
    assert any(r > 0 for r in v["remaining_cents"].values())


def test_corrections_after_close(report):
    v = inv(report, "corrections_after_close")
    assert v["ok"], v
    # the late event of the closed month became a correction item tagged that month
    assert v["late_event_org_has_correction_item"] is True
    assert v["correction_items"] > 0
    # the retroactive downgrade: rerate --apply wrote credit notes, once
    assert v["credit_notes"] > 0 and v["credit_notes_cents"] > 0
    r = v["rerate"]
    assert r["first_kinds"].get("credit_note", 0) > 0 and r["first_cents"] < 0, r
    assert r["first_outbox_rows"] == sum(r["first_kinds"].values())
    assert r["again_outbox_rows"] == 0 and r["again_enqueued"] == 0, r
    assert r["keys_in_stripe"] and set(r["keys_in_stripe"].values()) == {1}, r
    assert v["keys_doubled"] == {}


def test_every_business_event_happened(report):
    events = report["faults"]["events"]
    kinds = [e["event"] for e in events]
    assert kinds.count("credit_granted") == 3
    assert "credit_expiry_not_exercised" in kinds  # one close in a 9-day run
    for kind in ("plan_upgrade", "plan_cancel", "plan_retroactive"):
        assert kinds.count(kind) == 1, kinds
    late = next(e for e in events if e["event"] == "late_event_for_closed_month")
    assert late["invoice_status"] not in (None, "draft"), late  # finalized before it came
    retro = next(e for e in events if e["event"] == "plan_retroactive")
    assert retro["closed_periods"] == late["period"]
    rerates = [e for e in events if e["event"] == "rerate_apply"]
    assert [e["attempt"] for e in rerates] == [1, 2]
    assert rerates[0]["outbox_rows_written"] > 0 and rerates[1]["outbox_rows_written"] == 0
    assert set(report["schedule"]) >= {
        "credit_grants",
        "plan_upgrade",
        "plan_cancel",
        "late_event",
        "rerate",
    }
