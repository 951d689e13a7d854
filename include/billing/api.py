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
from collections import OrderedDict
from collections.abc import Callable
from decimal import Decimal
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse
from psycopg import sql
from psycopg.rows import dict_row

from billing import db

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
                  coalesce(o.name, i.org_id) AS org_name, coalesce(o.email, '') AS org_email
           FROM {inv} AS i LEFT JOIN billing.organizations AS o ON o.org_id = i.org_id
           WHERE i.invoice_id = %s"""
    ).format(inv=_table("fct_invoices"))
    return cx.execute(q, (invoice_id,)).fetchone()


def _lines(cx, invoice_id: str) -> list[dict]:
    q = sql.SQL(
        """SELECT line_type, metric, pricing_mode, quantity, amount_cents, tiers
           FROM {lines} WHERE invoice_id = %s ORDER BY line_number"""
    ).format(lines=_table("fct_invoice_lines"))
    return cx.execute(q, (invoice_id,)).fetchall()


def etag_for(row: dict) -> str:
    from billing import invoice_pdf

    parts = [
        row["invoice_id"],
        row["snapshot_hash"],
        row["org_name"],
        row["org_email"],
        invoice_pdf.RENDERER_VERSION,
        "|".join(invoice_pdf.seller()),
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


def to_invoice(row: dict, lines: list[dict]):
    from billing.invoice_pdf import Invoice, InvoiceLine

    return Invoice(
        invoice_id=row["invoice_id"],
        org_id=row["org_id"],
        org_name=row["org_name"],
        org_email=row["org_email"],
        period=row["period"],
        currency=row["currency"],
        status=row["status"],
        base_fee_cents=int(row["base_fee_cents"] or 0),
        total_cents=int(row["total_cents"]),
        snapshot_version=row["snapshot_hash"],
        lines=tuple(
            InvoiceLine(
                metric=line["metric"],
                quantity=Decimal(line["quantity"]),
                amount_cents=int(line["amount_cents"]),
                tiers=_tiers(line),
            )
            for line in lines
            if line["line_type"] != "base_fee"
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
def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _invoice_json(row: dict, lines: list[dict] | None = None) -> dict:
    from billing.pricing import format_money

    out = {
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
    if lines is not None:
        out["org_email"] = row["org_email"]
        out["lines"] = [
            {
                "line_type": line["line_type"],
                "metric": line["metric"],
                "pricing_mode": line["pricing_mode"],
                "quantity": line["quantity"],
                "amount_cents": int(line["amount_cents"]),
                "tiers": line["tiers"] if not isinstance(line["tiers"], str) else None,
            }
            for line in lines
        ]
    return _jsonable(out)


def stripe_status() -> dict | None:
    """Stripe outage status for read-only views, if the Stripe sync module provides it."""
    try:
        from billing import stripe_sync
    except ImportError:
        return None
    probe = getattr(stripe_sync, "read_only_status", None) or getattr(
        stripe_sync, "is_read_only", None
    )
    if probe is None:
        return None
    try:
        value = probe()
    except Exception as exc:  # the flag lives in Redis: an outage there must not break reads
        return {"read_only": None, "error": type(exc).__name__}
    if isinstance(value, dict):
        return value
    return {"read_only": bool(value)}


# ---------------------------------------------------------------- the app
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
        with db.connect(row_factory=dict_row) as cx:
            total = cx.execute(sql.SQL("SELECT count(*) AS n ") + base + cond, params).fetchone()[
                "n"
            ]
            rows = cx.execute(
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
            "invoices": [_invoice_json(r) for r in rows],
            "total_entries": total,
            "limit": limit,
            "offset": offset,
            "next_offset": nxt if nxt < total else None,
            "stripe": stripe_status(),
        }

    @app.get("/invoices/{invoice_id}", summary="One invoice with its lines")
    def get_invoice(invoice_id: InvoiceId, response: Response) -> dict:
        with db.connect(row_factory=dict_row) as cx:
            row = _lookup(cx, invoice_id)
            if row is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, "invoice not found")
            lines = _lines(cx, invoice_id)
        _with_status(response)
        body = _invoice_json(row, lines)
        body["etag"] = etag_for(row)
        body["stripe"] = stripe_status()
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
        with db.connect(row_factory=dict_row) as cx:
            row = _lookup(cx, invoice_id)
            if row is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, "invoice not found")
            etag = etag_for(row)
            headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
            if etag_matches(request.headers.get("if-none-match"), etag):
                return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
            pdf = cache.get(etag)
            if pdf is None:
                lines = _lines(cx, invoice_id)
        if pdf is None:
            pdf = cache.get_or_render(etag, lambda: invoice_pdf.render(to_invoice(row, lines)))
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
