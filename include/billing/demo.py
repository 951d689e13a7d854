"""``billing demo``: the whole pipeline on the embedded stack, with a short human summary."""

from __future__ import annotations

import datetime as dt

from billing import settings


def run(day: dt.date, orgs: int = 8, events: int = 20_000, seed: int = 42) -> int:
    from billing import db, pricing, runner, usage_gen
    from billing import orgs as orgs_mod
    from billing.stack.manager import activate, current

    stack = current()
    print("1/4 starting the local stack ...", flush=True)
    stack.up()
    activate()
    catalog = pricing.load_catalog()

    print(f"2/4 importing {orgs} demo organisations ...", flush=True)
    csv_path = orgs_mod.write_csv(
        stack.root / "demo" / "orgs.csv", usage_gen.demo_orgs(orgs, catalog)
    )
    with db.transaction() as cx:
        orgs_mod.upsert(cx, orgs_mod.parse_csv(csv_path, catalog))

    print(
        f"3/4 writing {events} usage events for {day} (with duplicates and bad lines) ...",
        flush=True,
    )
    spec = usage_gen.UsageSpec(
        day, orgs, events, seed, bad_ratio=0.01, dup_ratio=0.01, late_ratio=0.02
    )
    usage_gen.write_day(spec, sorted(catalog.metrics), settings.landing_uri(), files=2)

    print(f"4/4 running billing_nightly for {day} ...", flush=True)
    runner.run_day(day, quiet=True)
    print()
    print(summary(day))
    return 0


def summary(day: dt.date) -> str:
    from billing import ingest

    rep = ingest.report(day)
    total = rep["total"]
    lines = [
        f"Billing run for {day}: done.",
        f"  usage files       {len(rep['files'])}",
        f"  events accepted   {total['accepted']}",
        f"  duplicates        {total['duplicate']}",
        f"  non-billable      {total['non_billable']}",
        f"  quarantined       {sum(total['quarantined'].values())} "
        + "("
        + ", ".join(f"{k}={v}" for k, v in sorted(total["quarantined"].items()))
        + ")",
        f"  landing zone      {settings.landing_uri()}",
        f"  mail (sink)       {settings.mail_dir()}",
        "  details           billing ingest report --day " + day.isoformat(),
    ]
    return "\n".join(lines)
