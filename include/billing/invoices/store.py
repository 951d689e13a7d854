"""Invoice identity and stored PDFs: the one place that knows what an invoice PDF *is*.

- :func:`lookup` reads the few columns that identify an invoice's PDF (one indexed row);
- :func:`etag_for` derives the strong ETag from them: the snapshot hash, the org's name and
  email, Stripe's dates, the catalog's metric names, the prepaid credits applied to the
  invoice (``billing.credit_applications``) and the renderer's layout version.
  The renderer is a pure, deterministic function of those inputs (fixed creation date,
  deterministic font subsetting), so **same ETag => byte-identical PDF**;
- :class:`PdfStore` keeps rendered PDFs under their ETag in object storage
  (``ObjectStoragePath``: a ``file://`` folder locally, ``s3://`` in production;
  ``BILLING_PDF_STORE``). An object is written whole or not at all, so a reader never
  sees half a PDF;
- :func:`render_and_store` renders a missing PDF once across threads, api-server workers
  and the nightly task: a Postgres advisory lock keyed on the ETag, the store re-checked
  after it is granted;
- :func:`render_pending` is the nightly task's body: every current invoice whose ETag is
  not stored yet, rendered and stored (set-based, idempotent).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from decimal import Decimal

from psycopg import sql
from psycopg.rows import dict_row

from billing.invoices import snapshot as invoices
from billing.platform import settings
from billing.platform.dates import day_start, parse_period, period_close

log = logging.getLogger(__name__)

# Advisory lock namespace of PDF renders (two-int form: namespace, hashtext(etag)).
RENDER_LOCK = 7_202_621

_LOOKUP = """SELECT i.invoice_id, i.org_id, i.period, i.currency, i.status,
                  i.base_fee_cents, i.total_cents, i.snapshot_hash, i.as_of_day,
                  coalesce(o.name, i.org_id) AS org_name, coalesce(o.email, '') AS org_email,
                  (s.finalized_at AT TIME ZONE 'UTC')::date AS issued_on,
                  (s.due_at AT TIME ZONE 'UTC')::date AS due_on,
                  (SELECT coalesce(jsonb_object_agg(m.metric, m.description), '{{}}')
                     FROM billing.catalog_metrics AS m
                    WHERE m.catalog_version = i.catalog_version) AS metric_names,
                  (SELECT coalesce(sum(c.amount_cents), 0)::bigint
                     FROM billing.credit_applications AS c
                    WHERE c.org_id = i.org_id AND c.period = i.period_start) AS credits_applied_cents
           FROM {inv} AS i
           LEFT JOIN billing.organizations AS o ON o.org_id = i.org_id
           LEFT JOIN billing.stripe_invoices AS s
                  ON s.org_id = i.org_id AND s.period = i.period_start"""


def _table(name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(invoices.schema()), sql.Identifier(name))


def lookup(cx, invoice_id: str) -> dict | None:
    """The columns the ETag needs: one indexed lookup, no lines."""
    q = sql.SQL(_LOOKUP + " WHERE i.invoice_id = %s").format(inv=_table("fct_invoices"))
    return cx.cursor(row_factory=dict_row).execute(q, (invoice_id,)).fetchone()


def lookup_all(cx) -> list[dict]:
    """:func:`lookup` for every invoice of the published snapshot (the nightly's set)."""
    q = sql.SQL(_LOOKUP + " ORDER BY i.invoice_id").format(inv=_table("fct_invoices"))
    return cx.cursor(row_factory=dict_row).execute(q).fetchall()


def etag_for(row: dict) -> str:
    """Strong ETag of the PDF of ``row`` (a :func:`lookup` row): every renderer input."""
    from billing.invoices import pdf as invoice_pdf

    parts = [
        row["invoice_id"],
        row["snapshot_hash"],
        row["org_name"],
        row["org_email"],
        invoice_pdf.RENDERER_VERSION,
        "|".join(settings.invoice_seller()),
        str(row.get("issued_on")),
        str(row.get("due_on")),
        str(invoice_pdf.days_until_due()),
        json.dumps(row.get("metric_names") or {}, sort_keys=True),
        os.pathsep.join(str(p) for p in settings.pdf_fallback_fonts()),
    ]
    if row.get("credits_applied_cents"):  # a part only when credits apply: other ETags stay
        parts.append(f"credits:{int(row['credits_applied_cents'])}")
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
    return f'"{digest}"'


def last_modified(row: dict) -> dt.datetime:
    """When the PDF's content last changed, from the data (never a clock or a file time, so
    every worker and every re-render answers the same): the later of the snapshot's data
    day and Stripe's finalization day, else the period's close."""
    days = [d for d in (row.get("as_of_day"), row.get("issued_on")) if d is not None]
    if not days:
        return period_close(parse_period(row["period"]))
    return day_start(max(days))


def _tiers(raw) -> tuple:
    from billing.invoices.pdf import PdfTier

    raw = raw or []
    if isinstance(raw, str):
        raw = json.loads(raw)
    out = []
    for t in raw:
        if "max_spend" in t:  # the maximum spend capped the line: this row takes it down
            cut = Decimal(str(t["amount"]))
            cap = Decimal(str(t["max_spend"]))
            out.append(PdfTier(f"capped at the maximum spend of {cap:,f}", Decimal(1), cut, cut))
            continue
        if "packages" in t:
            # a tiered_package tier says its range; free units and rounding down when set
            label = f"{_range_label(t)} in " if "from" in t else ""
            label += f"packages of {Decimal(str(t['package_size'])):,f}"
            if t.get("free_units"):
                label += f" after {Decimal(str(t['free_units'])):,f} free"
            if t.get("rounding") == "down":
                label += " (complete packages only)"
            out.append(
                PdfTier(
                    label,
                    Decimal(str(t["packages"])),
                    Decimal(str(t["package_price"])),
                    Decimal(str(t["amount"])),
                )
            )
            continue
        out.append(
            PdfTier(
                _range_label(t),
                Decimal(str(t["quantity"])),
                Decimal(str(t["unit_price"])),
                Decimal(str(t["amount"])),
                Decimal(str(t.get("flat_amount") or 0)),
            )
        )
    return tuple(out)


def _range_label(t: dict) -> str:
    """A tier's units, e.g. ``1,001 – 10,000`` or ``10,001 – ∞``."""
    lower = Decimal(str(t.get("from") or 0))
    up_to = t.get("up_to")
    return f"{lower + 1:,f} – " + (f"{Decimal(str(up_to)):,f}" if up_to is not None else "∞")


def _describe(name: str | None, dimensions: dict | None) -> str | None:
    """A line's label: the metric's description, plus its dimension values if it has any
    (``Tokens (model: gpt-4o, token_type: input)``; a missing value reads ``none``)."""
    if not dimensions:
        return name
    values = ", ".join(f"{k}: {'none' if v is None else v}" for k, v in dimensions.items())
    return f"{name} ({values})"


def _true_up(line, names: dict) -> str:
    """``Minimum spend true-up: API requests`` or ``Minimum commitment true-up``."""
    if line.metric:
        return f"Minimum spend true-up: {names.get(line.metric) or line.metric}"
    return "Minimum commitment true-up"


def _segment(line, inv: invoices.Invoice) -> str:
    """`` (pro, 15 Mar–31 Mar)``: the plan and days of a line's subscription segment, for an
    invoice whose period is cut in segments (docs/SUBSCRIPTIONS.md); else ``""``."""
    whole = {(inv.period_start, inv.period_end + dt.timedelta(days=1))}
    spans = {(x.segment_start, x.segment_end) for x in inv.lines if x.segment_start}
    if not spans or spans == whole or line.segment_start is None:
        return ""
    last = line.segment_end - dt.timedelta(days=1)
    return f" ({line.plan}, {line.segment_start:%d %b}–{last:%d %b})"


def _base_fees(inv: invoices.Invoice) -> tuple[tuple[str, str, int], ...]:
    """One base fee row per segment, with its share of the period's days; ``()`` for a
    whole period (the one "Base fee" row)."""
    rows = []
    period_days = (inv.period_end - inv.period_start).days + 1
    for line in inv.lines:
        label = _segment(line, inv)
        if line.line_type != "base_fee" or not label:
            continue
        days = (line.segment_end - line.segment_start).days
        rows.append((f"Base fee{label}", f"{days}/{period_days} days", int(line.amount_cents)))
    return tuple(rows)


def to_pdf_invoice(inv: invoices.Invoice, row: dict):
    """The snapshot reader's invoice plus its :func:`lookup` row -> the renderer's input
    (Stripe's issue/due dates once finalized, the catalog's metric names)."""
    from billing.invoices.pdf import PdfInvoice, PdfLine

    names = row.get("metric_names") or {}
    return PdfInvoice(
        issued_on=row.get("issued_on"),
        due_on=row.get("due_on"),
        invoice_id=inv.invoice_id,
        org_id=inv.org_id,
        org_name=row["org_name"],
        org_email=row["org_email"],
        period=inv.period,
        currency=inv.currency,
        status=inv.status,
        base_fee_cents=int(inv.base_fee_cents or 0),
        total_cents=int(inv.total_cents),
        snapshot_version=inv.snapshot_hash,
        credits_applied_cents=int(row.get("credits_applied_cents") or 0),
        base_fees=_base_fees(inv),
        lines=tuple(
            PdfLine(
                metric=line.metric or "",
                quantity=Decimal(line.quantity),
                amount_cents=int(line.amount_cents),
                tiers=_tiers(line.tiers),
                description=(
                    _describe(names.get(line.metric or "") or line.metric, line.dimensions)
                    if line.line_type == "usage"
                    else _true_up(line, names)
                )
                + _segment(line, inv),
                aggregation=line.aggregation or "sum",
                credited_cents=int(line.credited_cents or 0),
                credited_days=int(line.credited_days or 0),
            )
            for line in inv.charge_lines
        ),
    )


def render_current(cx, invoice_id: str) -> tuple[str, bytes] | None:
    """(ETag, PDF) of the invoice as ``cx``'s snapshot has it; None if it does not exist.

    Run both reads in one REPEATABLE READ transaction: the ETag then names these bytes."""
    from billing.invoices import pdf as invoice_pdf

    row = lookup(cx, invoice_id)
    inv = invoices.get_invoice(cx, invoice_id) if row else None
    if inv is None:
        return None
    return etag_for(row), invoice_pdf.render(to_pdf_invoice(inv, row))


# ---------------------------------------------------------------- the store
class PdfStore:
    """Rendered PDFs under ``<base>/<etag[:2]>/<etag>.pdf`` (``ObjectStoragePath``)."""

    def __init__(self, base_uri: str | None = None):
        from airflow.sdk import ObjectStoragePath

        self.base_uri = (base_uri or settings.pdf_store_uri()).rstrip("/")
        self.base = ObjectStoragePath(self.base_uri)
        self._local = self.base.protocol in ("file", "local")

    @staticmethod
    def key(etag: str) -> str:
        digest = etag.strip('"')
        if not digest.isalnum():
            raise ValueError(f"not one of our ETags: {etag!r}")
        return f"{digest[:2]}/{digest}.pdf"

    def path(self, etag: str):
        return self.base / self.key(etag)

    def get(self, etag: str) -> bytes | None:
        try:
            return self.path(etag).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, etag: str) -> bool:
        return self.path(etag).exists()

    def stored(self) -> set[str]:
        """ETags of every stored PDF (one listing, for the nightly's set difference)."""
        if not self.base.exists():
            return set()
        out = set()
        for folder in self.base.iterdir():
            if folder.is_dir():
                out.update(f'"{p.name[:-4]}"' for p in folder.iterdir() if p.name.endswith(".pdf"))
        return out

    def put(self, etag: str, data: bytes) -> None:
        """Write the whole object or nothing: locally a temp name in the same folder and an
        atomic rename; an object store's PUT of the full object is atomic already."""
        target = self.path(etag)
        if not self._local:
            target.write_bytes(data)
            return
        folder = target.parent
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{target.name}.{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp.path, target.path)


# ---------------------------------------------------------------- render once
# Renders are CPU-bound (the GIL): one at a time per process costs no throughput and keeps
# pooled connections free for lookups while a worker renders.
_render_mutex = threading.Lock()
renders = 0  # PDFs this process rendered (the API's /health shows it)


def render_and_store(
    connection: Callable[[], AbstractContextManager], store: PdfStore, invoice_id: str, etag: str
) -> tuple[str, bytes] | None:
    """The stored PDF for ``etag``, rendered and stored if missing: (ETag, bytes).

    ``connection()`` yields a REPEATABLE READ connection. Under the advisory lock of the
    ETag, the store is re-checked, so concurrent callers (threads, api-server workers, the
    nightly task) render it once. If the snapshot changed since ``etag`` was computed, the
    current invoice is rendered and returned under its own ETag. None: the invoice is gone.
    """
    found = _ensure(connection, store, invoice_id, etag)
    return None if found is None else found[:2]


def _ensure(connection, store: PdfStore, invoice_id: str, etag: str):
    global renders
    with _render_mutex:
        data = store.get(etag)
        if data is not None:
            return etag, data, False
        with connection() as cx:
            cx.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (RENDER_LOCK, etag)
            ).fetchone()
            data = store.get(etag)
            if data is not None:
                return etag, data, False
            started = time.perf_counter()
            rendered = render_current(cx, invoice_id)
            if rendered is None:
                return None
            etag, data = rendered
            store.put(etag, data)
        renders += 1
    log.info(
        "billing pdf rendered %s %s (%d bytes, %.0f ms)",
        invoice_id,
        etag,
        len(data),
        (time.perf_counter() - started) * 1000,
    )
    return etag, data, True


@contextmanager
def snapshot_connection() -> Iterator:
    """A REPEATABLE READ, read-only connection of its own (the nightly task, the CLI)."""
    from psycopg import IsolationLevel

    from billing.platform import db

    with db.connect() as cx:
        cx.isolation_level = IsolationLevel.REPEATABLE_READ
        cx.read_only = True
        yield cx


def pending(rows: list[dict], stored: set[str]) -> list[tuple[str, str]]:
    """(invoice_id, ETag) of the rows whose PDF is not stored: the nightly's work list."""
    out = []
    for row in rows:
        etag = etag_for(row)
        if etag not in stored:
            out.append((row["invoice_id"], etag))
    return out


def render_pending(
    connection: Callable[[], AbstractContextManager] = snapshot_connection,
    store: PdfStore | None = None,
) -> dict:
    """Render and store the PDF of every current invoice not stored under its ETag yet.

    Idempotent: a re-run finds everything stored and renders nothing."""
    store = store or PdfStore()
    with connection() as cx:
        rows = lookup_all(cx)
    todo = pending(rows, store.stored())
    rendered = 0
    for invoice_id, etag in todo:
        found = _ensure(connection, store, invoice_id, etag)
        rendered += bool(found and found[2])
    return {"invoices": len(rows), "already_stored": len(rows) - len(todo), "rendered": rendered}
