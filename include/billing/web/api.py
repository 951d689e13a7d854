"""The Billing API: invoice JSON and PDFs, mounted at ``/billing`` on Airflow's API server.

Every route requires an Airflow identity (JWT bearer token or the UI's session cookie)
through Airflow's own ``get_user`` dependency, and the auth manager's custom-view check
for the ``Billing`` resource, so Airflow's users, tokens and roles apply unchanged.

Each api-server worker process reads Postgres through its own connection pool
(``BILLING_API_PG_POOL_SIZE`` connections, statement and lock timeouts as everywhere); a
request that waits longer than ``BILLING_API_PG_POOL_TIMEOUT_S`` for one answers 503 with
``Retry-After`` instead of hanging. PDFs come from the PDF store (``billing.invoices.store``:
ETag, lookup and rendering live there), where the nightly run has already put them; a miss
is rendered once across workers and stored. A matching ``If-None-Match`` answers 304 after
one indexed lookup.
"""

from __future__ import annotations

import email.utils
import os
import re
import threading
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse
from psycopg import IsolationLevel, OperationalError, errors, sql
from psycopg.rows import dict_row

from billing import invoices
from billing.invoices import INVOICE_ID_PATTERN
from billing.invoices import store as invoice_store
from billing.orgs import ORG_ID_PATTERN
from billing.platform import db, settings
from billing.platform.dates import PERIOD_PATTERN
from billing.platform.errors import ConfigError, ServiceError
from billing.web.common import requires_billing_access, stripe_status

CACHE_CONTROL = "private, must-revalidate"
RETRY_AFTER_S = "1"  # a pool wait is short: the next try usually gets a connection
MAX_LIMIT = 200
etag_for = invoice_store.etag_for  # the API's ETag is the store's key


# ---------------------------------------------------------------- connections
_pool_lock = threading.Lock()
_pool: tuple[int, object] | None = None  # (pid, ConnectionPool): one pool per worker process


def _configure(cx) -> None:
    # The ETag lookup and the invoice it describes come from one snapshot.
    cx.isolation_level = IsolationLevel.REPEATABLE_READ
    cx.read_only = True


def connection_pool():
    """This worker process's pool, opened on first use (after the api-server has forked)."""
    global _pool
    pid = os.getpid()
    with _pool_lock:
        if _pool is None or _pool[0] != pid:
            pool = db.pool(
                settings.api_pg_pool_size(),
                settings.api_pg_pool_timeout_s(),
                configure=_configure,
                name=f"billing-api-{pid}",
            )
            _pool = (pid, pool)
        return _pool[1]


def _unavailable(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE, detail, headers={"Retry-After": RETRY_AFTER_S}
    )


@contextmanager
def _snapshot():
    """A pooled read connection (tuple rows: billing.invoices expects them). A snapshot dbt
    has not built yet, an exhausted pool or an unreachable database is a 503, not a 500."""
    from psycopg_pool import PoolTimeout

    try:
        with connection_pool().connection() as cx:
            yield cx
    except PoolTimeout:
        raise _unavailable("database busy: no connection free, retry shortly") from None
    except (errors.UndefinedTable, errors.InvalidSchemaName, ConfigError):
        raise _unavailable("invoice snapshot not built yet") from None
    except (ServiceError, OperationalError):
        raise _unavailable("database unavailable") from None


# ---------------------------------------------------------------- snapshot reads
def _table(name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(invoices.schema()), sql.Identifier(name))


def _list_rows(cx, period, org_id, limit: int, offset: int) -> tuple[int, list[dict]]:
    where, params = [], []
    if period:
        where.append(sql.SQL("i.period = %s"))
        params.append(period)
    if org_id:
        where.append(sql.SQL("i.org_id = %s"))
        params.append(org_id)
    cond = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL("")
    base = sql.SQL(
        "FROM {inv} AS i LEFT JOIN billing.organizations AS o ON o.org_id = i.org_id"
    ).format(inv=_table("fct_invoices"))
    cur = cx.cursor(row_factory=dict_row)
    total = cur.execute(sql.SQL("SELECT count(*) AS n ") + base + cond, params).fetchone()["n"]
    rows = cur.execute(
        sql.SQL(
            """SELECT i.invoice_id, i.org_id, i.period, i.currency, i.status,
                      i.base_fee_cents, i.total_cents, i.snapshot_hash,
                      coalesce(o.name, i.org_id) AS org_name,
                      coalesce(o.email, '') AS org_email """
        )
        + base
        + cond
        + sql.SQL(" ORDER BY i.period DESC, i.invoice_id LIMIT %s OFFSET %s"),
        [*params, limit, offset],
    ).fetchall()
    return total, rows


# ---------------------------------------------------------------- PDF responses
def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Weak comparison, as RFC 9110 prescribes for If-None-Match."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    tags = [t.strip() for t in if_none_match.split(",")]
    return any(t.removeprefix("W/") == etag for t in tags)


def safe_filename(invoice_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", invoice_id)[:80] + ".pdf"


def pdf_headers(row: dict, etag: str) -> dict[str, str]:
    return {
        "ETag": etag,
        "Cache-Control": CACHE_CONTROL,
        "Last-Modified": email.utils.format_datetime(invoice_store.last_modified(row), usegmt=True),
    }


_store: tuple[str, invoice_store.PdfStore] | None = None


def pdf_store() -> invoice_store.PdfStore:
    """The PDF store of ``BILLING_PDF_STORE`` (re-read, so a test can point it elsewhere)."""
    global _store
    uri = settings.pdf_store_uri()
    if _store is None or _store[0] != uri:
        _store = (uri, invoice_store.PdfStore(uri))
    return _store[1]


def _pdf_response(invoice_id: str, request: Request) -> Response:
    with _snapshot() as cx:
        row = invoice_store.lookup(cx, invoice_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "invoice not found")
    etag = etag_for(row)
    if etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=pdf_headers(row, etag))
    store = pdf_store()
    pdf = store.get(etag)
    if pdf is None:  # the nightly run has not rendered this one: render it once, store it
        found = invoice_store.render_and_store(_snapshot, store, invoice_id, etag)
        if found is None:  # deleted between the two reads
            raise HTTPException(status.HTTP_404_NOT_FOUND, "invoice not found")
        if found[0] != etag:  # a new snapshot in between: its row gives the headers
            with _snapshot() as cx:
                row = invoice_store.lookup(cx, invoice_id) or row
        etag, pdf = found
    headers = pdf_headers(row, etag)
    headers["Content-Disposition"] = f'attachment; filename="{safe_filename(invoice_id)}"'
    headers["X-Content-Type-Options"] = "nosniff"
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(pdf))
        return Response(media_type="application/pdf", headers=headers)
    return Response(content=pdf, media_type="application/pdf", headers=headers)


# ---------------------------------------------------------------- JSON views
def _summary_json(row: dict) -> dict:
    from billing.pricing.catalog import format_money

    return {
        "invoice_id": row["invoice_id"],
        "org_id": row["org_id"],
        "org_name": row["org_name"],
        "period": row["period"],
        "currency": row["currency"],
        "status": row["status"],
        "base_fee_cents": int(row["base_fee_cents"] or 0),
        "total_cents": int(row["total_cents"]),
        "total": format_money(int(row["total_cents"]), row["currency"]),
        "snapshot_hash": row["snapshot_hash"],
        "pdf_url": f"/billing/invoices/{row['invoice_id']}/pdf",
    }


# ---------------------------------------------------------------- the app
InvoiceId = Annotated[str, Path(pattern=INVOICE_ID_PATTERN, max_length=80)]


def _with_status(response: Response) -> None:
    st = stripe_status()
    if st is not None and st.get("read_only"):
        response.headers["X-Billing-Stripe-Mode"] = "read-only"


def _invoice_routes(app: FastAPI) -> None:
    @app.get("/invoices", summary="List invoices (paged)")
    def list_invoices(
        response: Response,
        period: Annotated[str | None, Query(pattern=PERIOD_PATTERN)] = None,
        org_id: Annotated[str | None, Query(pattern=ORG_ID_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> dict:
        with _snapshot() as cx:
            total, rows = _list_rows(cx, period, org_id, limit, offset)
        _with_status(response)
        nxt = offset + len(rows)
        return {
            "invoices": [_summary_json(r) for r in rows],
            "total_entries": total,
            "limit": limit,
            "offset": offset,
            "next_offset": nxt if nxt < total else None,
            "stripe": stripe_status(),
        }

    @app.get("/invoices/{invoice_id}", summary="One invoice with its lines")
    def get_invoice(invoice_id: InvoiceId, response: Response) -> dict:
        with _snapshot() as cx:
            row = invoice_store.lookup(cx, invoice_id)
            inv = invoices.get_invoice(cx, invoice_id) if row else None
        if inv is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "invoice not found")
        _with_status(response)
        body = inv.to_dict()
        body.update(
            org_name=row["org_name"],
            org_email=row["org_email"],
            etag=etag_for(row),
            pdf_url=f"/billing/invoices/{invoice_id}/pdf",
            stripe=stripe_status(),
        )
        return body

    @app.api_route(
        "/invoices/{invoice_id}/pdf",
        methods=["GET", "HEAD"],
        summary="The invoice as PDF (ETag / If-None-Match; HEAD for the headers only)",
        response_class=Response,
        responses={200: {"content": {"application/pdf": {}}}, 304: {}, 404: {}, 503: {}},
    )
    def get_invoice_pdf(invoice_id: InvoiceId, request: Request) -> Response:
        return _pdf_response(invoice_id, request)


def _meta_routes(app: FastAPI) -> None:
    @app.get("/openapi.json", include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/health", summary="Pool and PDF statistics of this worker, Stripe mode")
    def health() -> JSONResponse:
        stats = connection_pool().get_stats()
        keys = ("pool_size", "pool_available", "requests_waiting", "requests_errors")
        return JSONResponse(
            {
                "pid": os.getpid(),
                "pg_pool": {k: stats.get(k, 0) for k in keys},
                "pdf_renders": invoice_store.renders,
                "stripe": stripe_status(),
            }
        )


def create_app() -> FastAPI:
    app = FastAPI(
        title="Billing API",
        description="Invoices and invoice PDFs from the billing snapshot. "
        "Authenticate with an Airflow JWT (`POST /auth/token`).",
        version="1",
        dependencies=[Depends(requires_billing_access())],
        # FastAPI's docs routes bypass app dependencies; the schema is served below, authenticated.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    from billing.observability import export as metrics_export

    metrics_export.instrument(app)  # RED middleware + GET /billing/metrics (same auth)
    from billing.web import credits as web_credits
    from billing.web import page as billing_page

    billing_page.install(app)  # the Billing page (GET /billing/ui) and its actions
    web_credits.install(app)  # GET /billing/orgs/{org_id}/credits
    _invoice_routes(app)
    _meta_routes(app)
    return app


def ceiling_app() -> FastAPI:
    """The benchmark's ceiling: a bare FastAPI endpoint with a fixed 304 (no auth, no
    database), mounted by the plugin only under ``BILLING_API_BENCH=1``."""
    bare = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @bare.get("/304")
    async def fixed_304() -> Response:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": '"ceiling"'})

    return bare


def fastapi_apps() -> list[dict]:
    """What the Airflow plugin mounts."""
    apps = [{"app": app, "url_prefix": "/billing", "name": "Billing API"}]
    if settings.api_bench_ceiling():
        apps.append({"app": ceiling_app(), "url_prefix": "/bench-ceiling", "name": "Bench ceiling"})
    return apps


app = create_app()

__all__ = ["app", "create_app", "etag_for", "etag_matches", "safe_filename"]
