"""billing_dunning end to end with `airflow dags test`: the run is as of the day its data
interval ends, sends exactly the notices due that day through the SMTP sink, and a second
run of the same day sends nothing."""

from __future__ import annotations

import datetime as dt
import email
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

AIRFLOW = Path(sys.executable).parent / "airflow"
# `dags test` treats the date as the run time: interval [03-01 06:00, 03-02 06:00), as of 03-02.
RUN_AT = "2026-03-02T06:00:00+00:00"

pytestmark = pytest.mark.integration


def _dags_test() -> subprocess.CompletedProcess:
    env = {**os.environ, "BILLING_RETRY_DELAY_SECONDS": "1"}
    return subprocess.run(
        [str(AIRFLOW), "dags", "test", "billing_dunning", RUN_AT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _setup(pg, tag: str) -> None:
    for suffix, due in (("new", dt.date(2026, 3, 1)), ("old", dt.date(2026, 2, 20))):
        org = f"{tag}-{suffix}"
        pg.execute(
            """INSERT INTO billing.organizations (org_id, name, email, plan, currency)
               VALUES (%s, %s, %s, 'starter', 'usd')""",
            (org, f"Org {suffix}", f"ap@{org}.example.test"),
        )
        pg.execute(
            """INSERT INTO billing.stripe_invoices
                   (org_id, period, stripe_invoice_id, status, currency, amount_due_cents,
                    amount_paid_cents, amount_remaining_cents, due_at)
               VALUES (%s, '2026-01-01', %s, 'open', 'usd', 2900, 0, 2900, %s)""",
            (org, f"in_{tag}{suffix}", dt.datetime.combine(due, dt.time(), tzinfo=dt.UTC)),
        )
    pg.commit()


def _mails(tag: str) -> list[tuple[str, str, str, str]]:
    from billing.platform import settings

    out = []
    for p in sorted(settings.mail_dir().glob("*.eml")):
        m = email.message_from_bytes(p.read_bytes())
        if (m["X-Billing-Org"] or "").startswith(tag):
            out.append((m["X-Billing-Org"], m["X-Billing-Dunning-Stage"], m["To"], m["Subject"]))
    return sorted(out)


def test_one_day_end_to_end(clean_db, pg):
    tag = f"d{uuid.uuid4().hex[:8]}"
    _setup(pg, tag)
    out = _dags_test()
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    expected = [
        (
            f"{tag}-new",
            "reminder",
            f"ap@{tag}-new.example.test",
            f"Payment reminder: invoice in_{tag}new ($29.00) is past due",
        ),
        (
            f"{tag}-old",
            "second_notice",
            f"ap@{tag}-old.example.test",
            f"Second notice: invoice in_{tag}old ($29.00) is 10 days overdue",
        ),
    ]
    assert _mails(tag) == expected
    rows = pg.execute(
        """SELECT org_id, stage, status, as_of::text FROM billing.dunning_notices
            ORDER BY org_id, days_past_due"""
    ).fetchall()
    assert rows == [
        (f"{tag}-new", "reminder", "sent", "2026-03-02"),
        (f"{tag}-old", "reminder", "skipped", "2026-03-02"),
        (f"{tag}-old", "second_notice", "sent", "2026-03-02"),
    ]
    # Re-running the same day (a clear, a retry) sends nothing more.
    out = _dags_test()
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert _mails(tag) == expected
