"""Benchmark: invoice PDFs through the real Airflow API server (plugin at /billing).

    .venv/bin/python bench/pdf_api.py [--seconds 10] [--clients 16] [--workers 2] [--invoices 1000]

Brings up its own stack under ``.local/bench-stack`` (so it never touches dev data),
seeds synthetic snapshot rows (``billing_snapshot.fct_invoices`` / ``fct_invoice_lines``,
created if dbt has not built them there), empties its PDF store
(``.local/bench-stack/pdf-store``), renders the hot set into it as the nightly task would
(``billing.invoices.store``), starts ``airflow api-server --workers N`` with our plugin and
the bare ceiling endpoint (``BILLING_API_BENCH=1``), gets a JWT, then runs each phase with
C concurrent clients for S seconds:

- ceiling: a bare FastAPI endpoint answering a fixed 304 in the same api-server (no auth,
  no database): the practical ceiling of the stack and of this client;
- cold: every request is for an invoice nobody rendered yet (render once + store);
- warm_200: stored PDFs (the nightly's), full body;
- revalidate_304: the same with ``If-None-Match`` (one lookup, no body);
- mixed: 90 % 304, 9 % warm 200, 1 % cold.

Prints requests/s, p50/p99 latency, errors, each phase's ratio to the ceiling, the PDFs
rendered on the request path during it (the api-server log's ``billing pdf rendered``
lines) and the api-server workers' memory (RSS) after it, as JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

from billing.platform import settings

ROOT = Path(__file__).resolve().parents[1]
STACK_DIR = ROOT / ".local" / "bench-stack"
SCHEMA = "billing_snapshot"
DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.fct_invoices (
    invoice_id text, org_id text, period text, period_start date, period_end date,
    plan text, currency text, base_fee_cents bigint, usage_cents bigint,
    total_cents bigint, line_count integer, status text, catalog_version text,
    snapshot_hash text, as_of_day date);
CREATE TABLE IF NOT EXISTS {SCHEMA}.fct_invoice_lines (
    invoice_line_id text, invoice_id text, line_number integer, org_id text,
    period_start date, line_type text, metric text, pricing_mode text, quantity numeric,
    amount_cents bigint, currency text, tiers jsonb, catalog_version text, aggregation text,
    credited_cents bigint NOT NULL DEFAULT 0, credited_days integer NOT NULL DEFAULT 0,
    dimension_key text NOT NULL DEFAULT '', dimensions jsonb NOT NULL DEFAULT '{{}}',
    segment_start date, segment_end date, plan text,
    charge_label text GENERATED ALWAYS AS (CASE WHEN line_type = 'usage' THEN metric || CASE WHEN dimension_key <> '' THEN ' ' || dimension_key ELSE '' END
        ELSE line_type || coalesce('.' || metric, '') END) STORED);
CREATE INDEX IF NOT EXISTS bench_inv_id ON {SCHEMA}.fct_invoices (invoice_id);
CREATE INDEX IF NOT EXISTS bench_line_inv_id ON {SCHEMA}.fct_invoice_lines (invoice_id);
"""
METRICS = ("api_calls", "storage_gb", "compute_minutes", "emails_sent", "seats", "gpu_hours")


def seed(n: int) -> list[str]:
    from billing.platform import db

    ids, inv_rows, line_rows = [], [], []
    for k in range(n):
        org = f"bench-{k:05d}"
        iid = f"inv_{org}_203101"
        ids.append(iid)
        inv_rows.append((org, "Bench Org Ωmega", f"{org}@bench.test"))
        total = 4900
        line_rows.append((f"{iid}.0", iid, 1, org, "base_fee", None, None, 1, 4900, "[]"))
        for j, metric in enumerate(METRICS, 2):
            cents = 1000 + k + j
            total += cents
            tiers = [
                {"from": 0, "up_to": 1000, "unit_price": 0, "quantity": 1000, "amount": 0},
                {
                    "from": 1000,
                    "up_to": None,
                    "unit_price": "0.001",
                    "quantity": cents * 10,
                    "amount": str(cents / 100),
                },
            ]
            line_rows.append(
                (f"{iid}.{j}", iid, j, org, "usage", metric, "graduated", 1000 + cents * 10, cents,
                 json.dumps(tiers))
            )  # fmt: skip
        inv_rows[-1] += (iid, total)
    with db.connect(autocommit=True) as cx:
        cx.execute(DDL)
        cx.execute(f"DELETE FROM {SCHEMA}.fct_invoice_lines WHERE org_id LIKE 'bench-%%'")
        cx.execute(f"DELETE FROM {SCHEMA}.fct_invoices WHERE org_id LIKE 'bench-%%'")
        with cx.cursor() as cur:
            cur.executemany(
                """INSERT INTO billing.organizations (org_id, name, email, plan, currency)
                   VALUES (%s, %s, %s, 'starter', 'usd') ON CONFLICT (org_id) DO NOTHING""",
                [r[:3] for r in inv_rows],
            )
            cur.executemany(
                f"""INSERT INTO {SCHEMA}.fct_invoices (invoice_id, org_id, period, period_start,
                       currency, base_fee_cents, usage_cents, total_cents, line_count, status,
                       catalog_version, snapshot_hash)
                    VALUES (%s, %s, '2031-01', '2031-01-01', 'usd', 4900, %s, %s, 7, 'final',
                            'bench', md5(%s))""",
                [(r[3], r[0], r[4] - 4900, r[4], f"{r[3]}:{r[4]}") for r in inv_rows],
            )
            cur.executemany(
                f"""INSERT INTO {SCHEMA}.fct_invoice_lines (invoice_line_id, invoice_id,
                       line_number, org_id, period_start, line_type, metric, pricing_mode,
                       quantity, amount_cents, currency, tiers, catalog_version)
                    VALUES (%s, %s, %s, %s, '2031-01-01', %s, %s, %s, %s, %s, 'usd', %s,
                            'bench')""",
                line_rows,
            )
    return ids


def prerender(ids: list[str]) -> None:
    """Render and store ``ids`` as the nightly ``render_invoice_pdfs`` does."""
    from billing.invoices import store as invoice_store

    store = invoice_store.PdfStore()
    for iid in ids:
        with invoice_store.snapshot_connection() as cx:
            etag = invoice_store.etag_for(invoice_store.lookup(cx, iid))
        invoice_store.render_and_store(invoice_store.snapshot_connection, store, iid, etag)


def start_server(workers: int, exits: ExitStack) -> tuple[str, str, int, Path]:
    """The real api-server with the billing plugin (stopped when ``exits`` closes)."""
    import httpx

    from billing_dev.stack.api_server import run_api_server

    home = STACK_DIR / "api-bench"
    home.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(12)
    pwfile = home / "passwords.json"
    pwfile.write_text(json.dumps({"admin": password}))
    env = {
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(pwfile),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "BILLING_API_BENCH": "1",
    }
    base, pid = exits.enter_context(run_api_server(home, env, workers=workers, timeout=120))
    r = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": password})
    r.raise_for_status()
    return base, r.json()["access_token"], pid, home / "api-server.log"


def renders_logged(log: Path) -> int:
    """PDFs the api-server rendered so far (one log line per render, any worker)."""
    return log.read_text(errors="replace").count("billing pdf rendered ")


def worker_rss_mb(pid: int) -> list[float]:
    """RSS of the api-server's worker processes (its children), in MB."""
    import psutil

    kids = psutil.Process(pid).children(recursive=True)
    return sorted(round(k.memory_info().rss / 2**20, 1) for k in kids)


async def phase(base, token, clients, seconds, next_request) -> dict:
    import httpx

    lat: list[float] = []
    codes: dict[int, int] = {}
    errors = 0
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=60) as c:

        async def worker():
            nonlocal errors
            while time.monotonic() < stop:
                req = next_request()
                if req is None:
                    return
                path, extra, expect = req
                t0 = time.perf_counter()
                try:
                    r = await c.get(path, headers=extra)
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                    if r.status_code != expect:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                lat.append(time.perf_counter() - t0)

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.monotonic() - t0
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [lat[0]] * 99
    return {
        "requests": len(lat),
        "rps": round(len(lat) / elapsed, 1),
        "p50_ms": round(q[49] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
        "errors": errors,
        "status": codes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="api-server worker processes")
    ap.add_argument("--invoices", type=int, default=1000)
    ap.add_argument("--keep-stack", action="store_true")
    args = ap.parse_args()

    os.environ["BILLING_LOCAL_DIR"] = str(STACK_DIR)
    store_dir = STACK_DIR / "pdf-store"
    os.environ["BILLING_PDF_STORE"] = store_dir.as_uri()
    from billing_dev.stack.manager import Stack

    stack = Stack(STACK_DIR)
    stack.up()
    os.environ.update(stack.env())
    ids = seed(args.invoices)
    shutil.rmtree(store_dir, ignore_errors=True)
    hot = ids[: args.clients * 4]
    prerender(hot)  # the nightly's work: warm and 304 phases never render
    cold = iter(ids[len(hot) :])
    exits = ExitStack()
    results: dict = {}
    try:
        base, token, pid, log = start_server(args.workers, exits)
        import httpx

        etags: dict[str, str] = {}
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as c:
            for iid in hot:
                etags[iid] = c.head(f"/billing/invoices/{iid}/pdf").headers["etag"]
        counter = iter(range(10**12))

        def ceiling_req():
            return ("/bench-ceiling/304", {}, 304)

        def cold_req():
            iid = next(cold, None)
            return None if iid is None else (f"/billing/invoices/{iid}/pdf", {}, 200)

        def warm_req():
            iid = hot[next(counter) % len(hot)]
            return (f"/billing/invoices/{iid}/pdf", {}, 200)

        def nm_req():
            iid = hot[next(counter) % len(hot)]
            return (f"/billing/invoices/{iid}/pdf", {"If-None-Match": etags[iid]}, 304)

        mix = iter(range(10**12))  # its own counter: warm_req/nm_req advance `counter`

        def mixed_req():
            k = next(mix) % 100
            return (cold_req() or warm_req()) if k == 0 else warm_req() if k < 10 else nm_req()

        rss_start = worker_rss_mb(pid)
        phases = {
            "ceiling_304": ceiling_req,
            "cold": cold_req,
            "warm_200": warm_req,
            "revalidate_304": nm_req,
            "mixed": mixed_req,
        }
        for name, req in phases.items():
            before = renders_logged(log)
            results[name] = asyncio.run(phase(base, token, args.clients, args.seconds, req))
            results[name]["renders"] = renders_logged(log) - before  # on the request path
            results[name]["worker_rss_mb_after"] = worker_rss_mb(pid)
        ceiling = results["ceiling_304"]["rps"]
        for name in phases:
            results[name]["ratio"] = round(results[name]["rps"] / ceiling, 2) if ceiling else None
        results["config"] = {
            "clients": args.clients,
            "seconds": args.seconds,
            "api_server_workers": args.workers,
            "pg_pool_size_per_worker": settings.api_pg_pool_size(),
            "invoices_seeded": len(ids),
            "prerendered": len(hot),
            "cpus": os.cpu_count(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            "worker_rss_mb_start": rss_start,
            "worker_rss_mb_end": worker_rss_mb(pid),
        }
    finally:
        exits.close()
        if not args.keep_stack:
            stack.down()
    print(json.dumps(results, indent=2))
    print(
        "\n| phase | req/s | p50 ms | p99 ms | errors | × ceiling | renders | worker RSS MB after |"
        "\n|---|---:|---:|---:|---:|---:|---:|---|"
    )
    for name in phases:
        r = results[name]
        rss = " / ".join(str(m) for m in r["worker_rss_mb_after"])
        print(
            f"| {name} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} "
            f"| {r['ratio']} | {r['renders']} | {rss} |"
        )


if __name__ == "__main__":
    main()
