"""Production-shaped runs: a real scheduler, two Celery workers, a PostgreSQL metadata DB.

``billing stack up --executor celery`` (billing_dev.stack.celery) on the session's stack:
api-server, scheduler, dag-processor and two ``airflow celery worker`` processes, each with
its own working and temporary directory, the metadata DB in its own PostgreSQL database and
Redis as the broker. Nothing here runs a task in the test process: runs are created through
the REST API and the scheduler hands every task to a worker.

One module, one story, in the order a real week would have it:

1. Three nightly runs across a month end (arrival days 30 and 31 October and 1 November)
   are triggered through the REST API before the DAGs are unpaused; unpausing lets the
   scheduler start them in order, and add its own scheduled run of yesterday (catchup is
   off). Each push updates the ``billing://stripe/pushed`` asset, which schedules
   ``billing_reconcile``.
2. During the third night's Stripe push the worker running it is killed (SIGKILL on its
   whole process tree) while its request is held in the Stripe emulator. The scheduler
   finds the task's heartbeat gone, fails that try and retries it on the other worker.
3. Checked to the cent: October's invoices (closed in 1 November's run, the first run of a
   later month) against the Python reference and Stripe, 1 November's items once each, the
   reconciliations passed; every event once.
4. ``billing_dunning`` (the run unpausing schedules) and ``billing_retry_parked`` run on the
   workers; dunning sees every open invoice with Stripe's due date. Payment terms run from
   the real day the invoices were finalized, so none is overdue and no notice goes out (a
   run as of a later day would be a run in the future, which Airflow does not start).

Slow (about 8 minutes): marked ``slow``; CI runs it.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.parse
import urllib.request
from collections import Counter
from decimal import Decimal

import httpx
import pytest
from scheduler_support import TERMINAL, prepare_days, runs, wait_for

from billing.orchestration import NIGHTLY_DAG_ID
from billing.platform.dates import logical_date_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAYS = [dt.date(2026, 10, 30), dt.date(2026, 10, 31), dt.date(2026, 11, 1)]
OCTOBER = dt.date(2026, 10, 1)
KILL_DAY = DAYS[-1]
RECONCILE, DUNNING, RETRY = "billing_reconcile", "billing_dunning", "billing_retry_parked"
ORGS = 3


def _emulator(path: str, method: str = "POST", **params) -> tuple[int, dict]:
    from stripe_support import emulator_url

    query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
    url = f"{emulator_url()}/_emulator/{path}"
    if method == "GET":
        request = urllib.request.Request(f"{url}?{query}")
    else:
        request = urllib.request.Request(url, data=query.encode())
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture(scope="module")
def cluster(stack, empty_billing_db):
    """The distributed mode on an empty billing DB and an empty Stripe emulator (the
    reconciliation compares every org on either side)."""
    from stripe_support import emulator_url

    from billing_dev.stack.celery import CeleryCluster

    empty_billing_db()
    r = httpx.delete(f"{emulator_url()}/_config/data", timeout=30)
    assert r.status_code == 200, r.text
    c = CeleryCluster(stack, workers=2)
    c.down()  # a cluster left by an interrupted session
    c.up()
    try:
        yield c
    finally:
        c.down()


@pytest.fixture(scope="module")
def client(cluster):
    password = json.loads((cluster.home / "passwords.json").read_text())["admin"]
    token = httpx.post(
        f"{cluster.base_url}/auth/token",
        json={"username": "admin", "password": password},
        timeout=30,
    ).json()["access_token"]
    with httpx.Client(
        base_url=cluster.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as c:
        deadline = time.monotonic() + 180
        wanted = {NIGHTLY_DAG_ID, RECONCILE, DUNNING, RETRY}
        while True:  # the dag-processor has parsed the DAG files into the new metadata DB
            dags = c.get("/api/v2/dags", params={"tags": "billing", "limit": 100}).json()
            if wanted <= {d["dag_id"] for d in dags["dags"]}:
                break
            assert time.monotonic() < deadline, f"DAGs not parsed: {dags}"
            time.sleep(1)  # polling interval only
        yield c


def _trigger(client, dag_id: str, logical: dt.datetime, run_id: str, conf=None) -> None:
    r = client.post(
        f"/api/v2/dags/{dag_id}/dagRuns",
        json={
            "logical_date": logical.isoformat(),
            "run_after": min(logical + dt.timedelta(days=1), dt.datetime.now(dt.UTC)).isoformat(),
            "dag_run_id": run_id,
            "conf": conf or {},
        },
    )
    assert r.status_code == 200, r.text


def _task(client, dag_id: str, run_id: str, task_id: str) -> dict:
    r = client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _held_key(keys: list[str], deadline: float) -> str:
    """The first of ``keys`` whose request reached its hold in the emulator."""
    while time.monotonic() < deadline:
        for key in keys:
            status, _ = _emulator("holds/wait", "GET", idempotency_key=key, timeout=0.2)
            if status == 200:
                return key
    pytest.fail(f"no Stripe request held for {keys}")


def _invoices(stripe, customer: str) -> list[dict]:
    found = stripe.v1.invoices.list(params={"customer": customer, "limit": 100})
    assert not found["has_more"]
    return [i.to_dict() for i in found["data"]]


def _stripe_side(stripe, by_org: dict[str, str], orgs: list[str]):
    """October's finalized invoice total per org, and the kill day's items: how often each
    (org, metric) appears and its amount."""
    from stripe_support import stripe_items

    finalized, items, amounts = {}, Counter(), {}
    for org in orgs:
        found = _invoices(stripe, by_org[org])
        october = [i for i in found if (i.get("metadata") or {}).get("period") == "2026-10"]
        assert len(october) == 1, (org, october)
        finalized[org] = october[0]["total"]
        for item in (i.to_dict() for i in stripe_items(stripe, by_org[org])):
            meta = item.get("metadata") or {}
            if meta.get("day") == KILL_DAY.isoformat():
                items[(org, meta.get("metric"))] += 1
                amounts[(org, meta.get("metric"))] = item["amount"]
    return finalized, items, amounts


def test_three_nights_across_a_month_end_and_a_killed_worker(cluster, client):
    from stripe_support import customers, direct_client

    from billing import pricing
    from billing.platform import db, settings
    from billing.pricing import reference
    from billing.pricing.aggregation import BillableEvent
    from billing.stripe_sync.outbox import key_for

    orgs = prepare_days(DAYS, orgs=ORGS)
    catalog = pricing.load_catalog()
    kill_keys = [
        key_for("usage", org, KILL_DAY.replace(day=1), KILL_DAY, metric)
        for org in orgs
        for metric in sorted(catalog.metrics)
    ]
    for key in kill_keys:  # the third night's item writes wait in the emulator until released
        assert _emulator("holds", idempotency_key=key)[0] == 200

    before = set(runs(client, NIGHTLY_DAG_ID))
    for day in DAYS:
        _trigger(client, NIGHTLY_DAG_ID, logical_date_of(day), f"celery__arrival-{day}")
    for dag_id in (NIGHTLY_DAG_ID, RECONCILE):
        r = client.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        assert r.status_code == 200, r.text

    # ---- the kill: the worker running the third night's push dies mid-request
    kill_run = f"celery__arrival-{KILL_DAY}"
    held = _held_key(kill_keys, time.monotonic() + 900)
    push = _task(client, NIGHTLY_DAG_ID, kill_run, "stripe_push")
    assert push["state"] == "running" and push["try_number"] == 1, push
    victim = cluster.worker_of(push["pid"])
    assert victim in cluster.worker_pids(), (push["pid"], cluster.worker_pids())
    survivor = next(n for n in cluster.worker_pids() if n != victim)
    killed = cluster.kill_worker(victim)
    assert push["pid"] in killed
    for key in kill_keys:  # the held request completes in Stripe; nobody reads its answer
        _emulator("holds/release", idempotency_key=key)

    def nightly_done(current: dict[str, dict]) -> bool:
        mine = {k: v for k, v in current.items() if k not in before}
        return len(mine) == len(DAYS) + 1 and all(v["state"] in TERMINAL for v in mine.values())

    nightly = wait_for(client, NIGHTLY_DAG_ID, nightly_done, "the nightly runs", timeout=1500)
    mine = {k: v for k, v in nightly.items() if k not in before}
    assert {k: v["state"] for k, v in mine.items()} == dict.fromkeys(mine, "success")
    assert sorted(v["run_type"] for v in mine.values()) == ["manual"] * 3 + ["scheduled"]
    retried = _task(client, NIGHTLY_DAG_ID, kill_run, "stripe_push")
    assert (retried["state"], retried["try_number"]) == ("success", 2), retried
    assert list(cluster.worker_pids()) == [survivor]  # so try 2 ran there
    assert held in kill_keys

    def queue_empty() -> bool:
        r = client.get(f"/api/v2/dags/{RECONCILE}/assets/queuedEvents")
        assert r.status_code in (200, 404), r.text
        return r.status_code == 404 or r.json()["total_entries"] == 0

    def reconciled(current: dict[str, dict]) -> bool:
        return (
            bool(current)
            and all(v["state"] in TERMINAL for v in current.values())
            and queue_empty()
        )

    reconciles = wait_for(client, RECONCILE, reconciled, "the asset-triggered reconciles")
    assert {v["run_type"] for v in reconciles.values()} == {"asset_triggered"}
    assert {v["state"] for v in reconciles.values()} == {"success"}

    # ---- exact: events, October's invoices, 1 November's items
    with db.connect() as cx:
        files = cx.execute(
            """SELECT arrival_day, count(*), sum(accepted + non_billable)
                 FROM billing.usage_files WHERE status = 'loaded' GROUP BY 1 ORDER BY 1"""
        ).fetchall()
        events = dict(
            cx.execute(
                """SELECT arrival_day, count(DISTINCT event_id) FROM billing.usage_events
                    GROUP BY 1"""
            ).fetchall()
        )
        usage = cx.execute(
            """SELECT e.org_id, e.metric, e.event_id, e.occurred_at, e.quantity, e.properties
                 FROM billing.usage_events e
                WHERE e.occurred_at >= %s AND e.occurred_at < %s AND e.billable""",
            (dt.datetime(2026, 10, 1, tzinfo=dt.UTC), dt.datetime(2026, 11, 1, tzinfo=dt.UTC)),
        ).fetchall()
        plans = dict(cx.execute("SELECT org_id, plan FROM billing.organizations").fetchall())
        snapshot = settings.snapshot_schema()
        invoices = dict(
            cx.execute(
                f"SELECT org_id, total_cents FROM {snapshot}.fct_invoices WHERE period_start = %s",
                (OCTOBER,),
            ).fetchall()
        )
        daily = {
            (org, metric): int(cents)
            for org, metric, cents in cx.execute(
                f"""SELECT org_id,  -- the charge label Stripe items carry (pricing.charge_label)
                          metric || CASE WHEN dimension_key <> '' THEN ' ' || dimension_key
                                         ELSE '' END,
                          daily_charge_cents FROM {snapshot}.fct_daily_charges
                     WHERE usage_date = %s AND daily_charge_cents <> 0""",
                (KILL_DAY,),
            ).fetchall()
        }
        closes = dict(
            cx.execute(
                "SELECT period, closed_on_day FROM billing.period_closes WHERE period = %s",
                (OCTOBER,),
            ).fetchall()
        )
        reconciled = dict(
            cx.execute("SELECT period, bool_and(status = 'passed') FROM billing.reconcile_runs "
                       "GROUP BY 1").fetchall()
        )  # fmt: skip
    assert [(d, n) for d, n, _ in files] == [(d, 1) for d in DAYS]  # each file loaded once
    assert {d: events.get(d) for d in DAYS} == {d: int(n) for d, _, n in files}
    assert closes == {OCTOBER: DAYS[-1]}  # October closed in 1 November's run

    events: dict[str, list] = {org: [] for org in orgs}
    for org, metric, event_id, occurred, q, props in usage:
        events[org].append((metric, BillableEvent(event_id, occurred, Decimal(q), props)))
    expected = {  # billing.pricing's reference from the stored events, after October closed
        org: reference.period_total(
            catalog, catalog.plan(plans[org]), events[org], OCTOBER, DAYS[-1]
        )
        for org in orgs
    }
    assert invoices == expected

    stripe = direct_client()
    by_org = customers()
    finalized, items, amounts = _stripe_side(stripe, by_org, orgs)
    assert finalized == expected
    assert set(items.values()) == {1}, items  # no item twice, the killed try's included
    assert amounts == daily
    assert reconciled[OCTOBER] is True and reconciled[KILL_DAY.replace(day=1)] is True, reconciled
    assert set(reconciled.values()) == {True}

    # ---- the other DAGs on the workers: dunning and the parked-write retry
    open_invoices = {
        i["id"]: dt.datetime.fromtimestamp(i["due_date"], dt.UTC).date()
        for org in orgs
        for i in _invoices(stripe, by_org[org])
        if i["status"] == "open"
    }
    assert len(open_invoices) >= len(orgs)  # October's, and the months the scheduled run closed
    mails_before = len(list(settings.mail_dir().glob("*.eml")))
    for dag_id in (DUNNING, RETRY):
        r = client.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        assert r.status_code == 200, r.text
    _trigger(client, RETRY, dt.datetime.now(dt.UTC), "celery__retry", {"all": True})
    scheduled_dunning = wait_for(  # unpausing schedules today's run (catchup is off)
        client, DUNNING, lambda cur: bool(cur) and all(v["state"] in TERMINAL for v in cur.values()),
        "the scheduled dunning run",
    )  # fmt: skip
    assert [v["state"] for v in scheduled_dunning.values()] == ["success"]
    retry = wait_for(
        client, RETRY, lambda cur: cur.get("celery__retry", {}).get("state") in TERMINAL, RETRY
    )
    assert retry["celery__retry"]["state"] == "success"
    with db.connect() as cx:
        synced = {
            invoice: due_at.astimezone(dt.UTC).date()
            for invoice, due_at in cx.execute(
                "SELECT stripe_invoice_id, due_at FROM billing.stripe_invoices"
                " WHERE status = 'open'"
            ).fetchall()
        }
        notices = cx.execute("SELECT count(*) FROM billing.dunning_notices").fetchone()[0]
    # Dunning read on one worker what the nights wrote on others: every open invoice with
    # Stripe's due date. None is overdue yet (payment terms run from today), so no notice.
    assert synced == open_invoices
    assert min(open_invoices.values()) >= dt.datetime.now(dt.UTC).date()
    assert notices == 0 and len(list(settings.mail_dir().glob("*.eml"))) == mails_before
