"""Benchmark: wall time per simulated day and per event of ``billing simulate``.

Runs the simulation (no faults, no real-DAG day: the nightly steps as Python functions)
for a few days at each size and fits ``seconds/day = fixed + per_event * events`` by least
squares, to extrapolate sizes too slow for this box. Not a test; numbers go in
docs/PERFORMANCE.md ("Simulation").

    python bench/simulate.py [--sizes 10000 100000 300000] [--days 3] [--orgs 50]

Each size runs ``billing simulate`` in a child process on its own throwaway stack
(``.local/bench-simulate``), so one size never warms the next.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_size(events: int, days: int, orgs: int, seed: int) -> dict:
    billing = Path(sys.executable).parent / "billing"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [str(billing), "simulate", "--days", str(days), "--orgs", str(orgs)]
        cmd += ["--events-per-day", str(events), "--seed", str(seed), "--faults", "none"]
        cmd += ["--no-dag", "--stack-dir", str(ROOT / ".local" / "bench-simulate")]
        cmd += ["--report", str(out), "--json"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if not out.exists():
            raise SystemExit(f"simulate failed at {events}/day:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    ap.add_argument("--days", type=int, default=3)
    ap.add_argument("--orgs", type=int, default=50)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--extrapolate", type=int, nargs="*", default=[1_000_000])
    args = ap.parse_args()

    rows = []
    for n in args.sizes:
        rep = run_size(n, args.days, args.orgs, args.seed)
        t = rep["timing"]
        per_day = t["per_day_seconds"]
        steps = {k: v / args.days for k, v in t["steps_seconds"].items()}
        rows.append(
            {
                "events_per_day": n,
                "day_median_s": statistics.median(per_day),
                "day_mean_s": statistics.fmean(per_day),
                "per_event_us": 1e6 * statistics.fmean(per_day) / n,
                "steps_per_day_s": steps,
                "ok": rep["ok"],
                "failed": [k for k, v in rep["invariants"].items() if not v["ok"]],
            }
        )
        r = rows[-1]
        print(
            f"{n:>9,} events/day  {r['day_mean_s']:7.1f} s/day (median {r['day_median_s']:.1f})"
            f"  {r['per_event_us']:8.1f} us/event  invariants {'ok' if r['ok'] else r['failed']}",
            flush=True,
        )
        print(
            "           per day: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in sorted(steps.items(), key=lambda kv: -kv[1])),
            flush=True,
        )

    xs = [r["events_per_day"] for r in rows]
    ys = [r["day_mean_s"] for r in rows]
    if len(rows) >= 2:
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
            (x - mx) ** 2 for x in xs
        )
        fixed = my - slope * mx
        print(f"\nfit: seconds/day = {fixed:.1f} + {slope * 1e6:.2f} us x events")
        for n in args.extrapolate:
            print(f"extrapolated {n:,} events/day: {fixed + slope * n:.0f} s/day (not measured)")
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
