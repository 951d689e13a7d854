"""Invoices: the published snapshot as invoices, and their PDFs.

Playbook "Invoice lifecycle" and "Invoice PDFs". The CLI, the API, reconciliation and the
Stripe sync read invoices through :func:`get_invoice` / :func:`list_invoices` only.

* ``snapshot``: the reader of ``fct_invoices`` / ``fct_invoice_lines`` (exact amounts).
* ``pdf``: the fpdf2 renderer, a pure function of one invoice.
* ``store``: an invoice PDF's identity (ETag), the PDF store and the nightly pre-render.
"""

from __future__ import annotations

from billing.invoices.snapshot import (
    INVOICE_ID_PATTERN,
    Invoice,
    get_invoice,
    list_invoices,
    schema,
    summary,
)

__all__ = [
    "INVOICE_ID_PATTERN",
    "Invoice",
    "get_invoice",
    "list_invoices",
    "schema",
    "summary",
]
