"""Benchmark: the nightly invoice snapshot at 1,000 orgs x 10 metrics x 5 dimension values.

A catalog of 10 metrics, each priced per value of one dimension (`region`, 5 values: 2
listed with their own graduated tiers, the rest at the default), mixing aggregations (sum,
count, unique_count, max, latest) and a flat fee per tier; 1,000 orgs on 2 plans; a month
to date of events (default 15 days x 50,000). Times the full build and then one nightly
incremental build (a new day plus late events), and prints the snapshot's row counts. Not a
test; run it by hand and record the numbers in docs/PERFORMANCE.md.

    python bench/snapshot_dimensions.py [--orgs 1000] [--days 15] [--events-per-day 50000]

Uses its own throwaway stack under .local/bench-dims (Postgres only).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = 10
REGIONS = ("eu", "us", "ap", "sa", "af")
AGGREGATIONS = ("sum", "count", "unique_count", "max", "latest")


def _catalog():
    from billing.pricing import parse_catalog

    metrics = {}
    for m in range(METRICS):
        agg = AGGREGATIONS[m % len(AGGREGATIONS)]
        metrics[f"m{m}"] = {"unit": "u", "aggregation": agg, "dimensions": ["region"]} | (
            {"property": "user_id"} if agg == "unique_count" else {}
        )
    tiers = [
        {"up_to": 1000, "unit_price": "0.001", "flat_amount": "5.00"},
        {"up_to": None, "unit_price": "0.0005"},
    ]
    price = {
        "default": {"mode": "graduated", "tiers": [{"up_to": None, "unit_price": "0.002"}]},
        "values": [
            {"match": {"region": r}, "mode": "graduated", "tiers": tiers} for r in REGIONS[:2]
        ],
    }
    plans = {
        name: {"currency": "usd", "base_fee": fee, "metrics": {m: price for m in metrics}}
        for name, fee in (("a", "10.00"), ("b", "99.00"))
    }
    return parse_catalog({"metrics": metrics, "plans": plans}, "bench")


def _insert_day(cx, day: dt.date, arrival: dt.date, n: int, n_orgs: int, tag: str) -> None:
    cx.execute("SELECT billing.ensure_usage_partition(%s)", (day,))
    cx.execute(
        """INSERT INTO billing.usage_events
               (event_id, org_id, metric, quantity, occurred_at, billable, source, properties,
                arrival_day, file_id, line_no)
           SELECT %(tag)s || '-' || g,
                  'o' || (g %% %(orgs)s),
                  'm' || (g / 7 %% %(metrics)s),
                  (g %% 400 + 1),
                  %(day)s::timestamptz + (g %% 86400) * interval '1 second',
                  true, 'bench',
                  jsonb_build_object('region', (%(regions)s::text[])[g / 3 %% 5 + 1],
                                     'user_id', 'u' || (g %% 3000)),
                  %(arrival)s, 0, g
             FROM generate_series(1, %(n)s) AS g""",
        {
            "tag": tag,
            "orgs": n_orgs,
            "metrics": METRICS,
            "regions": list(REGIONS),
            "day": day,
            "arrival": arrival,
            "n": n,
        },
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--orgs", type=int, default=1000)
    p.add_argument("--days", type=int, default=15)
    p.add_argument("--events-per-day", type=int, default=50_000)
    p.add_argument("--root", type=Path, default=ROOT / ".local" / "bench-dims")
    args = p.parse_args()
    from dbt_incremental import _stack  # bench/ is on sys.path when run as a script

    _stack(args.root)
    from billing import transform
    from billing.platform import db

    catalog = _catalog()
    first = dt.date(2026, 3, 1)
    new_day = first + dt.timedelta(days=args.days)
    with db.connect() as cx:
        cx.execute("DROP SCHEMA IF EXISTS billing_snapshot CASCADE")
        cx.execute("DROP SCHEMA IF EXISTS billing_snapshot_build CASCADE")
        cx.execute("TRUNCATE billing.usage_events, billing.organizations CASCADE")
        cx.execute(
            """INSERT INTO billing.organizations (org_id, name, email, plan, currency, created_at)
               SELECT 'o' || g, 'Org ' || g, 'o' || g || '@example.test',
                      CASE WHEN g %% 2 = 0 THEN 'a' ELSE 'b' END, 'usd', '2020-01-01'
                 FROM generate_series(0, %s - 1) AS g""",
            (args.orgs,),
        )
        for k in range(args.days):
            day = first + dt.timedelta(days=k)
            _insert_day(cx, day, day, args.events_per_day, args.orgs, f"h{k}")
        cx.execute("ANALYZE billing.usage_events")
        cx.commit()
    start = time.perf_counter()
    transform.transform_day(
        new_day - dt.timedelta(days=1), first, targets=["postgres"], full_refresh=True,
        catalog=catalog,
    )  # fmt: skip
    full = time.perf_counter() - start
    with db.connect() as cx:
        _insert_day(cx, new_day, new_day, args.events_per_day, args.orgs, "new")
        for back in (1, 2, 3):
            late = new_day - dt.timedelta(days=back)
            _insert_day(cx, late, new_day, args.events_per_day // 200, args.orgs, f"late{back}")
        cx.execute("ANALYZE billing.usage_events")
        cx.commit()
    start = time.perf_counter()
    transform.transform_day(new_day, targets=["postgres"], catalog=catalog)
    nightly = time.perf_counter() - start
    with db.connect() as cx:
        counts = {
            t: cx.execute(f"SELECT count(*) FROM billing_snapshot.{t}").fetchone()[0]
            for t in ("fct_daily_charges", "fct_invoice_lines", "fct_invoices")
        }
    events = args.events_per_day * (args.days + 1)
    print(
        f"{args.orgs} orgs x {METRICS} metrics x {len(REGIONS)} dimension values, "
        f"{events:,} events over {args.days + 1} days"
    )
    print(f"full build (postgres snapshot): {full:.2f}s")
    print(f"nightly incremental build (new day + late events): {nightly:.2f}s")
    print("rows: " + ", ".join(f"{t} {n:,}" for t, n in counts.items()))


if __name__ == "__main__":
    main()
