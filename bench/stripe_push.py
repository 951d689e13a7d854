"""Benchmark: Stripe push throughput against the emulator under the configured rate limit.

Plans one run day for N orgs x M metrics (one customer, one base fee and M usage items per
org) and drains the outbox, timing the drain. Reports writes/s, HTTP requests/s and the
ratio of requests/s to ``BILLING_STRIPE_MAX_RPS``: close to 1.0 means the limiter, not our
code or the emulator, is the bottleneck. Not a test; record the numbers in
docs/PERFORMANCE.md ("Stripe push" section).

    python bench/stripe_push.py [--orgs 60] [--metrics 3] [--rps 25 100 0] [--concurrency 4]

Uses its own throwaway stack under .local/bench-stripe (Postgres, Redis, Stripe emulator),
stopped at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "bench_stripe_snapshot"
DAY = dt.date(2026, 11, 2)


def _stack(root: Path):
    os.environ["BILLING_LOCAL_DIR"] = str(root)
    from billing.platform import db
    from billing_dev.stack import process
    from billing_dev.stack.manager import Stack

    stack = Stack(root)
    for d in (stack.root, stack.run_dir, stack.log_dir):
        d.mkdir(parents=True, exist_ok=True)
    state = stack._init_state()
    if process.read_pid(stack.run_dir / "stripe.pid") is None:
        # The emulator rewrites its whole state per write: start from empty for comparable runs.
        shutil.rmtree(root / "stripe", ignore_errors=True)
    stack.postgres_up(state)
    os.environ.update(stack.env(state))
    db.migrate()
    for name in ("redis", "stripe"):
        stack.daemon_up(name, state)
    return stack


def _snapshot(cx, n_orgs: int, n_metrics: int) -> None:
    cx.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    cx.execute(f"CREATE SCHEMA {SCHEMA}")
    cx.execute(
        f"""CREATE TABLE {SCHEMA}.fct_daily_charges (org_id text, metric text, usage_date date,
                period_start date, currency text, cumulative_charge_cents bigint,
                dimension_key text NOT NULL DEFAULT '',
                charge_label text GENERATED ALWAYS AS (metric || CASE WHEN dimension_key <> '' THEN ' ' || dimension_key ELSE '' END) STORED)"""
    )
    cx.execute(  # the true-up lines the push reads of ended periods (none here)
        f"""CREATE TABLE {SCHEMA}.fct_invoice_lines (org_id text, period_start date,
                line_type text, metric text, currency text, amount_cents bigint,
                charge_label text GENERATED ALWAYS AS (line_type || coalesce('.' || metric, '')) STORED)"""
    )
    cx.execute(
        f"""CREATE TABLE {SCHEMA}.fct_invoices (org_id text, period_start date, plan text,
                currency text, base_fee_cents bigint, total_cents bigint)"""
    )
    cx.execute("TRUNCATE billing.stripe_outbox, billing.stripe_customers, billing.stripe_invoices")
    tag = uuid.uuid4().hex[:8]
    period = DAY.replace(day=1)
    for i in range(n_orgs):
        org = f"bench{tag}{i:04d}"
        cx.execute(
            """INSERT INTO billing.organizations (org_id, name, email, plan, currency)
               VALUES (%s, %s, %s, 'starter', 'usd')""",
            (org, f"Bench {i}", f"{org}@example.test"),
        )
        cx.execute(
            f"INSERT INTO {SCHEMA}.fct_invoices VALUES (%s, %s, 'starter', 'usd', 2900, 0)",
            (org, period),
        )
        for m in range(n_metrics):
            cx.execute(
                f"INSERT INTO {SCHEMA}.fct_daily_charges VALUES (%s, %s, %s, %s, 'usd', %s)",
                (org, f"metric{m}", DAY, period, 100 + 17 * i + m),
            )
    cx.commit()


def _requests_total() -> float:
    from billing import observability as obs

    return sum(
        s.value
        for metric in obs.STRIPE_REQUESTS.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    )


def run_once(n_orgs: int, n_metrics: int, rps: float, concurrency: int) -> dict:
    from billing import stripe_sync
    from billing.platform import db
    from billing.stripe_sync import Engine, outbox, push

    os.environ["BILLING_STRIPE_MAX_RPS"] = str(rps)
    os.environ["BILLING_STRIPE_CONCURRENCY"] = str(concurrency)
    with db.connect() as cx:
        _snapshot(cx, n_orgs, n_metrics)
    with db.transaction() as cx:  # plan first, so the timing is the drain (the HTTP part)
        outbox.enqueue(cx, push.plan_day(cx, DAY))
    engine = Engine()
    before = _requests_total()
    t0 = time.perf_counter()
    result = stripe_sync.drain(engine=engine)
    seconds = time.perf_counter() - t0
    requests = _requests_total() - before
    achieved = requests / seconds
    return {
        "rps_limit": rps or "unlimited",
        "concurrency": concurrency,
        "writes": result["sent"],
        "parked": result["parked"],
        "seconds": round(seconds, 2),
        "writes_per_s": round(result["sent"] / seconds, 1),
        "requests_per_s": round(achieved, 1),
        "ratio_to_limit": round(achieved / rps, 3) if rps else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orgs", type=int, default=60)
    ap.add_argument("--metrics", type=int, default=3)
    ap.add_argument("--rps", type=float, nargs="+", default=[25, 100, 0])
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--keep", action="store_true", help="leave the bench stack running")
    args = ap.parse_args()
    os.environ["BILLING_SNAPSHOT_SCHEMA"] = SCHEMA
    stack = _stack(ROOT / ".local" / "bench-stripe")
    try:
        print("| rps limit | concurrency | writes | seconds | writes/s | requests/s | ratio |")
        print("|---|---|---|---|---|---|---|")
        for rps in args.rps:
            r = run_once(args.orgs, args.metrics, rps, args.concurrency)
            ratio = "-" if r["ratio_to_limit"] is None else f"{r['ratio_to_limit']:.3f}"
            print(
                f"| {r['rps_limit']} | {r['concurrency']} | {r['writes']} | {r['seconds']} | "
                f"{r['writes_per_s']} | {r['requests_per_s']} | {ratio} |",
                flush=True,
            )
            assert r["parked"] == 0, r
    finally:
        if not args.keep:
            stack.down()


if __name__ == "__main__":
    main()
