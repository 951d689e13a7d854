"""What on-call does in the Airflow UI, under a real scheduler, in a real browser.

1. ``billing run-day`` bills the first of three arrival days from the shell (before the
   scheduler starts: with a live scheduler the command refuses and points at the UI).
2. A UI backfill over the three days, with the form's defaults (Missing Runs, unpause on
   trigger), announces two runs and bills the other two days; the first day keeps its run.
3. billing_reconcile and billing_retention_purge are triggered with their forms' defaults
   (no field typed): a reconciliation of the run's period and a dry-run purge.

Every arrival day is ingested exactly once and no run fails, including the runs the
defaults bring with them: unpausing billing_nightly starts the scheduler's latest run
(catchup=False; unless the session already has it), unpausing billing_reconcile runs the queued ``stripe/pushed`` events, and
unpausing billing_retention_purge starts its latest weekly (dry) run. Runs are awaited by
polling their states against a deadline.
"""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys

import pytest
from browser_support import login
from scheduler_support import TERMINAL, prepare_days, runs, wait_for

from billing.orchestration import NIGHTLY_DAG_ID
from billing.platform.dates import arrival_day, logical_date_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

DAYS = [dt.date(2026, 8, 10), dt.date(2026, 8, 11), dt.date(2026, 8, 12)]
RECONCILE, PURGE = "billing_reconcile", "billing_retention_purge"


@pytest.fixture(scope="module")
def first_day_billed(stack, empty_billing_db) -> list[str]:
    """Three arrival days of usage files; the first billed with ``billing run-day``.

    The billing DB and the Stripe emulator start empty: reconciliation compares every org
    in the snapshot or in Stripe, so other tests' customers would be real discrepancies."""
    import httpx
    from stripe_support import emulator_url

    empty_billing_db()
    r = httpx.delete(f"{emulator_url()}/_config/data", timeout=30)
    assert r.status_code == 200, r.text
    orgs = prepare_days(DAYS, orgs=2, events_per_org=40)
    r = subprocess.run(
        [sys.executable, "-m", "billing.cli", "run-day", DAYS[0].isoformat()],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return orgs


@pytest.fixture(scope="module")
def ui(first_day_billed, scheduler):
    """The scheduler starts only after ``billing run-day`` (fixture order)."""
    return scheduler


def _pick(dialog, field: str, when: dt.datetime) -> None:
    """Set a date-time picker of the backfill form (its popover: UTC date and time)."""
    dialog.get_by_text("Select date and time").first.click()
    popover = dialog.page.get_by_role("dialog").filter(has=dialog.page.get_by_text("UTC"))
    popover.get_by_role("textbox", name=field).fill(when.strftime("%Y/%m/%d"))
    popover.get_by_role("textbox", name="HH:mm").fill(when.strftime("%H:%M"))
    dialog.get_by_text("Date Range").click()  # closes the popover


def _day(run: dict) -> dt.date:
    return arrival_day(dt.datetime.fromisoformat(run["logical_date"]))


def _open_trigger(page, base: str, dag_id: str):
    page.goto(f"{base}/dags/{dag_id}", wait_until="domcontentloaded")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog").filter(has_text=re.compile(r"Trigger Dag|Run Backfill"))
    dialog.wait_for()
    return dialog


def test_backfill_after_run_day_and_triggers_with_form_defaults(ui, browser, tmp_path):
    from playwright.sync_api import expect

    from billing.platform import db

    client = ui.client
    before = {dag: set(runs(client, dag)) for dag in (NIGHTLY_DAG_ID, RECONCILE, PURGE)}
    nightly_before = runs(client, NIGHTLY_DAG_ID).values()
    billed = [_day(r) for r in nightly_before if _day(r) in DAYS]
    assert billed == [DAYS[0]]  # billing run-day's run, at the scheduler's logical date
    # Unpausing starts the scheduler's latest run (arrival day yesterday), unless an earlier
    # test of this session already made it (the month-close scheduler test does).
    yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    latest = (
        []
        if any(r["run_type"] == "scheduled" and _day(r) == yesterday for r in nightly_before)
        else [("scheduled", yesterday, "success")]
    )

    context, page = login(browser, ui.base, ui.password)
    try:
        # Backfill D1..D3 with the form's defaults: Missing Runs skips D1 (billing run-day).
        dialog = _open_trigger(page, ui.base, NIGHTLY_DAG_ID)
        dialog.get_by_text("Backfill", exact=True).click()
        _pick(dialog, "From", logical_date_of(DAYS[0]))
        _pick(dialog, "To", logical_date_of(DAYS[-1]))
        expect(dialog.get_by_role("radio", name="Missing Runs")).to_be_checked()
        expect(dialog.get_by_role("checkbox", name=re.compile("^Unpause"))).to_be_checked()
        expect(dialog.get_by_text("2 runs will be triggered.")).to_be_visible()
        dialog.get_by_role("button", name="Run Backfill").click()
        expect(dialog).to_be_hidden(timeout=60_000)  # the form closes once it is created
        backfills = client.get("/api/v2/backfills", params={"dag_id": NIGHTLY_DAG_ID}).json()
        assert [(b["from_date"][:10], b["to_date"][:10], b["reprocess_behavior"])
                for b in backfills["backfills"]] == [
            (DAYS[0].isoformat(), DAYS[-1].isoformat(), "none")
        ]  # fmt: skip

        # billing_reconcile with its defaults: nothing typed, the form submits.
        dialog = _open_trigger(page, ui.base, RECONCILE)
        for field in ("Period (YYYY-MM)", "Idempotency key"):
            group = dialog.get_by_role("group").filter(has_text=field)
            expect(group.get_by_role("textbox")).to_have_value("")
        trigger = dialog.get_by_role("button", name="Trigger")
        expect(trigger).to_be_enabled()
        trigger.click()
        expect(dialog).to_be_hidden(timeout=60_000)

        # A dry-run purge with its defaults: Dry run ticked, no confirmation typed.
        dialog = _open_trigger(page, ui.base, PURGE)
        expect(dialog.get_by_role("checkbox", name="Dry run")).to_be_checked()
        trigger = dialog.get_by_role("button", name="Trigger")
        expect(trigger).to_be_enabled()
        trigger.click()
        expect(dialog).to_be_hidden(timeout=60_000)
        page.screenshot(path=str(tmp_path / "triggered.png"), full_page=True)
    finally:
        context.close()

    def new(dag: str, current: dict[str, dict]) -> dict[str, dict]:
        return {k: v for k, v in current.items() if k not in before[dag]}

    def nightly_done(current):
        mine = new(NIGHTLY_DAG_ID, current)
        return len(mine) == 2 + len(latest) and all(v["state"] in TERMINAL for v in mine.values())

    nightly = new(NIGHTLY_DAG_ID, wait_for(client, NIGHTLY_DAG_ID, nightly_done, "the backfill"))

    def queue_empty() -> bool:
        r = client.get(f"/api/v2/dags/{RECONCILE}/assets/queuedEvents")
        assert r.status_code in (200, 404), r.text
        return r.status_code == 404 or r.json()["total_entries"] == 0

    def settled(dag: str, least: int):
        def done(current):
            mine = new(dag, current)
            return (
                len(mine) >= least
                and all(v["state"] in TERMINAL for v in mine.values())
                and (dag != RECONCILE or queue_empty())
            )

        return done

    reconciles = new(RECONCILE, wait_for(client, RECONCILE, settled(RECONCILE, 2), "reconcile"))
    purges = new(PURGE, wait_for(client, PURGE, settled(PURGE, 2), "the purge runs"))

    # No run failed, whichever way it was made.
    by_type = sorted((v["run_type"], _day(v), v["state"]) for v in nightly.values())
    assert by_type == [("backfill", DAYS[1], "success"), ("backfill", DAYS[2], "success"), *latest]
    for run_id, v in nightly.items():
        # The run list's logical date is the arrival day; the scheduler's run ids name it
        # too, backfill ids are Airflow's own (its backfill never asks the timetable).
        if v["run_type"] == "scheduled":
            assert f"arrival-{_day(v).isoformat()}" in run_id, run_id
        else:
            assert (
                run_id == f"backfill__{(_day(v) + dt.timedelta(days=1)).isoformat()}T00:00:00+00:00"
            )
    assert {v["run_type"] for v in reconciles.values()} == {"manual", "asset_triggered"}
    assert {v["state"] for v in reconciles.values()} == {"success"}
    assert sorted(v["run_type"] for v in purges.values()) == ["manual", "scheduled"]
    assert {v["state"] for v in purges.values()} == {"success"}
    manual_purge = next(k for k, v in purges.items() if v["run_type"] == "manual")
    manual_reconcile = next(k for k, v in reconciles.items() if v["run_type"] == "manual")

    with db.connect() as cx:
        files = cx.execute(
            """SELECT arrival_day, count(*), count(*) FILTER (WHERE status = 'loaded'),
                      sum(accepted + non_billable)
                 FROM billing.usage_files GROUP BY 1 ORDER BY 1"""
        ).fetchall()
        events = cx.execute(
            """SELECT arrival_day, count(*), count(DISTINCT event_id)
                 FROM billing.usage_events GROUP BY 1 ORDER BY 1"""
        ).fetchall()
        purge_actions = cx.execute(
            "SELECT DISTINCT dry_run, action FROM billing.retention_purge_audit WHERE run_id = %s",
            (manual_purge,),
        ).fetchall()
        reconciled = cx.execute(
            "SELECT status FROM billing.reconcile_runs WHERE run_id = %s", (manual_reconcile,)
        ).fetchall()
    # Every arrival day ingested exactly once: one loaded file, each event once.
    assert [(d, n, loaded) for d, n, loaded, _ in files] == [(d, 1, 1) for d in DAYS]
    stored = {d: int(n) for d, _, _, n in files}
    assert {d: (n, distinct) for d, n, distinct in events} == {d: (n, n) for d, n in stored.items()}
    assert all(stored.values())
    assert purge_actions and {dry for dry, _ in purge_actions} == {True}
    assert {a for _, a in purge_actions} <= {"would_drop", "kept"}
    assert reconciled == [("passed",)]
