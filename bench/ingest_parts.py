"""Benchmark: where ingest's CPU goes, piece by piece, on one clean file (default 500k events).

Times each piece of ingest alone, with ingest's own code and statements (``billing.ingest.usage_line``,
``billing.ingest.loader._STAGE`` / ``_REGISTER`` / ``_INSERT_EVENTS``), next to the raw COPY baseline
of ``bench/ingest.py``; then the registry insert of two files at once (two connections, as two
file workers do); then the two writes a design without a staging table would do instead (COPY
straight into ``usage_events`` and into the registry, rows pre-sorted by key). Everything is
rolled back. Needs ``billing stack up``. Numbers and reading: docs/PERFORMANCE.md ("Ingest").

    .venv/bin/python bench/ingest_parts.py [--events 500000]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "include")]

import ingest as ingest_bench  # noqa: E402  (bench/ingest.py: data writer, DAY, RUN_END)

from billing.ingest import loader as ing  # noqa: E402
from billing.ingest import usage_line  # noqa: E402
from billing.platform import db  # noqa: E402

EVENT_COLUMNS = (
    "event_id, org_id, metric, quantity, occurred_at, billable, source, properties, "
    "arrival_day, file_id, line_no"
)
REGISTRY_COLUMNS = "event_key, payload_hash, occurred_at, file_id, line_no"
BLOCK = 1 << 20


def _blocks(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        j = data.rfind(b"\n", i, i + BLOCK)
        out.append(data[i : j + 1])
        i = j + 1
    return out


def _timed(results: list, label: str, where: str, fn) -> object:
    t = time.perf_counter()
    value = fn()
    results.append((label, time.perf_counter() - t, where))
    return value


def _copy(cx, sql: str, chunks) -> None:
    with cx.cursor().copy(sql) as copy:
        for chunk in chunks:
            copy.write(chunk)


def _typer(cx) -> usage_line.Typer:
    """The Typer ingest builds for the bench's run (same bounds: ``ingest._params``)."""
    from billing.platform import settings

    ctx = ing._Context(
        day=ingest_bench.DAY,
        run_end=ingest_bench.RUN_END,
        metrics=list(ingest_bench.METRICS),
        lateness=ing.dt.timedelta(days=settings.lateness_days()),
        max_line=settings.max_line_bytes(),
    )
    p = ing._params(ctx)
    orgs = (r[0] for r in cx.execute("SELECT org_id FROM billing.organizations"))
    return usage_line.Typer.create(orgs, ctx.metrics, p["earliest"], p["latest"])


def _vacuum_registry() -> None:
    """Rolled-back inserts leave dead index entries; each phase starts from a clean index."""
    with db.connect(autocommit=True) as cx:
        cx.execute("SET statement_timeout = 0")
        cx.execute("VACUUM billing.usage_event_ids")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=500_000)
    args = ap.parse_args(argv)
    root = ingest_bench.prepare("bench-parts")
    paths, csv_path = ingest_bench.write_files(root, 2 * args.events, 2)
    results: list[tuple[str, float, str]] = []

    with db.connect(autocommit=True) as cx:
        cx.execute("SET statement_timeout = 0")
        ingest_bench.cleanup(cx)
        cx.execute("SELECT billing.ensure_usage_partition(%s)", (ingest_bench.DAY.replace(day=1),))
        typer = _typer(cx)

    # Python: the streaming pass's pieces on file 1 (file 2 is typed untimed, for the pair run)
    data = paths[0].read_bytes()
    blocks = _blocks(data)
    events = _timed(
        results,
        "msgspec decode",
        "Python",
        lambda: [usage_line._DECODER.decode_lines(b) for b in blocks],
    )
    _timed(
        results,
        "md5 registry keys (part of Typer.rows)",
        "Python",
        lambda: [hashlib.md5(e.event_id.encode()).hexdigest() for es in events for e in es],
    )
    rows = _timed(
        results,
        "Typer.rows: decode + typing + row text",
        "Python",
        lambda: [typer.rows(b)[0].encode() for b in blocks],
    )
    rows2 = [typer.rows(b)[0].encode() for b in _blocks(paths[1].read_bytes())]
    st = ing._Stream(lambda b: None, 65536, typer)
    _timed(
        results,
        "block checks (feed_lines minus typing)",
        "Python",
        lambda: [
            (b.isascii(), b.count(b"\n"), b.count(b"}\n"), b"NaN" in b, st._short_lines(b))
            for b in blocks
        ],
    )

    _vacuum_registry()
    # PostgreSQL, one connection: the baseline and ingest's three writes, rolled back
    csv_lines = csv_path.read_text().splitlines(keepends=True)[: args.events]
    with db.connect() as cx:
        cx.execute(
            "CREATE TABLE public.bench_parts_baseline (LIKE billing.usage_events INCLUDING DEFAULTS)"
        )
        cx.commit()
        try:
            csv_text = "".join(csv_lines).encode()
            _timed(
                results,
                "raw COPY baseline (CSV, plain logged table)",
                "PostgreSQL",
                lambda: _copy(
                    cx,
                    "COPY public.bench_parts_baseline FROM STDIN (FORMAT csv)",
                    [csv_text[i : i + BLOCK] for i in range(0, len(csv_text), BLOCK)],
                ),
            )
            cx.rollback()
            cx.execute("SET temp_buffers = '256MB'")
            cx.execute(ing._STAGE)
            _timed(
                results,
                "COPY typed rows into ingest_stage",
                "PostgreSQL",
                lambda: _copy(
                    cx, f"COPY ingest_stage ({usage_line.STAGE_COLUMNS}) FROM STDIN", rows
                ),
            )
            p = {"file_id": -1, "day": ingest_bench.DAY}
            _timed(
                results,
                "registry insert (alone)",
                "PostgreSQL",
                lambda: cx.execute(ing._REGISTER.format(where="", on_conflict=""), p),
            )
            _timed(
                results,
                "events insert from ingest_stage",
                "PostgreSQL",
                lambda: cx.execute(ing._INSERT_EVENTS.format(where=""), p),
            )
            cx.rollback()
            _vacuum_registry()

            # Without a staging table: what PostgreSQL would do instead (hash values are dummies)
            ev_rows, reg_rows = [], []
            for line_no, e in enumerate((e for es in events for e in es), 1):
                q = bytes(e.quantity).decode()
                ev_rows.append(
                    f"{e.event_id}\t{e.org_id}\t{e.metric}\t{q}\t{e.occurred_at}\t"
                    f"{'f' if e.billable is False else 't'}\t{e.source}\t\\N\t"
                    f"{ingest_bench.DAY}\t-1\t{line_no}\n"
                )
                key = hashlib.md5(e.event_id.encode()).hexdigest()
                reg_rows.append((key, f"{key}\t{line_no}\t{e.occurred_at}\t-1\t{line_no}\n"))
            reg_rows.sort()
            ev_text = "".join(ev_rows).encode()
            reg_text = "".join(r for _, r in reg_rows).encode()
            _timed(
                results,
                "no staging: COPY straight into usage_events",
                "PostgreSQL",
                lambda: _copy(
                    cx,
                    f"COPY billing.usage_events ({EVENT_COLUMNS}) FROM STDIN",
                    [ev_text[i : i + BLOCK] for i in range(0, len(ev_text), BLOCK)],
                ),
            )
            _timed(
                results,
                "no staging: COPY sorted rows into the registry",
                "PostgreSQL",
                lambda: _copy(
                    cx,
                    f"COPY billing.usage_event_ids ({REGISTRY_COLUMNS}) FROM STDIN",
                    [reg_text[i : i + BLOCK] for i in range(0, len(reg_text), BLOCK)],
                ),
            )
            cx.rollback()
        finally:
            cx.rollback()
            cx.execute("DROP TABLE IF EXISTS public.bench_parts_baseline")
            cx.commit()

    _vacuum_registry()

    # Two files at once on two connections, as two file workers: the registry inserts alone,
    # then ingest's whole PostgreSQL part (staging COPY, registry, events) with the typing
    # already done: what ingest could reach if typing cost nothing.
    def pair_run(label: str, whole: bool) -> list:
        timed: list = []
        barrier = threading.Barrier(2)

        def worker(file_rows, file_id):
            p = {"file_id": file_id, "day": ingest_bench.DAY}
            with db.connect() as cx:
                cx.execute("SET temp_buffers = '256MB'")
                cx.execute(ing._STAGE)
                stage = f"COPY ingest_stage ({usage_line.STAGE_COLUMNS}) FROM STDIN"
                if not whole:
                    _copy(cx, stage, file_rows)
                barrier.wait()

                def run():
                    if whole:
                        _copy(cx, stage, file_rows)
                    cx.execute(ing._REGISTER.format(where="", on_conflict=""), p)
                    if whole:
                        cx.execute(ing._INSERT_EVENTS.format(where=""), p)

                _timed(timed, f"{label} (file {-file_id})", "PostgreSQL", run)
                cx.rollback()

        _vacuum_registry()
        threads = [
            threading.Thread(target=worker, args=(r, -1 - i)) for i, r in enumerate((rows, rows2))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sorted(timed)

    results.extend(pair_run("registry insert, two files at once", whole=False))
    both = pair_run("staging + registry + events, two files at once", whole=True)
    results.extend(both)

    print(f"{args.events:,} clean events per file")
    print(f"{'piece':56} {'seconds':>8}  where")
    for label, seconds, where in results:
        print(f"{label:56} {seconds:8.2f}  {where}")
    baseline = next(sec for label, sec, _ in results if label.startswith("raw COPY"))
    wall = max(sec for _, sec, _ in both)
    eps = 2 * args.events / wall
    print(
        f"ceiling with typing free: {eps:,.0f} ev/s for two files at once, "
        f"ratio {eps / (args.events / baseline):.2f} of the raw COPY above"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
