"""Benchmark: the nightly dbt build for one new day, on top of 1 vs 60 days of history.

Same daily volume in both cases (plus a few late events for the previous days), over the
shipped catalog's metrics: sums, a dimensioned metric (ai_tokens: 5 models x 2 token types)
and a unique_count (active_users). The incremental models re-aggregate only the days the new
arrivals touch, so the two timings should be close: target ratio <= 1.3. Not a test; run it by hand and record the numbers in
docs/PERFORMANCE.md ("dbt" section).

    python bench/dbt_incremental.py [--events-per-day 20000] [--orgs 50]

Uses its own throwaway stack under .local/bench-dbt (Postgres + a chDB path).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stack(root: Path) -> None:
    os.environ["BILLING_LOCAL_DIR"] = str(root)
    from billing.platform import db
    from billing_dev.stack.manager import Stack

    stack = Stack(root)
    state = stack._init_state()
    stack.postgres_up(state)
    os.environ.update(stack.env(state))
    db.migrate()


def _chdb_path(path: Path) -> None:
    from billing.platform import connections as conns

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    ch = conns.get(conns.CLICKHOUSE)
    body = json.loads(ch.to_json())
    body["extra"] = {**body.get("extra", {}), "interface": "chdb", "path": str(path)}
    os.environ[conns.env_var(conns.CLICKHOUSE)] = json.dumps(body)


def _reset(cx, n_orgs: int) -> None:
    from billing import orgs, pricing
    from billing_dev import usage_gen

    cx.execute("DROP SCHEMA IF EXISTS billing_snapshot CASCADE")
    cx.execute("DROP SCHEMA IF EXISTS billing_snapshot_build CASCADE")
    cx.execute("TRUNCATE billing.usage_events, billing.organizations CASCADE")
    orgs.upsert(cx, usage_gen.demo_orgs(n_orgs, pricing.load_catalog()))
    cx.execute("UPDATE billing.organizations SET created_at = '2020-01-01'")
    cx.commit()


def _insert_day(cx, day: dt.date, arrival: dt.date, n: int, n_orgs: int, tag: str) -> None:
    cx.execute("SELECT billing.ensure_usage_partition(%s)", (day,))
    cx.execute(
        # the shipped catalog's metrics: four sums, ai_tokens priced per (model, token_type)
        # and active_users a unique_count of user_id (docs/PRICING.md)
        """INSERT INTO billing.usage_events
               (event_id, org_id, metric, quantity, occurred_at, billable, source, properties,
                arrival_day, file_id, line_no)
           SELECT %(tag)s || '-' || g,
                  'org-' || lpad((g %% %(orgs)s + 1)::text, 4, '0'),
                  (ARRAY['api_calls', 'storage_gb', 'compute_minutes', 'emails_sent',
                         'ai_tokens', 'active_users'])[g %% 6 + 1],
                  CASE WHEN g %% 6 = 1 THEN (g %% 5000) / 100.0 ELSE (g %% 400 + 1) END,
                  %(day)s::timestamptz + (g %% 86400) * interval '1 second',
                  g %% 33 <> 0,
                  (ARRAY['api-gateway', 'storage-svc', 'scheduler', 'mailer', 'llm', 'app'])
                      [g %% 6 + 1],
                  CASE g %% 6
                      WHEN 4 THEN jsonb_build_object(
                          'model', (ARRAY['small', 'large', 'medium', 'tiny', 'huge'])[g %% 5 + 1],
                          'token_type', (ARRAY['input', 'output'])[g / 6 %% 2 + 1])
                      WHEN 5 THEN jsonb_build_object('user_id', 'user-' || (g / 6 %% 2000))
                  END,
                  %(arrival)s, 0, g
             FROM generate_series(1, %(n)s) AS g""",
        {"tag": tag, "orgs": n_orgs, "day": day, "arrival": arrival, "n": n},
    )


def scenario(history_days: int, new_day: dt.date, per_day: int, n_orgs: int, root: Path) -> dict:
    from billing import transform
    from billing.platform import db

    _chdb_path(root / f"clickhouse-{history_days}")
    with db.connect() as cx:
        _reset(cx, n_orgs)
        first = new_day - dt.timedelta(days=history_days)
        for k in range(history_days):
            day = first + dt.timedelta(days=k)
            _insert_day(cx, day, day, per_day, n_orgs, f"h{k}")
        cx.commit()
    transform.transform_day(new_day - dt.timedelta(days=1), first, full_refresh=True)
    with db.connect() as cx:
        _insert_day(cx, new_day, new_day, per_day, n_orgs, "new")
        for back in (1, 2, 3):  # ~1.5% late events for the previous days
            late = new_day - dt.timedelta(days=back)
            _insert_day(cx, late, new_day, per_day // 200, n_orgs, f"late{back}")
        cx.execute("ANALYZE billing.usage_events")
        cx.commit()
    start = time.perf_counter()
    results = transform.transform_day(new_day)
    total = time.perf_counter() - start
    return {
        "history_days": history_days,
        "seconds": round(total, 2),
        **{f"{t}_seconds": round(r.seconds, 2) for t, r in results.items()},
        **{f"{t}_dbt_seconds": round(r.dbt_seconds or 0, 2) for t, r in results.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events-per-day", type=int, default=20_000)
    p.add_argument("--orgs", type=int, default=50)
    p.add_argument("--day", type=dt.date.fromisoformat, default=dt.date(2026, 3, 15))
    p.add_argument("--root", type=Path, default=ROOT / ".local" / "bench-dbt")
    args = p.parse_args()
    _stack(args.root)
    rows = [scenario(h, args.day, args.events_per_day, args.orgs, args.root) for h in (1, 60)]
    for r in rows:
        print(
            f"history {r['history_days']:>2} day(s): nightly build {r['seconds']:.2f}s "
            f"(postgres {r['postgres_seconds']:.2f}s, clickhouse {r['clickhouse_seconds']:.2f}s; "
            f"inside dbt: {r['postgres_dbt_seconds']:.2f}s + {r['clickhouse_dbt_seconds']:.2f}s)"
        )
    ratio = rows[1]["seconds"] / rows[0]["seconds"]
    print(
        f"ratio 60/1 = {ratio:.2f} (target <= 1.3)  [{args.events_per_day} events/day, {args.orgs} orgs]"
    )


if __name__ == "__main__":
    main()
