"""When a month closes: the rule behind billing_nightly's ``stripe_close_period``.

Month M used to close only in M's last arrival-day run, so a missed last day (with
``catchup=False`` the scheduler never creates it) left M open for ever. Now every run of
arrival day D records D (``billing.nightly_days``) and then closes each month M that is due:

* M is not closed yet (``billing.period_closes``), and M's last day has ended (UTC);
* either every arrival day of M has been run, and D is in M or later (whichever run gets
  there first: the last day's, or any run of a backfill that completes M), or
* D is after M (a later month's run): M closes anyway, its missing arrival days recorded.
  Usage of a day run later still reaches Stripe as late items tagged M, collected on the
  next invoice (the lateness window, ``billing.stripe_sync.push``), so nothing is lost.

Candidates are months with Stripe items (``billing.stripe_outbox``) or with run days, up to
D's month: a month that was never opened (only late events) closes in the next run too.
A close is recorded only once complete (every org with items in M has a finalized Stripe
invoice); until then the next run retries it, and every step is idempotent.
"""

from __future__ import annotations

import datetime as dt

from billing.platform.dates import month_end, period_of


def days_of(period: dt.date) -> list[dt.date]:
    first = period_of(period)
    return [first + dt.timedelta(days=i) for i in range((month_end(first) - first).days + 1)]


def record_day(cx, day: dt.date, run_id: str | None = None) -> None:
    """Arrival day ``day`` went through ingest, snapshot and push (first record kept)."""
    cx.execute(
        """INSERT INTO billing.nightly_days (arrival_day, run_id) VALUES (%s, %s)
           ON CONFLICT (arrival_day) DO NOTHING""",
        (day, run_id),
    )


def due(cx, day: dt.date, today: dt.date) -> list[tuple[dt.date, list[dt.date]]]:
    """The months run day ``day`` closes, oldest first, each with its arrival days not run.

    ``today`` is the UTC date the run executes on: a month whose last day has not ended
    (a Trigger at logical date "now" on the 31st) never closes early.
    """
    rows = cx.execute(
        """SELECT p FROM (
               SELECT DISTINCT period AS p FROM billing.stripe_outbox
                WHERE kind IN ('usage_item', 'base_fee') AND status <> 'cancelled'
               UNION
               SELECT DISTINCT date_trunc('month', arrival_day)::date FROM billing.nightly_days
           ) c
           WHERE p <= %s AND NOT EXISTS (SELECT 1 FROM billing.period_closes pc WHERE pc.period = c.p)
           ORDER BY p""",
        (period_of(day),),
    ).fetchall()
    out = []
    for (period,) in rows:
        end = month_end(period)
        if end >= today:
            continue
        done = {
            d
            for (d,) in cx.execute(
                "SELECT arrival_day FROM billing.nightly_days WHERE arrival_day BETWEEN %s AND %s",
                (period, end),
            ).fetchall()
        }
        missing = [d for d in days_of(period) if d not in done]
        if not missing or day > end:
            out.append((period, missing))
    return out


def record_if_complete(
    cx, period: dt.date, closed_on_day: dt.date | None, missing: list[dt.date]
) -> bool:
    """Record ``period`` closed when every org with items in it has a finalized invoice."""
    open_orgs = cx.execute(
        """SELECT count(DISTINCT o.org_id) FROM billing.stripe_outbox o
            WHERE o.period = %s AND o.kind IN ('usage_item', 'base_fee') AND o.status <> 'cancelled'
              AND NOT EXISTS (SELECT 1 FROM billing.stripe_invoices i
                               WHERE i.org_id = o.org_id AND i.period = o.period
                                 AND i.status <> 'draft')""",
        (period,),
    ).fetchone()[0]
    if open_orgs:
        return False
    invoices = cx.execute(
        "SELECT count(*) FROM billing.stripe_invoices WHERE period = %s", (period,)
    ).fetchone()[0]
    cx.execute(
        """INSERT INTO billing.period_closes (period, closed_on_day, missing_days, invoices)
           VALUES (%s, %s, %s, %s) ON CONFLICT (period) DO NOTHING""",
        (period, closed_on_day, missing, invoices),
    )
    return True


def closed(cx, period: dt.date) -> dict | None:
    row = cx.execute(
        """SELECT closed_on_day, missing_days, invoices, closed_at FROM billing.period_closes
            WHERE period = %s""",
        (period_of(period),),
    ).fetchone()
    if row is None:
        return None
    return {
        "closed_on_day": row[0].isoformat() if row[0] else None,
        "missing_days": [d.isoformat() for d in row[1]],
        "invoices": row[2],
        "closed_at": row[3].isoformat(),
    }
