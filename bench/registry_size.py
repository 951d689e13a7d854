"""Benchmark: ingest's registry insert against a growing exactly-once registry.

Why the retention purge deletes registry rows (migration 0050, docs/USAGE_EVENTS.md): the
registry's primary key is random (``md5(event_id)``), so every file's insert touches leaf pages
across the whole index; once the index outgrows ``shared_buffers`` the same insert costs more.
This times ingest's own registry insert (``ingest._REGISTER``, key order, plain) of one clean
file (default 500k events, typed by ``billing.ingest.usage_line`` as ingest does) against registries
pre-filled with synthetic rows, three runs per size, each rolled back. The synthetic rows
(``file_id = -2``) are deleted at the end and the registry is rewritten (``VACUUM FULL``), so
run it on a dev stack, not while ingest runs. Needs ``billing stack up``.

    .venv/bin/python bench/registry_size.py [--events 500000] [--rows 0 5000000 20000000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "include")]

import ingest as ingest_bench  # noqa: E402  (bench/ingest.py: data writer, DAY)
import ingest_parts as parts  # noqa: E402  (the Typer and helpers ingest_parts times)

from billing.ingest import loader as ing  # noqa: E402
from billing.ingest import usage_line  # noqa: E402
from billing.platform import db  # noqa: E402

SYNTHETIC = -2  # file_id of the filler rows
_FILL = """
INSERT INTO billing.usage_event_ids (event_key, payload_hash, occurred_at, file_id, line_no)
SELECT md5('registry-bench-' || g)::uuid, g, '2030-06-01'::timestamptz + g * interval '1 second',
       %(file_id)s, g
  FROM generate_series(%(lo)s, %(hi)s) g
"""


def _fill(total: int) -> tuple[str, str]:
    """Top the synthetic rows up to ``total``; the index and heap sizes."""
    with db.connect(autocommit=True) as cx:
        cx.execute("SET statement_timeout = 0")
        (have,) = cx.execute(
            "SELECT count(*) FROM billing.usage_event_ids WHERE file_id = %s", (SYNTHETIC,)
        ).fetchone()
        while have < total:
            n = min(5_000_000, total - have)
            cx.execute(_FILL, {"file_id": SYNTHETIC, "lo": have + 1, "hi": have + n})
            have += n
        cx.execute("VACUUM ANALYZE billing.usage_event_ids")
        return cx.execute(
            """SELECT pg_size_pretty(pg_relation_size('billing.usage_event_ids_pkey')),
                      pg_size_pretty(pg_relation_size('billing.usage_event_ids'))"""
        ).fetchone()


def _insert_times(rows: list[bytes], runs: int = 3) -> list[float]:
    out = []
    p = {"file_id": -1, "day": ingest_bench.DAY}
    for _ in range(runs):
        with db.connect() as cx:
            cx.execute("SET statement_timeout = 0")
            cx.execute("SET temp_buffers = '256MB'")
            cx.execute("SET work_mem = '256MB'")
            cx.execute(ing._STAGE)
            parts._copy(cx, f"COPY ingest_stage ({usage_line.STAGE_COLUMNS}) FROM STDIN", rows)
            t = time.perf_counter()
            cx.execute(ing._REGISTER.format(where="", on_conflict=""), p)
            out.append(time.perf_counter() - t)
            cx.rollback()
        parts._vacuum_registry()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--rows", type=int, nargs="+", default=[0, 5_000_000, 20_000_000])
    args = ap.parse_args(argv)
    root = ingest_bench.prepare("bench-registry")
    (path,), _ = ingest_bench.write_files(root, args.events, 1)
    with db.connect(autocommit=True) as cx:
        cx.execute("SET statement_timeout = 0")
        ingest_bench.cleanup(cx)
        typer = parts._typer(cx)
    rows = [typer.rows(b)[0].encode() for b in parts._blocks(path.read_bytes())]

    print(f"registry insert of {args.events:,} events (ingest._REGISTER, plain, key order)")
    print(f"{'registry rows':>14}  {'index':>8}  {'heap':>8}  seconds (3 runs)    ratio")
    first = None
    try:
        for total in sorted(args.rows):
            index, heap = _fill(total)
            times = _insert_times(rows)
            best = min(times)
            first = first or best
            runs = " ".join(f"{t:.2f}" for t in times)
            print(f"{total:>14,}  {index:>8}  {heap:>8}  {runs:<18}  {best / first:.2f}x")
    finally:
        with db.connect(autocommit=True) as cx:
            cx.execute("SET statement_timeout = 0")
            cx.execute("DELETE FROM billing.usage_event_ids WHERE file_id = %s", (SYNTHETIC,))
            cx.execute("VACUUM FULL billing.usage_event_ids")  # shrink the index back
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
