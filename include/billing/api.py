"""The Billing API: invoice JSON and PDFs, mounted at ``/billing`` on Airflow's API server.

Every route requires an Airflow identity (JWT bearer token or the UI's session cookie)
through Airflow's own ``get_user`` dependency, and the auth manager's custom-view check
for the ``Billing`` resource, so Airflow's users, tokens and roles apply unchanged.

PDFs carry a strong ETag derived from the invoice's ``snapshot_hash`` (plus the org's
name and email and the renderer's layout version, which the PDF also shows). A matching
``If-None-Match`` answers 304 after one indexed lookup, without rendering; rendered PDFs
are kept in a bounded in-memory LRU keyed by ETag, and concurrent requests for the same
uncached PDF render it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from decimal import Decimal
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse
from psycopg import IsolationLevel, errors, sql
from psycopg.rows import dict_row

from billing import db, invoices
from billing.errors import ConfigError, ServiceError

RESOURCE_NAME = "Billing"
# inv_<org_id>_<YYYYMM>; org_id as constrained in billing.organizations.
INVOICE_ID_PATTERN = r"^inv_[A-Za-z0-9_.-]{1,64}_[0-9]{6}$"
PERIOD_PATTERN = r"^[0-9]{4}-(0[1-9]|1[0-2])$"
ORG_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
CACHE_CONTROL = "private, must-revalidate"
MAX_LIMIT = 200


def snapshot_schema() -> str:
    """Postgres schema dbt builds the invoice snapshot into."""
    return os.environ.get("BILLING_SNAPSHOT_SCHEMA", "billing_snapshot")


# ---------------------------------------------------------------- authentication
def requires_billing_access() -> Callable:
    """Airflow's authentication plus the auth manager's decision on the Billing view."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.core_api.security import get_user

    # A Depends() default, not an annotation: annotations are strings under
    # ``from __future__ import annotations`` and this import is local.
    def inner(user=Depends(get_user)) -> None:  # noqa: B008
        allowed = get_auth_manager().is_authorized_custom_view(
            method="GET", resource_name=RESOURCE_NAME, user=user
        )
        if not allowed:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden")

    return inner


# ---------------------------------------------------------------- snapshot reads
def _table(name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(snapshot_schema()), sql.Identifier(name))


def _lookup(cx, invoice_id: str) -> dict | None:
    """The few columns the ETag needs: one indexed lookup, no lines."""
    q = sql.SQL(
        """SELECT i.invoice_id, i.org_id, i.period, i.currency, i.status,
                  i.base_fee_cents, i.total_cents, i.snapshot_hash,
                  coalesce(o.name, i.org_id) AS org_name, coalesce(o.email, '') AS org_email,
                  (s.finalized_at AT TIME ZONE 'UTC')::date AS issued_on,
                  (s.due_at AT TIME ZONE 'UTC')::date AS due_on,
                  (SELECT coalesce(jsonb_object_agg(m.metric, m.description), '{{}}')
                     FROM billing.catalog_metrics AS m
                    WHERE m.catalog_version = i.catalog_version) AS metric_names
           FROM {inv} AS i
           LEFT JOIN billing.organizations AS o ON o.org_id = i.org_id
           LEFT JOIN billing.stripe_invoices AS s
                  ON s.org_id = i.org_id AND s.period = i.period_start
           WHERE i.invoice_id = %s"""
    ).format(inv=_table("fct_invoices"))
    return cx.cursor(row_factory=dict_row).execute(q, (invoice_id,)).fetchone()


def etag_for(row: dict) -> str:
    from billing import invoice_pdf

    parts = [
        row["invoice_id"],
        row["snapshot_hash"],
        row["org_name"],
        row["org_email"],
        invoice_pdf.RENDERER_VERSION,
        "|".join(invoice_pdf.seller()),
        str(row.get("issued_on")),
        str(row.get("due_on")),
        str(invoice_pdf.days_until_due()),
        json.dumps(row.get("metric_names") or {}, sort_keys=True),
        os.pathsep.join(str(p) for p in invoice_pdf.fallback_font_paths()),
    ]
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
    return f'"{digest}"'


def _tiers(line: dict):
    from billing.invoice_pdf import Tier

    raw = line["tiers"] or []
    if isinstance(raw, str):
        raw = json.loads(raw)
    out = []
    for t in raw:
        if "packages" in t:
            out.append(
                Tier(
                    f"packages of {Decimal(str(t['package_size'])):,f}",
                    Decimal(str(t["packages"])),
                    Decimal(str(t["package_price"])),
                    Decimal(str(t["amount"])),
                )
            )
            continue
        lower = Decimal(str(t.get("from") or 0))
        up_to = t.get("up_to")
        label = f"{lower + 1:,f} – " + (f"{Decimal(str(up_to)):,f}" if up_to is not None else "∞")
        out.append(
            Tier(
                label,
                Decimal(str(t["quantity"])),
                Decimal(str(t["unit_price"])),
                Decimal(str(t["amount"])),
            )
        )
    return tuple(out)


def to_pdf_invoice(inv, org_name: str, org_email: str, row: dict | None = None):
    """``billing.invoices.Invoice`` (the snapshot reader's type) -> the renderer's input.

    ``row`` is the :func:`_lookup` row: Stripe's issue/due dates once finalized and the
    catalog's display names of the metrics (the ETag covers both).
    """
    from billing.invoice_pdf import Invoice, InvoiceLine

    row = row or {}
    names = row.get("metric_names") or {}
    return Invoice(
        issued_on=row.get("issued_on"),
        due_on=row.get("due_on"),
        invoice_id=inv.invoice_id,
        org_id=inv.org_id,
        org_name=org_name,
        org_email=org_email,
        period=inv.period,
        currency=inv.currency,
        status=inv.status,
        base_fee_cents=int(inv.base_fee_cents or 0),
        total_cents=int(inv.total_cents),
        snapshot_version=inv.snapshot_hash,
        lines=tuple(
            InvoiceLine(
                metric=line.metric or "",
                quantity=Decimal(line.quantity),
                amount_cents=int(line.amount_cents),
                tiers=_tiers({"tiers": line.tiers}),
                description=names.get(line.metric or ""),
            )
            for line in inv.usage_lines
        ),
    )


# ---------------------------------------------------------------- PDF cache
class PdfCache:
    """Bounded LRU of rendered PDFs keyed by ETag, with one render per key at a time."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self.hits = self.misses = self.renders = 0

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
                self.hits += 1
            return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            if key in self._data:
                return
            self._data[key] = data
            self._size += len(data)
            while self._size > self.max_bytes:
                _, old = self._data.popitem(last=False)
                self._size -= len(old)

    def get_or_render(self, key: str, render: Callable[[], bytes]) -> bytes:
        data = self.get(key)
        if data is not None:
            return data
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            data = self.get(key)
            if data is None:
                with self._lock:
                    self.misses += 1
                    self.renders += 1
                data = render()
                self.put(key, data)
        with self._lock:
            self._key_locks.pop(key, None)
        return data

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._data),
                "bytes": self._size,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "renders": self.renders,
            }


def _cache_bytes() -> int:
    return int(float(os.environ.get("BILLING_PDF_CACHE_MB", "64")) * 1024 * 1024)


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


# ---------------------------------------------------------------- JSON views
def _summary_json(row: dict) -> dict:
    from billing.pricing import format_money

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


_stripe_cache: tuple[float, dict | None] = (0.0, None)


def _stripe_ttl_s() -> float:
    return float(os.environ.get("BILLING_STRIPE_STATUS_TTL_S", "5"))


def stripe_status() -> dict | None:
    """Stripe outage mode for the read-only views, from ``billing.stripe_sync`` when present.

    Cached for a few seconds: the flag is a Postgres row (``billing.stripe_sync.mode``), and
    neither its latency nor an outage may slow down or break invoice reads.
    """
    global _stripe_cache
    now = time.monotonic()
    if _stripe_cache[0] and now - _stripe_cache[0] < _stripe_ttl_s():
        return _stripe_cache[1]
    try:
        from billing import stripe_sync
    except ImportError:
        stripe_sync = None
    probe = getattr(stripe_sync, "read_only", None)
    if probe is None:
        value = None
    else:
        try:
            info = probe()
            value = {"read_only": info is not None, **(info or {})}
        except Exception as exc:  # database down: report unknown, keep serving
            value = {"read_only": None, "error": type(exc).__name__}
    _stripe_cache = (now, value)
    return value


# ---------------------------------------------------------------- the app
@contextmanager
def _snapshot():
    """A read connection; a snapshot dbt has not built yet is a 503, not a 500."""
    try:
        with db.connect() as cx:  # tuple rows: billing.invoices expects them
            # The ETag lookup and the invoice it describes come from one snapshot.
            cx.isolation_level = IsolationLevel.REPEATABLE_READ
            cx.read_only = True
            yield cx
    except (errors.UndefinedTable, errors.InvalidSchemaName, ConfigError):
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "invoice snapshot not built yet"
        ) from None
    except ServiceError:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "database unavailable") from None


InvoiceId = Annotated[str, Path(pattern=INVOICE_ID_PATTERN, max_length=80)]


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
    app.state.pdf_cache = PdfCache(_cache_bytes())
    from billing import metrics_export

    metrics_export.instrument(app)  # RED middleware + GET /billing/metrics (same auth)
    from billing import billing_page

    billing_page.install(app)  # the Billing page (GET /billing/ui) and its actions

    def _with_status(response: Response) -> None:
        st = stripe_status()
        if st is not None and st.get("read_only"):
            response.headers["X-Billing-Stripe-Mode"] = "read-only"

    @app.get("/invoices", summary="List invoices (paged)")
    def list_invoices(
        response: Response,
        period: Annotated[str | None, Query(pattern=PERIOD_PATTERN)] = None,
        org_id: Annotated[str | None, Query(pattern=ORG_ID_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> dict:
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
        with _snapshot() as cx:
            cur = cx.cursor(row_factory=dict_row)
            total = cur.execute(sql.SQL("SELECT count(*) AS n ") + base + cond, params).fetchone()[
                "n"
            ]
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
            row = _lookup(cx, invoice_id)
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

    @app.get(
        "/invoices/{invoice_id}/pdf",
        summary="The invoice as PDF (ETag / If-None-Match)",
        response_class=Response,
        responses={200: {"content": {"application/pdf": {}}}, 304: {}, 404: {}},
    )
    def get_invoice_pdf(invoice_id: InvoiceId, request: Request) -> Response:
        from billing import invoice_pdf

        cache: PdfCache = request.app.state.pdf_cache
        with _snapshot() as cx:
            row = _lookup(cx, invoice_id)
            if row is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, "invoice not found")
            etag = etag_for(row)
            headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
            if etag_matches(request.headers.get("if-none-match"), etag):
                return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
            pdf = cache.get(etag)
            inv = invoices.get_invoice(cx, invoice_id) if pdf is None else None
        if pdf is None:
            if inv is None:  # deleted between the two reads
                raise HTTPException(status.HTTP_404_NOT_FOUND, "invoice not found")
            doc = to_pdf_invoice(inv, row["org_name"], row["org_email"], row)
            pdf = cache.get_or_render(etag, lambda: invoice_pdf.render(doc))
        headers["Content-Disposition"] = f'inline; filename="{safe_filename(invoice_id)}"'
        headers["X-Content-Type-Options"] = "nosniff"
        return Response(content=pdf, media_type="application/pdf", headers=headers)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/health", summary="Cache statistics and Stripe mode")
    def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {"pdf_cache": request.app.state.pdf_cache.stats(), "stripe": stripe_status()}
        )

    return app


app = create_app()

__all__ = ["app", "create_app", "etag_for", "etag_matches", "safe_filename"]
