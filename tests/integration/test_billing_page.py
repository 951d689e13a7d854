"""The Billing page and its actions through the REAL Airflow API server.

``GET /billing/ui`` (the Admin → Billing view), ``POST /billing/reconcile/runs`` (Reconcile
now: one DAG run per Idempotency-Key) and ``POST /billing/stripe/parked/{key}/retry``.
The server and its admin client come from ``tests/integration/conftest.py``.
"""

from __future__ import annotations

import datetime as dt
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.integration

BILLING_DAGS = {
    "billing_dunning",
    "billing_nightly",
    "billing_reconcile",
    "billing_retention_purge",
    "billing_retry_parked",
    "billing_subscriptions",
}


@pytest.fixture(scope="module")
def anon(airflow_server):
    with httpx.Client(base_url=airflow_server.base, timeout=30) as c:
        yield c


def reconcile_runs(client: httpx.Client, key: str) -> list[dict]:
    r = client.get(
        "/api/v2/dags/billing_reconcile/dagRuns", params={"run_id_pattern": key, "limit": 100}
    )
    assert r.status_code == 200, r.text
    return r.json()["dag_runs"]


def reconcile_now(client: httpx.Client, key: str, period: str = "2026-01") -> httpx.Response:
    return client.post(
        "/billing/reconcile/runs", json={"period": period}, headers={"Idempotency-Key": key}
    )


def test_page_and_actions_require_authentication(anon):
    for path in (
        "/billing/ui",
        "/billing/ui/health",
        "/billing/ui/assets/page.js",
        "/billing/overview",
        "/billing/orgs/someorg/credits",
    ):
        assert anon.get(path).status_code == 401, path
        assert anon.get(path, headers={"Authorization": "Bearer nope"}).status_code == 403, path
    key = str(uuid.uuid4())
    r = anon.post("/billing/reconcile/runs", json={}, headers={"Idempotency-Key": key})
    assert r.status_code == 401
    r = anon.post("/billing/stripe/parked/billing:customer:x/retry", json={})
    assert r.status_code == 401


def test_admin_menu_has_the_billing_and_health_views(airflow_client):
    plugins = airflow_client.get("/api/v2/plugins").json()["plugins"]
    views = [v for p in plugins if p["name"] == "billing" for v in p["external_views"]]
    keys = ("name", "href", "destination", "category", "url_route")
    assert [{k: v[k] for k in keys} for v in views] == [
        {
            "name": "Billing",
            "href": "/billing/ui",
            "destination": "nav",
            "category": "admin",
            "url_route": "billing",
        },
        {  # the playbook's Admin → Health: the RED tiles on their own
            "name": "Health",
            "href": "/billing/ui/health",
            "destination": "nav",
            "category": "admin",
            "url_route": "billing-health",
        },
    ]


def test_health_view_renders_the_red_tiles(airflow_client):
    r = airflow_client.get("/billing/ui/health")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    for dag_id in BILLING_DAGS:
        assert f'data-testid="red-tile" data-dag-id="{dag_id}"' in html, dag_id
    assert 'data-testid="stripe-status"' not in html and 'id="reconcile-now"' not in html
    # One level below /billing/ui: assets and the UI's links resolve from there.
    assert 'href="assets/page.css"' in html and 'src="assets/page.js"' in html
    assert 'href="../../dags/billing_nightly' in html
    assert airflow_client.get("/billing/ui/assets/page.css").status_code == 200


def test_page_renders_tiles_status_and_reconciliation(airflow_client, latest_reconciliation):
    r = airflow_client.get("/billing/ui")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store"
    html = r.text
    for dag_id in BILLING_DAGS:
        assert f'data-testid="red-tile" data-dag-id="{dag_id}"' in html, dag_id
    for metric in ("rate", "errors", "duration"):
        assert f'data-metric="{metric}"' in html
    assert 'data-testid="stripe-status"' in html and "writable" in html
    assert "2031-07" in html and "page-org-2" in html
    assert "page-org-3" not in html  # matches are not discrepancies
    # Data is escaped: the org id's markup is text, never HTML.
    assert "&lt;b&gt;evil&lt;/b&gt;" in html and "<b>evil</b>" not in html
    # Amounts are money in the invoice currency, not raw cents.
    assert "<td>$10.00</td>" in html and "<td>$12.50</td>" in html and "<td>$2.50</td>" in html
    assert 'id="reconcile-now"' in html
    js = airflow_client.get("/billing/ui/assets/page.js")
    assert js.status_code == 200 and "Idempotency-Key" in js.text
    assert airflow_client.get("/billing/ui/assets/..%2Fapi.py").status_code == 404


def test_org_credits_json_and_the_pages_panel(airflow_client):
    from test_billing_page_browser import _org_with_credit

    org = _org_with_credit("7.50")
    body = airflow_client.get(f"/billing/orgs/{org}/credits").json()
    assert (body["org_id"], body["balance_cents"], body["currency"]) == (org, 750, "usd")
    assert [m["type"] for m in body["movements"]] == ["grant"]
    assert airflow_client.get("/billing/orgs/nobody/credits").status_code == 404
    assert airflow_client.get("/billing/orgs/bad%20id/credits").status_code == 422
    html = airflow_client.get("/billing/ui", params={"org": org}).text
    assert 'data-testid="credits-balance"' in html and "$7.50" in html
    # the same org's plans over time, with who changed them
    from billing import subscriptions
    from billing.platform import db

    with db.transaction() as cx:
        subscriptions.change_plan(
            cx,
            org,
            "starter",
            dt.date(2026, 3, 15),
            actor="cli:finance",
            source="cli",
            reason="TKT-7 downgrade",
        )
    html = airflow_client.get("/billing/ui", params={"org": org}).text
    assert "<td>growth</td><td>[-infinity, 2026-03-15)</td>" in html
    assert "<td>starter</td><td>[2026-03-15, open)</td>" in html
    assert "<td>cli:finance</td><td>cli</td><td>change</td>" in html
    assert "<td>TKT-7 downgrade</td>" in html


def test_overview_counts_runs_errors_and_durations(airflow_client):
    """A failed run of billing_dunning shows up in its tile's error count."""
    run_id = f"page_test_{uuid.uuid4().hex[:8]}"
    r = airflow_client.post(
        "/api/v2/dags/billing_dunning/dagRuns",
        json={"dag_run_id": run_id, "logical_date": None, "conf": {}},
    )
    assert r.status_code == 200, r.text
    r = airflow_client.patch(
        f"/api/v2/dags/billing_dunning/dagRuns/{run_id}", json={"state": "failed"}
    )
    assert r.status_code == 200, r.text
    body = airflow_client.get("/billing/overview").json()
    assert body["flows"]["error"] is None
    tiles = {t["dag_id"]: t for t in body["flows"]["tiles"]}
    assert BILLING_DAGS <= set(tiles)
    dunning = tiles["billing_dunning"]
    assert dunning["runs"] >= 1 and dunning["failed"] >= 1 and dunning["finished"] >= 1
    assert dunning["error_rate"] > 0 and dunning["health"] in ("failing", "degraded")
    assert dunning["rate_per_day"] == round(dunning["runs"] / body["window_days"], 2)
    assert {"duration_p50", "duration_p95"} <= set(dunning)
    assert body["stripe"]["read_only"] is False


def test_reconcile_now_starts_one_run_per_idempotency_key(airflow_client):
    key = str(uuid.uuid4())
    first = reconcile_now(airflow_client, key)
    assert first.status_code == 201, first.text
    run = first.json()
    assert run["created"] is True and run["dag_id"] == "billing_reconcile"
    assert run["dag_run_id"] == f"billing_page__{key}"
    assert run["conf"] == {"idempotency_key": key, "period": "2026-01"}
    assert run["url"] == f"dags/billing_reconcile/runs/billing_page__{key}"
    assert run["state"] in ("queued", "running")
    again = reconcile_now(airflow_client, key)  # a double click / a client retry
    assert again.status_code == 200, again.text
    assert again.json()["dag_run_id"] == run["dag_run_id"] and again.json()["created"] is False
    assert [r["dag_run_id"] for r in reconcile_runs(airflow_client, key)] == [run["dag_run_id"]]
    # The same key for another period is a client bug: refused, nothing started.
    assert reconcile_now(airflow_client, key, "2026-02").status_code == 409
    assert len(reconcile_runs(airflow_client, key)) == 1
    # A fresh key is a new run.
    other = reconcile_now(airflow_client, str(uuid.uuid4()))
    assert other.status_code == 201 and other.json()["dag_run_id"] != run["dag_run_id"]


def test_reconcile_now_concurrent_repeats_start_one_run(airflow_client):
    key = str(uuid.uuid4())
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: reconcile_now(airflow_client, key), range(4)))
    assert all(a.status_code in (200, 201) for a in answers), [
        (a.status_code, a.text[:300]) for a in answers
    ]
    assert sum(a.json()["created"] for a in answers) == 1
    assert len({a.json()["dag_run_id"] for a in answers}) == 1
    assert len(reconcile_runs(airflow_client, key)) == 1


def test_reconcile_now_validates_its_input(airflow_client):
    assert airflow_client.post("/billing/reconcile/runs", json={}).status_code == 422  # no key
    bad_key = reconcile_now(airflow_client, "short")
    assert bad_key.status_code == 422
    assert reconcile_now(airflow_client, str(uuid.uuid4()), "2026-13").status_code == 422
    form = airflow_client.post(
        "/billing/reconcile/runs",
        content=b"period=2026-01",
        headers={"Idempotency-Key": str(uuid.uuid4()), "Content-Type": "text/plain"},
    )
    assert form.status_code in (415, 422)


def test_parked_retry_sends_the_push(airflow_client, parked_customer):
    from billing import stripe_sync
    from billing.platform import db
    from billing.stripe_sync import outbox

    key = parked_customer
    page = airflow_client.get("/billing/ui").text
    assert f'data-key="{key}"' in page
    parked = airflow_client.get("/billing/overview").json()["parked"]["items"]
    assert key in [p["idempotency_key"] for p in parked]
    r = airflow_client.post(f"/billing/stripe/parked/{key}/retry", json={})
    assert r.status_code == 200, r.text
    assert r.json()["still_parked"] is False and r.json()["result"]["requeued"] == 1, r.json()
    assert key not in [p["idempotency_key"] for p in stripe_sync.list_parked()]
    with db.connect() as cx:
        assert outbox.get(cx, key)["status"] == "sent"
    # Nothing parked under that key any more: 404, and unknown keys are 404 too.
    assert airflow_client.post(f"/billing/stripe/parked/{key}/retry", json={}).status_code == 404
    assert (
        airflow_client.post("/billing/stripe/parked/billing:nope:x/retry", json={}).status_code
        == 404
    )
    assert airflow_client.post("/billing/stripe/parked/a b/retry", json={}).status_code == 422


def test_parked_retry_refused_while_stripe_is_read_only(airflow_client, parked_customer):
    from billing import stripe_sync

    stripe_sync.set_read_only(True, "page test")
    try:
        r = airflow_client.post(f"/billing/stripe/parked/{parked_customer}/retry", json={})
        assert r.status_code == 409, r.text
        assert parked_customer in [p["idempotency_key"] for p in stripe_sync.list_parked()]
        assert "read-only" in airflow_client.get("/billing/ui").text
    finally:
        stripe_sync.set_read_only(False)
    assert (
        airflow_client.post(f"/billing/stripe/parked/{parked_customer}/retry", json={}).status_code
        == 200
    )


def test_web_process_never_imports_chdb_or_dbt(airflow_client, airflow_server):
    for path in ("/billing/ui", "/billing/overview", "/billing/health", "/billing/metrics"):
        assert airflow_client.get(path).status_code == 200, path
    assert airflow_server.forbidden_imports() == []


@pytest.fixture
def unreachable_push(airflow_server, monkeypatch):
    """A customer write the real engine parked: Stripe unreachable (connection refused)."""
    from faultproxy import FaultProxy
    from stripe_support import emulator_url, point_stripe_at

    from billing.platform import db
    from billing.stripe_sync import Engine, outbox, parking, push

    org = f"down-{uuid.uuid4().hex[:10]}"
    write = push.customer_write({"org_id": org, "name": "Unreachable"}, dt.date(2026, 1, 1))
    with db.transaction() as cx:
        # Open rows earlier tests of this session left behind would change the page's
        # status ('queued'); set them aside for this test and put them back after.
        aside = cx.execute(
            """UPDATE billing.stripe_outbox o SET status = 'cancelled'
                 FROM billing.stripe_outbox prior
                WHERE o.outbox_id = prior.outbox_id AND o.status IN ('pending', 'parked')
            RETURNING o.outbox_id, prior.status"""
        ).fetchall()
        outbox.enqueue(cx, [write])
        row = outbox.get(cx, write.idempotency_key)
    proxy = FaultProxy(emulator_url()).start()
    point_stripe_at(monkeypatch, proxy.url)
    proxy.stop()
    monkeypatch.setenv("BILLING_STRIPE_TIMEOUT_SECONDS", "0.5")
    result = Engine(sleep=lambda s: None).drain(ids=[row["outbox_id"]])
    assert result["parked"] == 1, result
    point_stripe_at(monkeypatch, emulator_url())
    yield write.idempotency_key
    parking.unpark(parking.client(), write.idempotency_key)
    with db.transaction() as cx:
        cx.execute(
            """UPDATE billing.stripe_outbox SET status = 'cancelled'
                WHERE idempotency_key = %s AND status <> 'sent'""",
            (write.idempotency_key,),
        )
        for outbox_id, status in aside:
            cx.execute(
                "UPDATE billing.stripe_outbox SET status = %s WHERE outbox_id = %s",
                (status, outbox_id),
            )


def test_stripe_status_says_unreachable_while_writes_are_parked(airflow_client, unreachable_push):
    from billing.platform import db
    from billing.stripe_sync import outbox

    with db.connect() as cx:
        row = outbox.get(cx, unreachable_push)
        (updated_at,) = cx.execute(
            "SELECT updated_at FROM billing.stripe_outbox WHERE idempotency_key = %s",
            (unreachable_push,),
        ).fetchone()
    assert (row["status"], row["last_error_class"]) == ("parked", "connection")
    delivery = airflow_client.get("/billing/overview").json()["delivery"]
    since = row["parked_at"].astimezone(dt.UTC).isoformat(timespec="seconds")
    at = updated_at.astimezone(dt.UTC).isoformat(timespec="seconds")
    assert delivery == {
        "state": "unreachable",
        "text": f"1 writes parked since {since} (last error connection at {at}: "
        f"{row['last_error']})",
        "error": None,
    }
    html = airflow_client.get("/billing/ui").text
    assert 'data-state="unreachable"' in html and ">unreachable</span>" in html
    assert "pushes go out normally" not in html
    # Sent again (Stripe is back): the line is writable again.
    r = airflow_client.post(f"/billing/stripe/parked/{unreachable_push}/retry", json={})
    assert r.status_code == 200 and r.json()["still_parked"] is False, r.text
    assert airflow_client.get("/billing/overview").json()["delivery"]["state"] == "writable"


def test_a_task_up_for_retry_counts_in_the_error_tile(airflow_client):
    """A run still running, whose task waits for its retry, is an error, not healthy."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    dag_id = "billing_retention_purge"
    before = {
        t["dag_id"]: t for t in airflow_client.get("/billing/overview").json()["flows"]["tiles"]
    }[dag_id]
    run_id = f"page_retry_{uuid.uuid4().hex[:8]}"
    r = airflow_client.post(
        f"/api/v2/dags/{dag_id}/dagRuns",
        json={"dag_run_id": run_id, "logical_date": None, "conf": {}},
    )
    assert r.status_code == 200, r.text
    # As the scheduler leaves it after a failed first try: run running, task up_for_retry.
    with create_session() as session:
        run = session.scalar(select(DagRun).where(DagRun.run_id == run_id))
        run.state = "running"
        tis = session.scalars(select(TaskInstance).where(TaskInstance.run_id == run_id)).all()
        assert tis, "the triggered run has task instances"
        tis[0].state = "up_for_retry"
        tis[0].try_number = 1
    tiles = {
        t["dag_id"]: t for t in airflow_client.get("/billing/overview").json()["flows"]["tiles"]
    }
    tile = tiles[dag_id]
    assert tile["retrying"] == before["retrying"] + 1
    assert tile["errors"] == before["errors"] + 1
    assert tile["counted"] == before["counted"] + 1
    assert tile["error_rate"] > 0 and tile["health"] == "degraded"
    assert tile["last_run"] == {**tile["last_run"], "dag_run_id": run_id, "outcome": "retrying"}
    html = airflow_client.get("/billing/ui/health").text
    assert "1 retrying" in html


def test_parked_amounts_show_in_their_currency(airflow_client):
    """Finance reads €985.61 and ¥3,600 on the page, never 98561 next to 3600."""
    from billing.platform import db

    tag = uuid.uuid4().hex[:8]
    rows = [(f"eur-{tag}", 98561, "eur"), (f"jpy-{tag}", 3600, "jpy")]
    with db.connect(autocommit=True) as cx:
        for org, cents, cur in rows:
            cx.execute(
                """INSERT INTO billing.stripe_outbox (idempotency_key, kind, org_id, period, day,
                       metric, amount_cents, currency, payload, status, attempts, parked_at)
                   VALUES (%s, 'usage_item', %s, '2026-11-01', '2026-11-03', 'api_calls', %s,
                           %s, '{}', 'parked', 6, now())""",
                (f"billing:usage_item:{org}:2026-11:2026-11-03:api_calls", org, cents, cur),
            )
    try:
        page = airflow_client.get("/billing/ui")
        assert page.status_code == 200, page.text
        for org, money in ((rows[0][0], "€985.61"), (rows[1][0], "¥3,600")):
            row = page.text.split(f'data-key="billing:usage_item:{org}:', 1)[1].split("</tr>")[0]
            assert f'<td class="num">{money}</td>' in row
        assert ">98561<" not in page.text and "98561 eur" not in page.text
    finally:
        with db.connect(autocommit=True) as cx:
            cx.execute(
                "UPDATE billing.stripe_outbox SET status = 'cancelled' WHERE org_id = ANY(%s)",
                ([r[0] for r in rows],),
            )
