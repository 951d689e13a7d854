"""Invoice PDFs: deterministic bytes, page breaks with repeated headings, any org name."""

from __future__ import annotations

import re
import zlib
from dataclasses import replace
from decimal import Decimal

import pytest
from pdf_support import pdf_text

from billing.invoices import pdf as invoice_pdf
from billing.invoices.pdf import PdfInvoice, PdfLine, PdfTier


def make_invoice(n_lines: int = 3, name: str = "Acme Inc.", version: str = "v1") -> PdfInvoice:
    lines = tuple(
        PdfLine(
            metric=f"api_calls_{i:02d}",
            quantity=Decimal(12_000 + i),
            amount_cents=1_200 + i,
            tiers=(
                PdfTier("1 – 1,000", Decimal(1_000), Decimal("0"), Decimal("0")),
                PdfTier(
                    "1,001 – ∞",
                    Decimal(11_000 + i),
                    Decimal("0.0011"),
                    Decimal(12_100 + 11 * i) / 1000,
                ),
            ),
        )
        for i in range(n_lines)
    )
    return PdfInvoice(
        invoice_id="inv_2026-01_acme",
        org_id="acme",
        org_name=name,
        org_email="billing@acme.test",
        period="2026-01",
        currency="usd",
        status="final",
        base_fee_cents=4_900,
        total_cents=4_900 + sum(line.amount_cents for line in lines),
        snapshot_version=version,
        lines=lines,
    )


def page_count(pdf: bytes) -> int:
    return len(re.findall(rb"/Type\s*/Page(?!s)", pdf))


HEADING_FILL = b"0.902 0.902 0.902 rg"  # FontFace fill_color=(230, 230, 230)


def page_streams(pdf: bytes) -> list[bytes]:
    """Decompressed content streams that draw text (fonts and images are skipped)."""
    out = []
    for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", pdf, re.S):
        try:
            data = zlib.decompress(m.group(1))
        except zlib.error:
            continue
        if b" Tf" in data:
            out.append(data)
    return out


def test_identical_snapshots_give_identical_bytes():
    a = invoice_pdf.render(make_invoice())
    b = invoice_pdf.render(make_invoice())
    assert a.startswith(b"%PDF-")
    assert a == b
    assert b"/CreationDate (D:20260201000000Z" in a  # fixed: the end of the period


def test_a_different_snapshot_gives_different_bytes():
    a = invoice_pdf.render(make_invoice())
    changed = make_invoice()
    changed = replace(changed, total_cents=changed.total_cents + 1)
    assert invoice_pdf.render(changed) != a


def test_sixty_line_invoice_spans_several_pages_with_repeated_headings():
    pdf = invoice_pdf.render(make_invoice(n_lines=60))
    pages = page_count(pdf)
    assert pages >= 3
    assert page_count(invoice_pdf.render(make_invoice(n_lines=3))) == 1
    # Only the table's heading row is filled grey: every page's content stream has it.
    with_heading = [s for s in page_streams(pdf) if HEADING_FILL in s]
    assert len(with_heading) == pages


@pytest.mark.parametrize(
    "name",
    [
        "Ωmega Ćorp — Москва",
        "שלום בע״מ",
        "株式会社テスト",  # no CJK glyphs in DejaVu: rendered as '?' unless a fallback font is set
        "Emoji 🚀 Ltd.",
        "\x00control\x07chars\r\n",
    ],
)
def test_non_latin_org_names_render(name):
    pdf = invoice_pdf.render(make_invoice(name=name))
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    assert b"/FontFile2" in pdf  # the Unicode TTF is embedded
    assert invoice_pdf.render(make_invoice(name=name)) == pdf


def test_safe_text_replaces_only_uncovered_characters():
    covered = invoice_pdf._covered(())
    assert invoice_pdf.safe_text("Москва Ωmega", covered) == "Москва Ωmega"
    assert invoice_pdf.safe_text("株式", covered) == "??"


def test_fonts_ship_with_their_licence():
    assert (invoice_pdf.FONT_DIR / "DejaVuSans.ttf").is_file()
    assert (invoice_pdf.FONT_DIR / "LICENSE-DejaVu.txt").is_file()


def test_draft_shows_estimated_issue_and_due_dates_and_metric_names(tmp_path, monkeypatch):
    monkeypatch.setenv("BILLING_STRIPE_DAYS_UNTIL_DUE", "14")
    inv = make_invoice(n_lines=1)
    named = replace(inv, lines=(replace(inv.lines[0], description="API requests"),))
    text = pdf_text(invoice_pdf.render(named), tmp_path)
    assert re.search(r"Issue date +2026-02-01 \(estimated\)", text)  # the period close
    assert re.search(r"Due date +2026-02-15 \(estimated\)", text)  # + 14 days of terms
    assert "API requests" in text and "api_calls_00" not in text
    # Without a catalog name the metric id still shows: never an empty row.
    assert "api_calls_00" in pdf_text(invoice_pdf.render(inv), tmp_path)


def test_finalized_invoice_shows_stripes_dates(tmp_path):
    import datetime as dt

    inv = replace(make_invoice(), issued_on=dt.date(2026, 2, 2), due_on=dt.date(2026, 3, 4))
    text = pdf_text(invoice_pdf.render(inv), tmp_path)
    assert re.search(r"Issue date +2026-02-02\n", text) and re.search(
        r"Due date +2026-03-04\n", text
    )
    assert "estimated" not in text


def test_a_tiers_flat_fee_shows_in_its_row(tmp_path):
    """A tier with a flat amount (docs/PRICING.md) reads "quantity × unit price + flat F =
    amount"; a tier without one keeps the short form."""
    inv = make_invoice(n_lines=1)
    flat = PdfTier("1 – 5", Decimal(3), Decimal("0"), Decimal("10"), Decimal("10"))
    line = replace(inv.lines[0], tiers=(flat, inv.lines[0].tiers[1]))
    text = pdf_text(invoice_pdf.render(replace(inv, lines=(line,))), tmp_path)
    assert "1 – 5: 3 × 0 + flat 10 = 10" in text
    assert "1,001 – ∞: 11,000 × 0.0011 = 12.10" in text


def test_an_aggregated_line_says_what_it_measures_and_its_credits(tmp_path):
    """A latest-value metric whose value fell: the quantity says "latest value" and the row
    names the credit items Stripe has for the days it fell (already netted in the amount)."""
    inv = make_invoice(n_lines=2)
    seats = replace(inv.lines[0], aggregation="latest", credited_cents=-3_000, credited_days=2)
    users = replace(inv.lines[1], aggregation="unique_count")
    text = pdf_text(invoice_pdf.render(replace(inv, lines=(seats, users))), tmp_path)
    flat = " ".join(text.split())
    assert "latest value" in text and "distinct" in text
    assert "Includes -$30.00 credited on 2 days the billable quantity's price fell" in flat
    assert flat.count("credited on") == 1
