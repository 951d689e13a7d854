"""Benchmark: usage ingest end to end vs raw COPY of the same rows (the physical limit).

    .venv/bin/python bench/ingest.py [--events N] [--files F] [--workers W]

Uses the running dev stack (``billing stack up``). Writes synthetic files for a dedicated
arrival day under ``.local/bench/``, times ``billing.ingest.loader.ingest_day`` on them, then times a
single-stream ``COPY`` of the same rows pre-flattened to CSV into a plain (logged) table with
the same columns. Its own rows are removed afterwards (``--keep`` to keep them).
Peak memory: the ingest process's max RSS plus, for each file worker it forks, the largest
worker's max RSS (an upper bound: pages shared after the fork are counted in every process).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

DAY = dt.date(2031, 1, 15)  # far from real data: its own month partition, dropped afterwards
RUN_END = dt.datetime(2031, 1, 16, tzinfo=dt.UTC)
ORGS = 200
METRICS = ("api_calls", "storage_gb", "compute_minutes", "emails_sent")
SOURCES = ("api-gateway", "storage-svc", "scheduler", "mailer")


def write_files(
    root: Path, events: int, files: int, dirty_every: int = 0, properties: bool = False
) -> tuple[list[Path], Path]:
    """Fast deterministic writer (~1M lines/s): JSONL files and the same rows as one CSV.

    ``dirty_every`` N > 0: every Nth line repeats the previous line (a duplicate) and the line
    after it is cut short (malformed JSON), so the files take ingest's safe path.
    ``properties``: every event carries a small ``properties`` object (SQL types such lines)."""
    day_dir = root / "landing" / "usage" / f"dt={DAY.isoformat()}"
    shutil.rmtree(root / "landing", ignore_errors=True)
    day_dir.mkdir(parents=True)
    csv_path = root / "flat.csv"
    start = int(dt.datetime.combine(DAY, dt.time(), tzinfo=dt.UTC).timestamp())
    ns = uuid.UUID(int=2031)
    paths = []
    per = -(-events // files)
    with open(csv_path, "w") as csv:
        for f in range(files):
            p = day_dir / f"part-{f:04d}.jsonl"
            paths.append(p)
            lines, rows = [], []
            with open(p, "w") as out:
                for i in range(f * per, min(events, (f + 1) * per)):
                    eid = str(uuid.UUID(int=(ns.int + i * 0x9E3779B97F4A7C15) % (1 << 128)))
                    m = i % 4
                    org = f"org-{(i * 7919) % ORGS + 1:04d}"
                    q = f"{(i % 5000) / 100:.2f}" if m == 1 else str(i % 400 + 1)
                    ts = dt.datetime.fromtimestamp(start + (i * 37) % 86_400, dt.UTC).strftime(
                        "%Y-%m-%dT%H:%M:%SZ"
                    )
                    billable = "false" if i % 33 == 0 else "true"
                    props = f'{{"region": "eu-{i % 3}", "tier": {i % 5}}}' if properties else ""
                    lines.append(
                        f'{{"event_id":"{eid}","org_id":"{org}","metric":"{METRICS[m]}","quantity":{q},'
                        f'"occurred_at":"{ts}","billable":{billable},"source":"{SOURCES[m]}"'
                        + (f',"properties":{props}}}\n' if properties else "}\n")
                    )
                    csv_props = '"' + props.replace('"', '""') + '"' if properties else ""
                    rows.append(
                        f"{eid},{org},{METRICS[m]},{q},{ts},{billable},{SOURCES[m]},{csv_props},"
                        f"{DAY},0,{i},{ts}\n"
                    )
                    if dirty_every and i % dirty_every == 0 and len(lines) > 1:
                        lines[-1] = lines[-2]  # a duplicate of the previous line
                        rows.pop()
                    elif dirty_every and i % dirty_every == 1:
                        lines[-1] = lines[-1][:40] + "}\n"  # malformed JSON, ends in }
                        rows.pop()
                    if len(lines) >= 50_000:
                        out.writelines(lines)
                        csv.writelines(rows)
                        lines, rows = [], []
                out.writelines(lines)
                csv.writelines(rows)
    return paths, csv_path


def _ingest_child(landing: str, workers: int, q) -> None:
    # What an Airflow task has loaded before the step runs is not the step's cost: the SDK,
    # and the plugins (read through ObjectStoragePath, a file's first read loads them for
    # hook lineage, about 1 s here, once per process).
    from airflow.sdk.lineage import get_hook_lineage_collector

    from billing import ingest, observability, pricing  # noqa: F401

    get_hook_lineage_collector()

    t = time.perf_counter()
    summary = ingest.ingest_day(DAY, RUN_END, landing_uri=landing, workers_=workers)
    seconds = time.perf_counter() - t
    q.put(
        {
            "seconds": seconds,
            "summary": summary,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            # forked file workers: the largest one's peak (they are joined by now)
            "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        }
    )


def prepare(name: str) -> Path:
    """The running dev stack, its schema and the bench's orgs; the bench's scratch folder."""
    from billing import orgs, pricing
    from billing.platform import db, settings
    from billing_dev import usage_gen
    from billing_dev.stack.manager import activate

    activate()
    db.migrate()
    with db.transaction() as cx:
        orgs.upsert(cx, usage_gen.demo_orgs(ORGS, pricing.load_catalog()))
    return settings.local_dir() / name


def cleanup(cx) -> None:
    cx.execute("DROP TABLE IF EXISTS billing.usage_events_p203101")
    cx.execute("DROP TABLE IF EXISTS public.bench_copy_baseline")
    ids = [
        r[0]
        for r in cx.execute(
            "SELECT file_id FROM billing.usage_files WHERE arrival_day = %s", (DAY,)
        )
    ]
    if ids:
        cx.execute("DELETE FROM billing.usage_event_ids WHERE file_id = ANY(%s)", (ids,))
        cx.execute("DELETE FROM billing.usage_quarantine WHERE file_id = ANY(%s)", (ids,))
        cx.execute("DELETE FROM billing.usage_files WHERE file_id = ANY(%s)", (ids,))
        # run after run on the same registry: reclaim the deleted rows, or each run inserts
        # into a more bloated index than the last (a production registry only grows)
        cx.execute("VACUUM billing.usage_event_ids")


def raw_copy(cx, csv_path: Path) -> float:
    cx.execute(
        "CREATE TABLE public.bench_copy_baseline (LIKE billing.usage_events INCLUDING DEFAULTS)"
    )
    cx.execute("CHECKPOINT")
    t = time.perf_counter()
    with (
        cx.cursor().copy("COPY public.bench_copy_baseline FROM STDIN (FORMAT csv)") as copy,
        open(csv_path, "rb") as fh,
    ):
        while block := fh.read(1 << 20):
            copy.write(block)
    return time.perf_counter() - t


def psql_copy(csv_path: Path) -> float | None:
    """The issue's own baseline: ``psql \\copy`` of the CSV (None without a psql on PATH)."""
    psql = shutil.which("psql")
    if psql is None:
        return None
    from billing.platform import connections as conns
    from billing.platform import db

    c = conns.get(conns.POSTGRES)
    env = {
        **os.environ,
        "PGHOST": c.host or "",
        "PGPORT": str(c.port or 5432),
        "PGUSER": c.login or "",
        "PGPASSWORD": c.password or "",  # environment, not the command line
        "PGDATABASE": c.schema or "",
    }
    with db.connect(autocommit=True) as cx:
        cx.execute("DROP TABLE IF EXISTS public.bench_copy_psql")
        cx.execute(
            "CREATE TABLE public.bench_copy_psql (LIKE billing.usage_events INCLUDING DEFAULTS)"
        )
        cx.execute("CHECKPOINT")
    t = time.perf_counter()
    subprocess.run(
        [
            psql,
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            f"\\copy public.bench_copy_psql FROM '{csv_path}' WITH (FORMAT csv)",
        ],
        env=env,
        check=True,
    )
    seconds = time.perf_counter() - t
    with db.connect(autocommit=True) as cx:
        cx.execute("DROP TABLE public.bench_copy_psql")
    return seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--events", type=int, action="append", help="events (repeatable; default 1M and 5M)"
    )
    ap.add_argument(
        "--files", type=int, default=0, help="files per run (default: one per 500k events)"
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument(
        "--dirty-every",
        type=int,
        default=0,
        metavar="N",
        help="make every Nth line a duplicate and the next one malformed (default: clean files)",
    )
    ap.add_argument(
        "--properties", action="store_true", help="every event carries a properties object"
    )
    args = ap.parse_args(argv)

    from billing.platform import db

    root = prepare("bench")
    results = []
    for n in args.events or [1_000_000, 5_000_000]:
        files = args.files or max(1, n // 500_000)
        with db.connect(autocommit=True) as cx:
            cx.execute("SET statement_timeout = 0")
            cleanup(cx)
            t = time.perf_counter()
            paths, csv_path = write_files(root, n, files, args.dirty_every, args.properties)
            print(
                f"# {n:,} events in {files} file(s): written in {time.perf_counter() - t:.1f}s "
                f"({sum(p.stat().st_size for p in paths) / 1e6:.0f} MB)",
                flush=True,
            )
            cx.execute("CHECKPOINT")
        q = mp.get_context("spawn").Queue()
        child = mp.get_context("spawn").Process(
            target=_ingest_child, args=((root / "landing").as_uri(), args.workers, q)
        )
        child.start()
        res = q.get()
        child.join()
        tot = res["summary"]["total"]
        with open(csv_path, "rb") as fh:
            loaded = sum(1 for _ in fh)  # the rows a correct ingest stores
        assert tot["accepted"] + tot["non_billable"] == loaded, (tot, loaded)
        with db.connect(autocommit=True) as cx:
            cx.execute("SET statement_timeout = 0")
            copy_s = raw_copy(cx, csv_path)
            if not args.keep:
                cleanup(cx)
        psql_s = psql_copy(csv_path)
        row = {
            "events": n,
            "dirty_every": args.dirty_every,
            "properties": args.properties,
            "modes": sorted({f.get("mode") for f in res["summary"]["files"]}),
            "files": files,
            "workers": args.workers,
            "ingest_s": round(res["seconds"], 2),
            "ingest_eps": round(n / res["seconds"]),
            "raw_copy_s": round(copy_s, 2),
            "raw_copy_eps": round(loaded / copy_s),
            "psql_copy_s": psql_s and round(psql_s, 2),
            "psql_copy_eps": psql_s and round(loaded / psql_s),
            # against the faster baseline: the stricter physical limit
            "ratio": round((n / res["seconds"]) / (loaded / min(copy_s, psql_s or copy_s)), 2),
            # upper bound: parent + every worker at its peak (forked pages are shared, and
            # counted once per process here)
            "peak_mb": round(res["peak_mb"] + args.workers * res["worker_peak_mb"]),
            "parent_peak_mb": round(res["peak_mb"]),
            "worker_peak_mb": round(res["worker_peak_mb"]),
            "loadavg_1m": round(os.getloadavg()[0], 2),  # the box may be shared: compare ratios
            "file_timings": [f.get("timings") for f in res["summary"]["files"]][:3],
        }
        results.append(row)
        psql_text = (
            f"psql \\copy {row['psql_copy_eps']:,} rows/s ({row['psql_copy_s']}s)  "
            if psql_s
            else ""
        )
        print(
            f"events={n:,}  ingest {row['ingest_eps']:,} ev/s ({row['ingest_s']}s)  "
            f"raw COPY {row['raw_copy_eps']:,} rows/s ({row['raw_copy_s']}s)  {psql_text}"
            f"ratio {row['ratio']}  path {'+'.join(row['modes'])}  peak {row['peak_mb']} MB  "
            f"load {row['loadavg_1m']}",
            flush=True,
        )
        print(json.dumps(row), flush=True)
        (root / "landing").exists() and shutil.rmtree(root / "landing")
        csv_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
