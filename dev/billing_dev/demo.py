"""``billing demo``: the whole pipeline on the embedded stack, with a short human summary."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from billing.platform import settings


def run(day: dt.date, orgs: int = 8, events: int = 20_000, seed: int = 42) -> int:
    import os

    from billing import orgs as orgs_mod
    from billing import pricing, reconcile
    from billing.platform import db
    from billing_dev import runner, usage_gen
    from billing_dev.stack.manager import current

    stack = current()
    print("1/6 starting the local stack ...", flush=True)
    stack.up()
    # The whole environment, not only the connections `up` exported: on a first demo (after
    # `make clean`) the in-process Airflow look-ups of run-day need AIRFLOW_HOME and its DB.
    os.environ.update(stack.env())
    catalog = pricing.load_catalog()

    print(f"2/6 importing {orgs} demo organisations ...", flush=True)
    csv_path = orgs_mod.write_csv(
        stack.root / "demo" / "orgs.csv", usage_gen.demo_orgs(orgs, catalog)
    )
    with db.transaction() as cx:
        orgs_mod.upsert(cx, orgs_mod.parse_csv(csv_path, catalog))

    print(f"3/6 writing {events} usage events for {day} (with duplicates and bad lines) ...")
    spec = usage_gen.UsageSpec(
        day, orgs, events, seed, bad_ratio=0.01, dup_ratio=0.01, late_ratio=0.02
    )
    usage_gen.write_day(spec, sorted(catalog.metrics), settings.landing_uri(), files=2)

    print(
        f"4/6 running billing_nightly for arrival day {day} (logical date {day}; "
        "airflow dags test; ~2 min) ...",
        flush=True,
    )
    runner.run_day(day, quiet=True)

    print("5/6 reconciling the period with Stripe ...", flush=True)
    try:
        recon = reconcile.reconcile(day.replace(day=1), idempotency_key=f"demo:{day.isoformat()}")
    except reconcile.ReconcileMismatch as exc:  # reported in the summary; incident is open
        recon = exc.payload

    print("6/6 rendering invoice PDFs ...", flush=True)
    pdf_dir = write_pdfs(day, stack.root / "demo" / "invoices")
    print()
    print(summary(day, recon, pdf_dir))
    return 0


def write_pdfs(day: dt.date, out: Path) -> Path:
    from billing import invoices
    from billing.invoices import store as invoice_store

    out.mkdir(parents=True, exist_ok=True)
    with invoice_store.snapshot_connection() as cx:
        for inv in invoices.list_invoices(cx, day.strftime("%Y-%m")):
            _etag, pdf = invoice_store.render_current(cx, inv.invoice_id)
            (out / f"{inv.invoice_id}.pdf").write_bytes(pdf)
    return out


def summary(day: dt.date, recon: dict, pdf_dir: Path) -> str:
    from billing import ingest, invoices, pricing
    from billing.platform import db

    rep = ingest.report(day)
    total = rep["total"]
    with db.connect() as cx:
        invs = invoices.list_invoices(cx, day.strftime("%Y-%m"))
        pushed = cx.execute(
            """SELECT count(*), coalesce(sum(amount_cents), 0) FROM billing.stripe_outbox
               WHERE status = 'sent' AND kind IN ('usage_item', 'base_fee')"""
        ).fetchone()
        parked = cx.execute(
            "SELECT count(*) FROM billing.stripe_outbox WHERE status = 'parked'"
        ).fetchone()[0]
    by_currency: dict[str, int] = {}
    for inv in invs:
        by_currency[inv.currency] = by_currency.get(inv.currency, 0) + inv.total_cents
    totals = ", ".join(pricing.format_money(v, c) for c, v in sorted(by_currency.items()))
    quarantined = ", ".join(f"{k}={v}" for k, v in sorted(total["quarantined"].items()))
    mails = len(list(settings.mail_dir().glob("*.eml")))
    c = recon.get("counts", {})
    lines = [
        f"Billing run for {day}: done.",
        f"  usage files        {len(rep['files'])}",
        f"  events accepted    {total['accepted']}",
        f"  duplicates         {total['duplicate']}",
        f"  non-billable       {total['non_billable']}",
        f"  quarantined        {sum(total['quarantined'].values())} ({quarantined})",
        f"  invoices (draft)   {len(invs)} for {day:%Y-%m}, month to date {totals}",
        f"  Stripe items sent  {pushed[0]} ({parked} parked)",
        f"  reconciliation     {recon.get('status')}: {c.get('orgs', 0)} orgs compared, "
        f"{c.get('discrepancies', 0)} discrepancies, {c.get('above_tolerance', 0)} above tolerance",
        f"  invoice PDFs       {pdf_dir}",
        f"  emails (sink)      {mails} in {settings.mail_dir()}",
        f"  landing zone       {settings.landing_uri()}",
        "  next               billing invoices list --period "
        f"{day:%Y-%m}; billing ingest report --day {day}; make airflow",
    ]
    return "\n".join(lines)
