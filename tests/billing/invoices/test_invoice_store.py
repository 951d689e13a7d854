"""billing.invoices.store without a database: the store's keys and atomic writes, the
nightly's work list and Last-Modified from the data."""

from __future__ import annotations

import datetime as dt

import pytest

from billing.invoices import store as invoice_store
from billing.invoices.store import PdfStore

ETAG = '"0123456789abcdef0123456789abcdef"'


def row(invoice_id: str = "inv_acme_202601", **extra) -> dict:
    return {
        "invoice_id": invoice_id,
        "snapshot_hash": "h" * 32,
        "org_name": "Acme",
        "org_email": "a@acme.test",
        "period": "2026-01",
        **extra,
    }


def test_store_round_trip_leaves_no_temp_files(tmp_path):
    store = PdfStore(tmp_path.as_uri())
    assert store.get(ETAG) is None and store.stored() == set()
    store.put(ETAG, b"%PDF-1")
    store.put(ETAG, b"%PDF-2")  # a re-render replaces the object whole
    assert store.get(ETAG) == b"%PDF-2"
    assert store.stored() == {ETAG}
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert files == ["01", "01/0123456789abcdef0123456789abcdef.pdf"]


@pytest.mark.parametrize("bad", ['"../../etc/passwd"', '"a/b"', '""', '"x.pdf"'])
def test_store_refuses_what_is_not_an_etag(tmp_path, bad):
    with pytest.raises(ValueError):
        PdfStore(tmp_path.as_uri()).path(bad)


def test_pending_skips_stored_etags():
    a, b = row("inv_a_202601"), row("inv_b_202601", org_name="Other")
    stored = {invoice_store.etag_for(a)}
    assert invoice_store.pending([a, b], stored) == [("inv_b_202601", invoice_store.etag_for(b))]


def test_etag_follows_every_visible_input():
    base = invoice_store.etag_for(row())
    assert invoice_store.etag_for(row()) == base
    for change in ({"org_name": "Acme 2"}, {"org_email": "b@acme.test"}, {"snapshot_hash": "x"}):
        assert invoice_store.etag_for(row(**change)) != base, change
    assert invoice_store.etag_for(row(issued_on=dt.date(2026, 2, 1))) != base


def test_last_modified_comes_from_the_data():
    utc = dt.UTC
    assert invoice_store.last_modified(row()) == dt.datetime(2026, 2, 1, tzinfo=utc)
    day = row(as_of_day=dt.date(2026, 1, 28))
    assert invoice_store.last_modified(day) == dt.datetime(2026, 1, 28, tzinfo=utc)
    final = row(as_of_day=dt.date(2026, 1, 28), issued_on=dt.date(2026, 2, 1))
    assert invoice_store.last_modified(final) == dt.datetime(2026, 2, 1, tzinfo=utc)
