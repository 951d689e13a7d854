"""The Billing API through the REAL Airflow API server: auth, ETags, 304s, bad ids.

Starts ``airflow api-server`` on the test stack (its env is set in conftest) with our
plugin folder, gets a JWT from ``POST /auth/token`` (SimpleAuthManager) and talks HTTP.
Snapshot rows are inserted directly into ``billing_snapshot.fct_invoices`` /
``fct_invoice_lines`` (created here if dbt has not built them in this database).
"""

from __future__ import annotations

import json
import secrets
import threading
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from billing_dev.stack.api_server import run_api_server

pytestmark = pytest.mark.integration

SCHEMA = "billing_snapshot"
ORG = "apitest-org"
INVOICE = f"inv_{ORG}_202601"
OTHER = f"inv_{ORG}_202602"
CATALOG = "c" * 64  # a catalog version is a content hash

DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.fct_invoices (
    invoice_id text, org_id text, period text, period_start date, period_end date,
    plan text, currency text, base_fee_cents bigint, usage_cents bigint,
    total_cents bigint, line_count integer, status text, catalog_version text,
    snapshot_hash text, as_of_day date);
CREATE TABLE IF NOT EXISTS {SCHEMA}.fct_invoice_lines (
    invoice_line_id text, invoice_id text, line_number integer, org_id text,
    period_start date, line_type text, metric text, pricing_mode text, quantity numeric,
    amount_cents bigint, currency text, tiers jsonb, catalog_version text, aggregation text,
    credited_cents bigint NOT NULL DEFAULT 0, credited_days integer NOT NULL DEFAULT 0,
    dimension_key text NOT NULL DEFAULT '', dimensions jsonb NOT NULL DEFAULT '{{}}',
    segment_start date, segment_end date, plan text,
    charge_label text GENERATED ALWAYS AS (CASE WHEN line_type = 'usage' THEN metric || CASE WHEN dimension_key <> '' THEN ' ' || dimension_key ELSE '' END
        ELSE line_type || coalesce('.' || metric, '') END) STORED);
"""


def drop_invoice(cx, invoice_id: str) -> None:
    cx.execute(f"DELETE FROM {SCHEMA}.fct_invoice_lines WHERE invoice_id = %s", (invoice_id,))
    cx.execute(f"DELETE FROM {SCHEMA}.fct_invoices WHERE invoice_id = %s", (invoice_id,))


@contextmanager
def extra_invoice(invoice_id: str, period: str, total_extra: int):
    """One more invoice of ORG for a test, gone after it (the list test counts ORG's)."""
    from billing.platform import db

    with db.connect(autocommit=True) as cx:
        put_invoice(cx, invoice_id, period, total_extra)
    try:
        yield invoice_id
    finally:
        with db.connect(autocommit=True) as cx:
            drop_invoice(cx, invoice_id)


def put_invoice(cx, invoice_id: str, period: str, total_extra: int, n_lines: int = 3) -> None:
    drop_invoice(cx, invoice_id)
    lines = [("base_fee", None, None, 1, 4900, [])]
    for i in range(n_lines):
        amount = 1000 + i + total_extra
        tiers = [
            {"tier": 1, "from": 0, "up_to": 1000, "unit_price": 0, "quantity": 1000, "amount": 0},
            {
                "tier": 2,
                "from": 1000,
                "up_to": None,
                "unit_price": 0.001,
                "quantity": amount * 10,
                "amount": amount / 100,
            },
        ]
        lines.append(("usage", f"metric_{i}", "graduated", 1000 + amount * 10, amount, tiers))
    total = sum(line[4] for line in lines)
    for n, (kind, metric, mode, qty, cents, tiers) in enumerate(lines, 1):
        cx.execute(
            f"""INSERT INTO {SCHEMA}.fct_invoice_lines (invoice_line_id, invoice_id, line_number,
                   org_id, period_start, line_type, metric, pricing_mode, quantity, amount_cents,
                   currency, tiers, catalog_version)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'usd', %s, %s)""",
            (
                f"{invoice_id}.{n}",
                invoice_id,
                n,
                ORG,
                f"{period}-01",
                kind,
                metric,
                mode,
                qty,
                cents,
                json.dumps(tiers),
                CATALOG,
            ),
        )
    cx.execute(
        f"""INSERT INTO {SCHEMA}.fct_invoices (invoice_id, org_id, period, period_start,
               period_end, plan, currency, base_fee_cents, usage_cents, total_cents, line_count,
               status, catalog_version, snapshot_hash, as_of_day)
            VALUES (%s, %s, %s, %s, (%s::date + interval '1 month' - interval '1 day')::date, 'starter', 'usd', 4900,
                    %s, %s, %s, 'final', %s, md5(%s), %s::date)""",
        (
            invoice_id,
            ORG,
            period,
            f"{period}-01",
            f"{period}-01",
            total - 4900,
            total,
            len(lines),
            CATALOG,
            f"{invoice_id}:{total}:{n_lines}",
            f"{period}-28",
        ),
    )


@pytest.fixture(scope="module")
def snapshot(stack):
    from billing.platform import db

    with db.connect(autocommit=True) as cx:
        cx.execute(DDL)
        cx.execute(
            """INSERT INTO billing.organizations (org_id, name, email, plan, currency)
               VALUES (%s, %s, %s, 'starter', 'usd')
               ON CONFLICT (org_id) DO UPDATE SET name = excluded.name""",
            (ORG, "Ωmega Ćorp — Москва", "billing@apitest.test"),
        )
        put_invoice(cx, INVOICE, "2026-01", 0)
        put_invoice(cx, OTHER, "2026-02", 0)
    yield
    with db.connect(autocommit=True) as cx:
        for table in ("fct_invoice_lines", "fct_invoices"):
            cx.execute(f"DELETE FROM {SCHEMA}.{table} WHERE org_id = %s", (ORG,))


@contextmanager
def _server(home: Path, workers: int, **env: str):
    """The real Airflow API server with our plugin; yields (base URL, password, log)."""
    password = secrets.token_urlsafe(12)
    pwfile = home / "passwords.json"
    pwfile.write_text(json.dumps({"admin": password}))
    env_extra = {
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(pwfile),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "BILLING_STRIPE_STATUS_TTL_S": "0",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    with run_api_server(home, env_extra, workers=workers) as (base, _pid):
        yield base, password, home / "api-server.log"


def _client(base: str, password: str) -> httpx.Client:
    r = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": password})
    assert r.status_code == 201, r.text
    token = r.json()["access_token"]
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)


@pytest.fixture(scope="module")
def pdf_store_uri(tmp_path_factory) -> str:
    return tmp_path_factory.mktemp("pdf-store").as_uri()


@pytest.fixture(scope="module")
def api_server(stack, tmp_path_factory, pdf_store_uri):
    """Two workers, as in production: renders and locks must hold across processes."""
    with _server(tmp_path_factory.mktemp("api"), 2, BILLING_PDF_STORE=pdf_store_uri) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(api_server, snapshot):
    with _client(*api_server[:2]) as c:
        yield c


def renders(api_server, invoice_id: str) -> int:
    """PDFs of ``invoice_id`` rendered by any worker (one log line per render)."""
    return api_server[2].read_text(errors="replace").count(f"billing pdf rendered {invoice_id} ")


@pytest.fixture(scope="module")
def anon(api_server):
    with httpx.Client(base_url=api_server[0], timeout=30) as c:
        yield c


def pdf_path(invoice_id: str = INVOICE) -> str:
    return f"/billing/invoices/{invoice_id}/pdf"


def test_pdf_200_with_strong_etag_and_headers(client):
    r = client.get(pdf_path())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/pdf"
    assert r.content.startswith(b"%PDF-")
    etag = r.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and not etag.startswith("W/")
    assert r.headers["cache-control"] == "private, must-revalidate"
    assert r.headers["content-disposition"] == f'attachment; filename="{INVOICE}.pdf"'
    # The snapshot's data day (as_of_day), not a clock: every worker answers the same.
    assert r.headers["last-modified"] == "Wed, 28 Jan 2026 00:00:00 GMT"
    again = client.get(pdf_path())
    assert again.headers["etag"] == etag and again.content == r.content
    head = client.head(pdf_path())
    assert head.status_code == 200 and head.content == b""
    assert head.headers["etag"] == etag
    assert head.headers["content-length"] == str(len(r.content))
    assert head.headers["content-disposition"] == r.headers["content-disposition"]


def test_if_none_match_gives_304_without_body(client, api_server):
    etag = client.get(pdf_path()).headers["etag"]
    before = renders(api_server, INVOICE)
    for header in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
        r = client.get(pdf_path(), headers={"If-None-Match": header})
        assert r.status_code == 304, header
        assert r.content == b""
        assert r.headers["etag"] == etag
        assert r.headers["cache-control"] == "private, must-revalidate"
        assert r.headers["last-modified"] == "Wed, 28 Jan 2026 00:00:00 GMT"
    assert client.head(pdf_path(), headers={"If-None-Match": etag}).status_code == 304
    assert client.get(pdf_path(), headers={"If-None-Match": '"stale"'}).status_code == 200
    assert renders(api_server, INVOICE) == before


def test_stored_pdf_is_byte_identical_to_a_fresh_render(client, api_server, pdf_store_uri):
    from billing.invoices import store as invoice_store

    served = client.get(pdf_path())
    assert served.status_code == 200
    assert renders(api_server, INVOICE) == 1  # rendered once, served from the store since
    store = invoice_store.PdfStore(pdf_store_uri)
    assert store.get(served.headers["etag"]) == served.content
    with invoice_store.snapshot_connection() as cx:
        etag, fresh = invoice_store.render_current(cx, INVOICE)
    assert etag == served.headers["etag"]
    assert fresh == served.content


def test_demo_pdfs_are_the_apis_bytes(client, tmp_path):
    import datetime as dt

    from billing_dev import demo

    out = demo.write_pdfs(dt.date(2026, 1, 15), tmp_path)
    assert sorted(p.name for p in out.iterdir() if ORG in p.name) == [f"{INVOICE}.pdf"]
    assert (out / f"{INVOICE}.pdf").read_bytes() == client.get(pdf_path()).content


def test_concurrent_first_requests_render_once(client, api_server):
    with extra_invoice(f"inv_{ORG}_202603", "2026-03", 3) as fresh:
        concurrent_first_requests_render_once(client, api_server, fresh)


def concurrent_first_requests_render_once(client, api_server, fresh: str):
    n = 8
    start = threading.Barrier(n)
    answers: list[httpx.Response] = []

    def fetch():
        start.wait()
        answers.append(client.get(pdf_path(fresh)))

    threads = [threading.Thread(target=fetch) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in answers] == [200] * n
    assert len({r.content for r in answers}) == 1
    assert len({r.headers["etag"] for r in answers}) == 1
    assert renders(api_server, fresh) == 1


def test_nightly_renders_and_stores_so_no_request_renders(client, api_server, pdf_store_uri):
    with extra_invoice(f"inv_{ORG}_202604", "2026-04", 4) as nightly:
        nightly_renders_and_stores(client, api_server, pdf_store_uri, nightly)


def nightly_renders_and_stores(client, api_server, pdf_store_uri, nightly: str):
    from billing.invoices import store as invoice_store

    with invoice_store.snapshot_connection() as cx:
        etag = invoice_store.etag_for(invoice_store.lookup(cx, nightly))
    store = invoice_store.PdfStore(pdf_store_uri)
    assert not store.exists(etag)
    first = invoice_store.render_pending(store=store)
    assert first["rendered"] == first["invoices"] - first["already_stored"] >= 1
    assert store.exists(etag)
    again = invoice_store.render_pending(store=store)  # idempotent: nothing left to render
    assert again == {
        "invoices": first["invoices"],
        "already_stored": first["invoices"],
        "rendered": 0,
    }
    r = client.get(pdf_path(nightly))
    assert r.status_code == 200 and r.headers["etag"] == etag
    assert store.get(etag) == r.content
    assert renders(api_server, nightly) == 0  # the API served the nightly's bytes


def test_new_snapshot_gives_new_etag_and_new_pdf(client):
    from billing.platform import db

    first = client.get(pdf_path(OTHER))
    assert first.status_code == 200
    with db.connect(autocommit=True) as cx:
        put_invoice(cx, OTHER, "2026-02", 7, n_lines=4)
    r = client.get(pdf_path(OTHER), headers={"If-None-Match": first.headers["etag"]})
    assert r.status_code == 200
    assert r.headers["etag"] != first.headers["etag"]
    assert r.content != first.content


def test_invoice_json_and_list(client):
    r = client.get(f"/billing/invoices/{INVOICE}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["org_name"] == "Ωmega Ćorp — Москва"
    assert body["total_cents"] == 4900 + 1000 + 1001 + 1002
    assert [line["line_type"] for line in body["lines"]] == ["base_fee"] + ["usage"] * 3
    page = client.get("/billing/invoices", params={"org_id": ORG, "limit": 1}).json()
    assert page["total_entries"] == 2 and len(page["invoices"]) == 1
    assert page["invoices"][0]["invoice_id"] == OTHER  # newest period first
    page2 = client.get(
        "/billing/invoices", params={"org_id": ORG, "limit": 1, "offset": page["next_offset"]}
    ).json()
    assert page2["invoices"][0]["invoice_id"] == INVOICE and page2["next_offset"] is None
    jan = client.get("/billing/invoices", params={"period": "2026-01", "org_id": ORG}).json()
    assert [i["invoice_id"] for i in jan["invoices"]] == [INVOICE]


def test_anonymous_is_401_and_bad_token_is_403(anon):
    paths = (
        pdf_path(),
        f"/billing/invoices/{INVOICE}",
        "/billing/invoices",
        "/billing/health",
        "/billing/openapi.json",
    )
    assert anon.get("/billing/docs").status_code == 404  # no open docs page
    for path in paths:
        assert anon.get(path).status_code == 401, path
        bad = anon.get(path, headers={"Authorization": "Bearer not-a-jwt"})
        assert bad.status_code == 403, path
    assert anon.head(pdf_path()).status_code == 401
    # The benchmark's bare, unauthenticated endpoint exists only under BILLING_API_BENCH=1.
    assert anon.get("/bench-ceiling/304").headers.get("etag") != '"ceiling"'
    assert anon.head(pdf_path(), headers={"Authorization": "Bearer not-a-jwt"}).status_code == 403
    # A well-formed token signed with another secret is just as bad.
    forged = (
        "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhZG1pbiIsInJvbGUiOiJBRE1JTiJ9.c2lnbmF0dXJl"
    )
    r = anon.get(pdf_path(), headers={"Authorization": f"Bearer {forged}"})
    assert r.status_code == 403
    # Auth is checked before the id: an anonymous probe learns nothing.
    assert anon.get("/billing/invoices/..%2F..%2Fetc%2Fpasswd/pdf").status_code in (401, 404)


def test_unknown_id_is_404(client):
    assert client.get(pdf_path("inv_nobody_209912")).status_code == 404
    assert client.get("/billing/invoices/inv_nobody_209912").status_code == 404


@pytest.mark.parametrize(
    "raw_path",
    [
        "/billing/invoices/..%2F..%2Fetc%2Fpasswd/pdf",
        "/billing/invoices/..%2f..%2fetc%2fpasswd/pdf",
        "/billing/invoices/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd/pdf",
        "/billing/invoices/inv_a%2F..%2Fb_202601/pdf",
        "/billing/invoices/inv_a%5C..%5Cb_202601/pdf",
        "/billing/invoices/inv_x'%20OR%20'1'%3D'1_202601/pdf",
        "/billing/invoices/inv_x%27%3B%20DROP%20TABLE%20billing.organizations%3B--_202601/pdf",
        "/billing/invoices/inv_acme_202601%00/pdf",
        "/billing/invoices/" + "inv_" + "a" * 200 + "_202601/pdf",
        "/billing/invoices/INV_acme_2026/pdf",
    ],
)
def test_malformed_ids_are_rejected(client, raw_path):
    # Send the path byte for byte: no client-side normalisation of %2F or dot segments.
    url = httpx.URL(str(client.base_url)).copy_with(raw_path=raw_path.encode())
    r = client.get(url)
    assert r.status_code in (404, 422), (raw_path, r.status_code, r.text[:200])
    assert not r.content.startswith(b"%PDF")
    assert b"root:" not in r.content


def test_malformed_ids_get_422_and_sql_stays_data(client):
    from billing.platform import db

    for bad in ("inv_x' OR '1'='1_202601", "inv_x;--_202601", "acme", "inv_acme_2026011"):
        assert client.get(f"/billing/invoices/{bad}").status_code == 422, bad
    assert client.get("/billing/invoices", params={"org_id": "x' OR '1'='1"}).status_code == 422
    assert client.get("/billing/invoices", params={"period": "2026-13"}).status_code == 422
    assert client.get("/billing/invoices", params={"limit": 100000}).status_code == 422
    with db.connect() as cx:
        assert (
            cx.execute(
                "SELECT count(*) FROM billing.organizations WHERE org_id = %s", (ORG,)
            ).fetchone()[0]
            == 1
        )


def test_read_only_views_work_during_stripe_outage(client):
    stripe_sync = pytest.importorskip("billing.stripe_sync")
    assert client.get(f"/billing/invoices/{INVOICE}").json()["stripe"]["read_only"] is False
    stripe_sync.set_read_only(True, "api test")
    try:
        r = client.get(f"/billing/invoices/{INVOICE}")
        assert r.status_code == 200
        assert r.json()["stripe"]["read_only"] is True
        assert r.json()["stripe"]["reason"] == "api test"
        assert r.headers["x-billing-stripe-mode"] == "read-only"
        listed = client.get("/billing/invoices", params={"org_id": ORG})
        assert listed.status_code == 200 and listed.json()["stripe"]["read_only"] is True
        assert client.get(pdf_path()).status_code == 200
    finally:
        stripe_sync.set_read_only(False)


def test_pdf_shows_catalog_names_and_stripes_dates_once_finalized(client, tmp_path):
    """The PDF a customer reads: metric display names from the catalog version that priced
    the invoice, estimated dates while a draft in Stripe, Stripe's dates once finalized; each
    change is a new ETag."""
    import datetime as dt
    import re

    from pdf_support import pdf_text

    from billing.platform import db

    with db.connect(autocommit=True) as cx:
        cx.execute("INSERT INTO billing.catalog_versions (catalog_version) VALUES (%s)", (CATALOG,))
        cx.execute(
            "INSERT INTO billing.catalog_metrics VALUES (%s, 'metric_0', 'call', 'API requests')",
            (CATALOG,),
        )
    try:
        draft = client.get(pdf_path())
        text = pdf_text(draft.content, tmp_path)
        assert "API requests" in text and "metric_0" not in text and "metric_1" in text
        assert re.search(r"Issue date +2026-02-01 \(estimated\)", text)
        with db.connect(autocommit=True) as cx:
            cx.execute(
                """INSERT INTO billing.stripe_invoices (org_id, period, stripe_invoice_id, status,
                       currency, amount_due_cents, amount_paid_cents, amount_remaining_cents,
                       due_at, finalized_at)
                   VALUES (%s, '2026-01-01', 'in_apitest', 'open', 'usd', 8003, 0, 8003, %s, %s)""",
                (
                    ORG,
                    dt.datetime(2026, 3, 3, 9, tzinfo=dt.UTC),
                    dt.datetime(2026, 2, 1, 6, tzinfo=dt.UTC),
                ),
            )
        final = client.get(pdf_path(), headers={"If-None-Match": draft.headers["etag"]})
        assert final.status_code == 200 and final.headers["etag"] != draft.headers["etag"]
        text = pdf_text(final.content, tmp_path)
        assert re.search(r"Due date +2026-03-03\n", text) and "estimated" not in text
    finally:
        with db.connect(autocommit=True) as cx:
            cx.execute("DELETE FROM billing.stripe_invoices WHERE org_id = %s", (ORG,))
            cx.execute(
                "DELETE FROM billing.catalog_versions WHERE catalog_version = %s", (CATALOG,)
            )


@pytest.fixture(scope="module")
def one_connection_server(stack, tmp_path_factory, pdf_store_uri):
    """One worker with a pool of one connection and a short wait: easy to exhaust."""
    with _server(
        tmp_path_factory.mktemp("api-pool"),
        1,
        BILLING_PDF_STORE=pdf_store_uri,
        BILLING_API_PG_POOL_SIZE="1",
        BILLING_API_PG_POOL_TIMEOUT_S="0.5",
    ) as srv:
        yield srv


def test_exhausted_pool_answers_503_with_retry_after_then_recovers(one_connection_server, snapshot):
    from billing.platform import db

    base, password, _log = one_connection_server
    with _client(base, password) as c, db.connect() as holder:
        assert c.get(f"/billing/invoices/{INVOICE}").status_code == 200
        # The pool's only connection waits on this lock inside a request.
        holder.execute(f"LOCK TABLE {SCHEMA}.fct_invoices IN ACCESS EXCLUSIVE MODE")
        blocked: list[httpx.Response] = []
        waiter = threading.Thread(target=lambda: blocked.append(c.get(pdf_path())))
        waiter.start()
        with db.connect(autocommit=True) as probe:
            db_wait = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass"
            while probe.execute(db_wait, (f"{SCHEMA}.fct_invoices",)).fetchone()[0] == 0:
                assert waiter.is_alive()
        busy = c.get(f"/billing/invoices/{INVOICE}")
        assert busy.status_code == 503
        assert busy.headers["retry-after"] == "1"
        assert busy.json() == {"detail": "database busy: no connection free, retry shortly"}
        holder.rollback()  # the lock goes: the held request finishes, the pool recovers
        waiter.join(timeout=30)
        assert [r.status_code for r in blocked] == [200]
        assert c.get(f"/billing/invoices/{INVOICE}").status_code == 200
        assert c.get(pdf_path()).status_code == 200
