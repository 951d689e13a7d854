"""The Billing page and its actions through the REAL Airflow API server.

``GET /billing/ui`` (the Admin → Billing view), ``POST /billing/reconcile/runs`` (Reconcile
now: one DAG run per Idempotency-Key) and ``POST /billing/stripe/parked/{key}/retry``.
The server and its admin client come from ``tests/integration/conftest.py``.
"""

from __future__ import annotations

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
    for path in ("/billing/ui", "/billing/ui/assets/page.js", "/billing/overview"):
        assert anon.get(path).status_code == 401, path
        assert anon.get(path, headers={"Authorization": "Bearer nope"}).status_code == 403, path
    key = str(uuid.uuid4())
    r = anon.post("/billing/reconcile/runs", json={}, headers={"Idempotency-Key": key})
    assert r.status_code == 401
    r = anon.post("/billing/stripe/parked/billing:customer:x/retry", json={})
    assert r.status_code == 401


def test_admin_menu_has_the_billing_view(airflow_client):
    plugins = airflow_client.get("/api/v2/plugins").json()["plugins"]
    views = [v for p in plugins if p["name"] == "billing" for v in p["external_views"]]
    assert len(views) == 1
    assert {k: views[0][k] for k in ("name", "href", "destination", "category", "url_route")} == {
        "name": "Billing",
        "href": "/billing/ui",
        "destination": "nav",
        "category": "admin",
        "url_route": "billing",
    }


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
    from billing import db, stripe_sync
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
