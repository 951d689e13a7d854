"""Invoice PDFs rendered from the invoice snapshot.

Pure function of a :class:`PdfInvoice`: no database, no Airflow, no clock. The same
snapshot version always gives the same bytes (fixed creation date, deterministic font
subsetting), so the API can key its cache and its ETag on the snapshot version.

Fonts: DejaVu Sans is vendored in ``billing/fonts`` (Bitstream Vera licence, see
``LICENSE-DejaVu.txt``). It covers Latin, Greek, Cyrillic, Armenian, Georgian, Hebrew and
Arabic (unshaped). Scripts it lacks, such as CJK, are drawn from the TTF/OTF files listed
in ``BILLING_PDF_FALLBACK_FONTS`` (``os.pathsep``-separated) when set; any character no
font has is replaced by ``?`` so a name never makes rendering fail.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from fpdf import FPDF
from fpdf.fonts import FontFace

from billing.platform import settings
from billing.platform.dates import parse_period, period_close
from billing.pricing.catalog import format_money

FONT_DIR = Path(__file__).resolve().parent / "fonts"
RENDERER_VERSION = "3"  # bump when the layout changes: it is part of the API's ETag
BASE_FEE_METRIC = "base_fee"
# What an invoice line's quantity is, for aggregations other than a plain sum.
AGGREGATION_LABELS = {
    "count": "events",
    "unique_count": "distinct",
    "max": "peak",
    "latest": "latest value",
    "time_weighted": "unit-hours",
}

# fontTools logs every font subsetting step at INFO; keep task logs readable.
logging.getLogger("fontTools").setLevel(logging.WARNING)


@dataclass(frozen=True)
class PdfTier:
    """One tier of a metric's price: the quantity priced in it and its exact cost."""

    label: str  # e.g. "1,001 – 10,000" or "packages of 1,000"
    quantity: Decimal
    unit_price: Decimal  # major units, as in the catalog
    amount: Decimal  # exact major units; only the line total is rounded to cents
    flat_amount: Decimal = Decimal(0)  # the tier's flat fee, part of amount


@dataclass(frozen=True)
class PdfLine:
    metric: str
    quantity: Decimal
    amount_cents: int
    tiers: tuple[PdfTier, ...] = ()
    description: str | None = None
    aggregation: str = "sum"
    credited_cents: int = 0  # negative daily charges netted in amount_cents (<= 0)
    credited_days: int = 0

    @property
    def quantity_label(self) -> str:
        """The quantity and, unless it is a plain sum, what it measures."""
        what = AGGREGATION_LABELS.get(self.aggregation)
        return f"{_qty(self.quantity)}\n{what}" if what else _qty(self.quantity)


@dataclass(frozen=True)
class PdfInvoice:
    invoice_id: str
    org_id: str
    org_name: str
    org_email: str
    period: str  # YYYY-MM
    currency: str
    status: str
    base_fee_cents: int
    total_cents: int
    snapshot_version: str
    lines: tuple[PdfLine, ...] = field(default_factory=tuple)
    issued_on: date | None = None  # Stripe's finalization date; None while a draft
    due_on: date | None = None  # Stripe's due date; None while a draft
    credits_applied_cents: int = 0  # prepaid credits the close applied (>= 0)
    # a period in subscription segments (docs/SUBSCRIPTIONS.md): one base fee row per
    # segment, (item, quantity, amount); empty: the one "Base fee" row of a whole period
    base_fees: tuple[tuple[str, str, int], ...] = ()

    @property
    def amount_due_cents(self) -> int:
        return self.total_cents - self.credits_applied_cents

    @property
    def usage_cents(self) -> int:
        return sum(line.amount_cents for line in self.lines)


def days_until_due() -> int:
    """Payment terms of a draft's estimated due date: the Stripe policy's ``days_until_due``."""
    from billing.stripe_sync.client import Policy

    return Policy.from_env().days_until_due


def issue_and_due(invoice: PdfInvoice) -> tuple[date, date, bool]:
    """(issue date, due date, estimated?): Stripe's once finalized, else the period close
    (the first day after the period) plus the payment terms."""
    if invoice.issued_on is not None and invoice.due_on is not None:
        return invoice.issued_on, invoice.due_on, False
    issued = invoice.issued_on or period_close(parse_period(invoice.period)).date()
    return issued, invoice.due_on or issued + timedelta(days=days_until_due()), True


@lru_cache(maxsize=8)
def _cmap(path: Path) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    with TTFont(str(path), lazy=True, fontNumber=0) as font:
        return frozenset(font.getBestCmap() or {})


def _covered(fallbacks: Sequence[Path]) -> frozenset[int]:
    covered = _cmap(FONT_DIR / "DejaVuSans.ttf") & _cmap(FONT_DIR / "DejaVuSans-Bold.ttf")
    for p in fallbacks:
        covered |= _cmap(p)
    return covered


def safe_text(text: str, covered: frozenset[int]) -> str:
    """Replace characters no embedded font can draw, so rendering never fails."""
    return "".join(
        ch if ord(ch) in covered or ch in "\n\t" else "?" for ch in str(text).replace("\r", "")
    )


def _qty(q: Decimal | int) -> str:
    d = Decimal(q)
    if d == d.to_integral_value():
        return f"{int(d):,}"
    return f"{d.normalize():,f}"


def _num(d: Decimal | int) -> str:
    """Exact decimal, grouped, without exponent or trailing zeros beyond two places."""
    d = Decimal(d)
    text = f"{d:,f}"
    if "." in text:
        whole, frac = text.split(".")
        frac = frac.rstrip("0").ljust(2, "0")
        text = f"{whole}.{frac}"
    return text


class _InvoicePDF(FPDF):
    def __init__(self, title: str, covered: frozenset[int]):
        super().__init__(orientation="P", unit="mm", format="A4")
        self._title = title
        self._covered = covered

    def header(self):
        if self.page_no() > 1:
            self.set_font("DejaVu", "", 8)
            self.cell(0, 6, self._title, align="R", new_x="LMARGIN", new_y="NEXT")

    def footer(self):
        self.set_y(-12)
        self.set_font("DejaVu", "", 8)
        self.cell(0, 6, f"Page {self.page_no()}/{{nb}}", align="C")


def render(invoice: PdfInvoice) -> bytes:
    """The invoice as PDF bytes; identical snapshots give identical bytes."""
    fallbacks = settings.pdf_fallback_fonts()
    covered = _covered(fallbacks)

    def t(s: object) -> str:
        return safe_text(str(s), covered)

    money = lambda cents: format_money(int(cents), invoice.currency)  # noqa: E731
    pdf = _InvoicePDF(t(f"Invoice {invoice.invoice_id} · {invoice.period}"), covered)
    pdf.set_creation_date(period_close(parse_period(invoice.period)))  # fixed: the close
    pdf.set_producer("billing invoice_pdf")
    pdf.set_title(f"Invoice {invoice.invoice_id}")
    pdf.set_author(t(settings.invoice_seller()[0]))
    pdf.set_subject(t(f"{invoice.org_id} {invoice.period}"))
    pdf.add_font("DejaVu", "", FONT_DIR / "DejaVuSans.ttf")
    pdf.add_font("DejaVu", "B", FONT_DIR / "DejaVuSans-Bold.ttf")
    names = []
    for i, path in enumerate(fallbacks):
        pdf.add_font(f"Fallback{i}", "", path)
        names.append(f"Fallback{i}")
    if names:
        pdf.set_fallback_fonts(names, exact_match=False)
    pdf.set_auto_page_break(auto=True, margin=16)
    pdf.add_page()

    # Seller (left) and invoice facts (right).
    top = pdf.get_y()
    pdf.set_font("DejaVu", "B", 16)
    pdf.cell(0, 9, "INVOICE", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("DejaVu", "", 9)
    for line in settings.invoice_seller():
        pdf.cell(90, 5, t(line), new_x="LMARGIN", new_y="NEXT")
    left_bottom = pdf.get_y()
    issued, due, estimated = issue_and_due(invoice)
    note = " (estimated)" if estimated else ""
    facts = [
        ("Invoice", invoice.invoice_id),
        ("Period", invoice.period),
        ("Issue date", f"{issued.isoformat()}{note}"),
        ("Due date", f"{due.isoformat()}{note}"),
        ("Status", invoice.status),
        ("Currency", invoice.currency.upper()),
        ("Snapshot", invoice.snapshot_version[:16]),
    ]
    pdf.set_y(top)
    for label, value in facts:
        pdf.set_x(120)
        pdf.set_font("DejaVu", "B", 9)
        pdf.cell(25, 5, label)
        pdf.set_font("DejaVu", "", 9)
        pdf.multi_cell(0, 5, t(value), new_x="LMARGIN", new_y="NEXT")
    pdf.set_y(max(left_bottom, pdf.get_y()) + 6)

    # Bill to.
    pdf.set_font("DejaVu", "B", 10)
    pdf.cell(0, 6, "Bill to", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("DejaVu", "", 10)
    pdf.multi_cell(0, 5, t(invoice.org_name), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("DejaVu", "", 9)
    pdf.cell(0, 5, t(f"Org ID: {invoice.org_id}"), new_x="LMARGIN", new_y="NEXT")
    pdf.cell(0, 5, t(invoice.org_email), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(6)

    # Lines: the base fee first, then one row per metric; headings repeat on every page.
    pdf.set_font("DejaVu", "", 8.5)
    heading = FontFace(emphasis="BOLD", fill_color=(230, 230, 230))
    with pdf.table(
        col_widths=(45, 25, 85, 25),
        text_align=("LEFT", "RIGHT", "LEFT", "RIGHT"),
        headings_style=heading,
        repeat_headings=1,
        line_height=4.5,
        padding=1,
    ) as table:
        row = table.row()
        for h in ("Item", "Quantity", "Tier breakdown", "Amount"):
            row.cell(h)
        for item, quantity, cents in invoice.base_fees or (
            ("Base fee", "1", invoice.base_fee_cents),
        ):
            row = table.row()
            for v in (t(item), quantity, "", money(cents)):
                row.cell(v)
        for line in invoice.lines:
            tiers = "\n".join(
                f"{tier.label}: {_qty(tier.quantity)} × {_num(tier.unit_price)}"
                + (f" + flat {_num(tier.flat_amount)}" if tier.flat_amount else "")
                + f" = {_num(tier.amount)}"
                for tier in line.tiers
            )
            if line.credited_cents:
                days = "day" if line.credited_days == 1 else "days"
                tiers += (
                    f"\nIncludes {money(line.credited_cents)} credited on "
                    f"{line.credited_days} {days} the billable quantity's price fell"
                )
            row = table.row()
            row.cell(t(line.description or line.metric))
            row.cell(line.quantity_label)
            row.cell(t(tiers))
            row.cell(money(line.amount_cents))

    # Totals.
    pdf.ln(4)
    totals = [
        ("Base fee", money(invoice.base_fee_cents), ""),
        ("Usage", money(invoice.usage_cents), ""),
        (f"Total ({invoice.currency.upper()})", money(invoice.total_cents), "B"),
    ]
    if invoice.credits_applied_cents:
        totals += [
            ("Credits applied", money(-invoice.credits_applied_cents), ""),
            (f"Amount due ({invoice.currency.upper()})", money(invoice.amount_due_cents), "B"),
        ]
    for label, value, style in totals:
        pdf.set_font("DejaVu", style, 10)
        pdf.set_x(110)
        pdf.cell(55, 6, label, align="R")
        pdf.cell(0, 6, value, align="R", new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def period_label(value: date | str) -> str:
    """``date(2026, 1, 1)`` or ``"2026-01-01"`` -> ``"2026-01"``."""
    return value.strftime("%Y-%m") if isinstance(value, date) else str(value)[:7]
