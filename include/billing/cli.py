"""The ``billing`` command: a thin shell over the package for on-call, Finance and CI.

User mistakes (bad dates, missing files, taken ports) end in one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from decimal import Decimal
from pathlib import Path

from billing.platform.errors import BillingError

COMMAND_GROUP = "billing.commands"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + traceback
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _day(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value) if len(value) == 10 else _bad_day(value)
    except ValueError:
        return _bad_day(value)


def _bad_day(value: str):
    raise argparse.ArgumentTypeError(f"invalid day {value!r}: expected YYYY-MM-DD")


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _ratio(value: str) -> float:
    try:
        r = float(value)
    except ValueError:
        r = -1.0
    if not 0.0 <= r <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a ratio between 0 and 1, got {value!r}")
    return r


def _existing_file(value: str) -> Path:
    p = Path(value)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value}")
    return p


# ---------------------------------------------------------------- commands
def cmd_db_migrate(args) -> int:
    from billing.platform import db

    applied = db.migrate()
    print(f"{applied} migration(s) applied" if applied else "schema up to date")
    return 0


def cmd_orgs_import(args) -> int:
    from billing import orgs, pricing
    from billing.platform import db

    parsed = orgs.parse_csv(args.file, pricing.load_catalog())
    with db.transaction() as cx:
        n = orgs.upsert(cx, parsed, actor=_cli_actor())
    print(f"imported {n} organisation(s) from {args.file}")
    return 0


# ---------------------------------------------------------------- subscriptions
def _cli_actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name (a container's numeric uid)
        return f"cli:uid{os.getuid()}"


def _subscription_rows(subs) -> list[tuple]:
    return [
        (s.org_id, s.plan, s.as_json()["starts_at"], s.as_json()["ends_at"] or "open") for s in subs
    ]


def _print_changes(written: list[dict]) -> None:
    def show(iv):
        return "-" if iv is None else f"{iv['plan']} [{iv['starts_at']}, {iv['ends_at'] or 'open'})"

    for c in written:
        print(f"  {show(c['before'])} -> {show(c['after'])}")


def cmd_subscriptions(args) -> int:
    from billing import subscriptions as subs
    from billing.platform import db
    from billing.platform.tables import render

    c = args.subscriptions_command
    cols = ("org_id", "plan", "starts_at", "ends_at")
    if c in ("list", "history"):
        with db.connect() as cx:
            if c == "list":
                on = args.on or dt.datetime.now(dt.UTC).date()  # a shell command, not a task
                found = subs.list_in_force(cx, on, args.org)
                log = None
            else:
                found, log = subs.history(cx, args.org), subs.changes(cx, args.org)
        if args.format == "json":
            out = [s.as_json() for s in found]
            _print_json(out if log is None else {"intervals": out, "changes": log})
            return 0
        print(render(cols, _subscription_rows(found), empty="(no subscriptions)"))
        if log is not None:
            rows = [
                (
                    f"#{e['change_id']}",
                    e["changed_at"].strftime("%Y-%m-%d %H:%M:%S"),
                    e["changed_by"],
                    e["source"],
                    e["action"],
                    _interval_text(e["before"]),
                    _interval_text(e["after"]),
                    e["reason"] or "",
                )
                for e in log
            ]
            print()
            heads = ("change", "when (UTC)", "who", "source", "action", "before", "after", "reason")
            print(render(heads, rows, empty="(no changes)"))
        return 0
    actor = _cli_actor()
    with db.transaction() as cx:
        if c == "import":
            counts = subs.import_csv(cx, args.file, actor)
            print(
                f"{args.file}: {counts['inserted']} inserted, {counts['updated']} updated, "
                f"{counts['unchanged']} unchanged"
            )
            return 0
        if c == "change":
            written = subs.change_plan(
                cx, args.org, args.plan, args.effective, actor, "cli", args.reason
            )
            what = f"plan {args.plan!r} from {args.effective}"
        elif c == "start":
            written = subs.start(
                cx, args.org, args.plan, args.starts, args.ends, actor, "cli", args.reason
            )
            what = f"plan {args.plan!r} from {args.starts} to {args.ends or 'open'}"
        else:
            written = subs.cancel(cx, args.org, args.ends, actor, "cli", args.reason)
            what = f"no subscription from {args.ends}"
        since = getattr(args, {"change": "effective", "start": "starts"}.get(c, "ends"))
        closed = subs.closed_periods_since(cx, since) if written else []
    if not written:
        print(f"no change: org {args.org!r} already has {what}")
        return 0
    print(f"org {args.org!r}: {what} ({len(written)} change(s) logged as {actor})")
    _print_changes(written)
    if closed:
        print(subs.rerate_hint(args.org, closed))
    return 0


def _interval_text(iv) -> str:
    return "" if iv is None else f"{iv['plan']} [{iv['starts_at']}, {iv['ends_at'] or 'open'})"


def cmd_ingest_run(args) -> int:
    from billing import ingest
    from billing.platform.dates import arrival_interval

    summary = ingest.ingest_day(args.day, arrival_interval(args.day)[1])
    print(json.dumps(summary, indent=2) if args.format == "json" else ingest.format_report(summary))
    return 0


def cmd_ingest_report(args) -> int:
    from billing import ingest

    rep = ingest.report(args.day)
    print(json.dumps(rep, indent=2) if args.format == "json" else ingest.format_report(rep))
    return 0


def cmd_purge(args) -> int:
    import uuid

    from billing import purge
    from billing.platform import analytics, db

    dry_run = args.confirm is None
    purge.check_confirm(dry_run, args.confirm)
    today = dt.datetime.now(dt.UTC).date()  # a shell command, not a task
    as_of = args.as_of or today
    purge.check_as_of(as_of, today, dry_run)
    purge.cutoff(as_of, args.older_than)  # a window before the year 1: one line, exit 2
    with db.connect(autocommit=True) as cx:
        summary = purge.purge(
            cx,
            as_of=as_of,
            days=args.older_than,
            dry_run=dry_run,
            confirm=args.confirm,
            run_id=f"cli__{uuid.uuid4().hex[:12]}",
            actor=f"cli:{os.environ.get('USER', '?')}",
            clickhouse=None if args.skip_clickhouse else purge._clickhouse_or_none(analytics),
        )
    print(purge.format_report(summary))
    return 0


# ---------------------------------------------------------------- invoices / transform / sql
def _period_arg(value: str) -> str:
    import re

    from billing.platform.dates import PERIOD_PATTERN

    if not re.match(PERIOD_PATTERN, value):
        raise argparse.ArgumentTypeError(f"invalid period {value!r}: expected YYYY-MM")
    return value


def _print_invoices(summaries: list[dict], fmt: str) -> None:
    from billing.platform.tables import money, render

    if fmt == "json":
        print(json.dumps(summaries, indent=2))
        return
    rows = [
        (
            s["invoice_id"],
            s["org_id"],
            s["period"],
            s["status"],
            money(s["base_fee_cents"], s["currency"]),
            money(sum(x["amount_cents"] for x in s["lines"]), s["currency"]),
            money(s["total_cents"], s["currency"]),
        )
        for s in summaries
    ]
    cols = ("invoice_id", "org_id", "period", "status", "base fee", "usage", "total")
    print(render(cols, rows, right=cols[4:], empty="(no invoices)"))


def _print_invoice(inv) -> None:
    from billing.platform.tables import money, number, render

    print(f"{inv.invoice_id}  {inv.org_id}  {inv.period} ({inv.plan}, {inv.currency.upper()})")
    print(f"status {inv.status}, catalog {inv.catalog_version}, as of {inv.as_of_day}")
    print()
    rows = [
        (
            x.metric or "base fee",
            number(x.quantity) if x.line_type == "usage" else "",
            money(x.amount_cents, inv.currency),
        )
        for x in inv.lines
    ]
    rows.append(("total", "", money(inv.total_cents, inv.currency)))
    print(render(("line", "quantity", "amount"), rows, right=("quantity", "amount")))


def cmd_invoices_list(args) -> int:
    from billing import invoices
    from billing.platform import db

    with db.connect() as cx:
        found = invoices.list_invoices(cx, args.period, args.org)
    _print_invoices([invoices.summary(i) for i in found], args.format)
    return 0


def cmd_invoices_show(args) -> int:
    from billing import invoices
    from billing.platform import db
    from billing.platform.errors import ConfigError

    with db.connect() as cx:
        inv = invoices.get_invoice(cx, args.invoice_id)
    if inv is None:
        raise ConfigError(f"no invoice {args.invoice_id!r} in the snapshot")
    if args.format == "json":
        print(json.dumps(inv.to_dict(), indent=2))
    else:
        _print_invoice(inv)
    return 0


def cmd_transform(args) -> int:
    from billing import transform
    from billing.platform.errors import ConfigError

    if args.parse:
        for target in args.target or transform.TARGETS:
            print(transform.parse(target))
        return 0
    if args.day is None:
        raise ConfigError("transform needs --day YYYY-MM-DD (or --parse)")
    results = transform.transform_day(
        args.day,
        args.since,
        targets=args.target or transform.TARGETS,
        full_refresh=args.full_refresh,
    )
    for target, r in results.items():
        print(f"{target:<10} ok  {len(r.results)} node(s) in {r.seconds:.1f}s")
    return 0


def cmd_docs(args) -> int:
    from billing import transform

    if args.docs_command == "generate":
        for target in args.target or transform.TARGETS:
            print(f"{target:<10} {transform.docs_generate(target)}")
        return 0
    argv = transform.docs_serve_argv(args.target, args.port)
    env = {**os.environ, **transform.dbt_env(args.target)}
    print(f"dbt docs for {args.target}: http://127.0.0.1:{args.port}/  (Ctrl-C stops)", flush=True)
    os.execve(argv[0], argv, env)  # the server replaces us: stopping `billing docs serve` stops it


def cmd_sql(args) -> int:
    from billing.platform import analytics
    from billing.platform.tables import number, render

    result = analytics.read_only_query(args.query)
    if args.format == "json":
        # Decimals as exact strings without ClickHouse's scale padding ("150.5", not
        # "150.5000000000000000000"); ints stay JSON numbers.
        rows = [
            {
                c: number(v) if isinstance(v, Decimal) else v
                for c, v in zip(result.column_names, r, strict=True)
            }
            for r in result.result_rows
        ]
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(render(result.column_names, result.result_rows))
        n = len(result.result_rows)
        print(f"({n} row{'s' if n != 1 else ''})")
    return 0


# ---------------------------------------------------------------- stripe sync
def _month(value: str) -> dt.date:
    from billing.platform.dates import period_from

    if len(value) not in (7, 10):
        raise argparse.ArgumentTypeError(f"invalid period {value!r}: expected YYYY-MM")
    try:
        return period_from(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str, sort_keys=True))


def cmd_parked(args) -> int:
    from billing import stripe_sync

    if args.parked_command == "list":
        from billing.platform.tables import money, render

        parked = stripe_sync.list_parked()
        rows = [
            (
                p["idempotency_key"],
                p["kind"],
                "" if p.get("amount_cents") is None else money(p["amount_cents"], p["currency"]),
                f"{p['error_class']}: {p['last_error'][:80]}",
            )
            for p in parked
        ]
        print(render(("idempotency_key", "kind", "amount", "error"), rows, right=("amount",)))
        print(f"{len(parked)} parked write(s)")
    elif args.parked_command == "show":
        _print_json(stripe_sync.show_parked(args.key))
    else:
        result = stripe_sync.retry_parked(args.keys, all=args.all)
        _print_json(result)
        return 1 if result.get("parked") else 0
    return 0


def cmd_stripe(args) -> int:
    from billing import stripe_sync

    c = args.stripe_command
    if c == "read-only":
        if args.state in ("on", "off"):
            stripe_sync.set_read_only(args.state == "on", args.reason or "")
        info = stripe_sync.read_only()
        print(
            f"Stripe read-only: on since {info['since']} ({info.get('reason') or 'no reason'})"
            if info
            else "Stripe read-only: off (writes are sent)"
        )
        return 0
    if c == "drain":
        result = stripe_sync.drain()
    elif c == "push":
        result = stripe_sync.push_day(args.day)
    elif c == "close-period":
        result = stripe_sync.close_period(args.period)
    elif c == "sync-invoices":
        result = stripe_sync.sync_invoices()
    else:
        result = stripe_sync.counters()
    if isinstance(result, dict) and result.get("message"):
        print(result["message"], file=sys.stderr)
    _print_json(result)
    return 0


# ---------------------------------------------------------------- dunning
def cmd_dunning(args) -> int:
    from billing import dunning

    if args.dunning_command == "run":
        summary = dunning.run(
            args.as_of, dry_run=args.dry_run, actor=f"cli:{os.environ.get('USER', '?')}"
        )
        if args.format == "json":
            print(json.dumps(summary, indent=2, default=str))
        else:
            print(dunning.format_run(summary))
        if summary.get("failed"):
            print(
                f"billing: {summary['failed']} notice(s) failed; they are retried on the next run",
                file=sys.stderr,
            )
            return 1
        return 0
    as_of = args.as_of or dt.datetime.now(dt.UTC).date()  # a shell command, not a task
    found = dunning.status(args.org, as_of)
    if args.format == "json":
        print(json.dumps(found, indent=2, default=str))
    else:
        print(dunning.format_status(found))
    return 0


def cmd_reconcile(args) -> int:
    from billing import reconcile

    try:
        payload = reconcile.reconcile(args.period, args.org or None, args.idempotency_key)
    except reconcile.ReconcileMismatch as exc:
        if args.json:
            _print_json(exc.payload)
        raise
    if args.json:
        _print_json(payload)
    else:
        c = payload["counts"]
        print(
            f"reconcile {payload['period']}: {payload['status']}, {c['orgs']} org(s), "
            f"{c['discrepancies']} discrepancy(ies), max relative diff "
            f"{payload['max_relative_diff']} (key {payload['idempotency_key']})"
        )
    return 0


def cmd_incidents(args) -> int:
    from billing import reconcile
    from billing.platform.tables import render

    if args.incidents_command == "resolve":
        _print_json(reconcile.resolve_incident(args.incident_id, args.note))
        return 0
    found = reconcile.incidents(include_resolved=args.all)
    if args.format == "json":
        _print_json(found)
        return 0
    rows = [
        (
            f"#{i['incident_id']}",
            i["period"],
            i["status"],
            f"{i['max_rel_diff']}",
            i["created_at"].strftime("%Y-%m-%d %H:%M"),
            i["resolved_at"].strftime("%Y-%m-%d %H:%M") if i["resolved_at"] else "",
            i["summary"] if i["status"] == "open" else f"{i['summary']} | {i['resolution']}",
        )
        for i in found
    ]
    cols = ("incident", "period", "status", "max diff", "opened", "resolved", "summary")
    print(render(cols, rows, empty="(no incidents)"))
    still_open = sum(1 for i in found if i["status"] == "open")
    print(f"{still_open} open reconciliation incident(s)")
    return 0


# ---------------------------------------------------------------- prepaid credits
def _amount(value: str) -> str:
    try:
        ok = Decimal(value).is_finite()
    except ArithmeticError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"invalid amount {value!r}: expected a decimal like 50.00")
    return value


def cmd_credits(args) -> int:
    from billing import credits
    from billing.platform import db

    actor = f"cli:{os.environ.get('USER', '?')}"
    c = args.credits_command
    with db.transaction() as cx:
        if c == "grant":
            result = credits.grant(
                cx,
                args.org,
                args.amount,
                args.currency,
                reason=args.reason,
                actor=actor,
                valid_through=args.expires,
            )
        elif c == "void":
            result = credits.void(cx, args.grant_id, reason=args.reason, actor=actor)
        else:
            as_of = args.as_of or dt.datetime.now(dt.UTC).date()  # a shell command, not a task
            result = credits.statement(cx, args.org, as_of)
    if c == "list" and args.format == "table":
        print(credits.format_statement(result))
    elif c == "list":
        _print_json(result)
    else:
        print(credits.format_change(result))
    return 0


# ---------------------------------------------------------------- parser
def _period_strict(value: str) -> dt.date:
    from billing.platform.dates import parse_period

    try:
        return parse_period(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_rerate(args) -> int:
    from billing.platform.tables import render
    from billing.stripe_sync import corrections

    result = corrections.rerate(args.period, args.org, apply=args.apply)
    if args.format == "json":
        _print_json(result)
        return 0
    keys = ("org_id", "label", "currency", "billed_cents", "want_cents", "diff_cents")
    rows = [tuple(d[k] for k in keys) for d in result["diffs"] if d["diff_cents"]]
    print(f"rerate {result['period']}: billed vs re-rated, minor units (non-zero diffs)")
    cols = ("org", "label", "currency", "billed", "want", "diff")
    print(render(cols, rows, right=("billed", "want", "diff"), empty="(no difference)"))
    if result["corrections"]:
        verb = "enqueued" if args.apply else "would write (dry run; --apply to write)"
        print(f"corrections {verb}:")
        for c in result["corrections"]:
            note = "" if not args.apply or c["enqueued"] else " (already in the outbox)"
            print(f"  {c['org_id']} {c['label']}: {c['kind']} {c['amount_cents']}{note}")
    if "drain" in result:
        print(f"stripe: {result['drain'].get('status')} {result['drain']}")
    return 0


def build_parser(found: list | None = None) -> argparse.ArgumentParser:
    p = _Parser(
        prog="billing",
        description="Billing data platform: local stack, ingest, pricing, Stripe, dunning.",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    dbp = sub.add_parser("db", help="the billing database (PostgreSQL)")
    dbsub = dbp.add_subparsers(dest="db_command", required=True, parser_class=_Parser)
    dbsub.add_parser(
        "migrate", help="apply the billing schema migrations not applied yet (idempotent)"
    ).set_defaults(func=cmd_db_migrate)

    o = sub.add_parser("orgs", help="organisations")
    osub = o.add_subparsers(dest="orgs_command", required=True, parser_class=_Parser)
    oi = osub.add_parser(
        "import", help="upsert organisations from CSV (org_id,name,email,plan,currency)"
    )
    oi.add_argument("file", type=_existing_file)
    oi.set_defaults(func=cmd_orgs_import)

    sb = sub.add_parser(
        "subscriptions", help="plans over time: list, history, change, start, cancel"
    )
    sbsub = sb.add_subparsers(dest="subscriptions_command", required=True, parser_class=_Parser)
    sbl = sbsub.add_parser("list", help="the subscriptions in force on a day")
    sbl.add_argument("--org", default=None, help="only this org_id")
    sbl.add_argument("--on", type=_day, default=None, help="YYYY-MM-DD (default: today UTC)")
    sbl.add_argument("--format", choices=["table", "json"], default="table")
    sbh = sbsub.add_parser("history", help="an org's intervals and every change: who, when, why")
    sbh.add_argument("--org", required=True, help="org_id")
    sbh.add_argument("--format", choices=["table", "json"], default="table")
    sbc = sbsub.add_parser("change", help="move an org to another plan from a day on")
    sbc.add_argument("--org", required=True, help="org_id")
    sbc.add_argument("--plan", required=True, help="a catalog plan in the org's currency")
    sbc.add_argument("--effective", type=_day, required=True, help="first day on the plan")
    sbc.add_argument("--reason", default=None)
    sbs = sbsub.add_parser("start", help="a subscription for days the org has none")
    sbs.add_argument("--org", required=True, help="org_id")
    sbs.add_argument("--plan", required=True, help="a catalog plan in the org's currency")
    sbs.add_argument("--starts", type=_day, required=True, help="first day (YYYY-MM-DD)")
    sbs.add_argument("--ends", type=_day, default=None, help="first day without (default: open)")
    sbs.add_argument("--reason", default=None)
    sbx = sbsub.add_parser("cancel", help="end an org's subscription (later ones are removed)")
    sbx.add_argument("--org", required=True, help="org_id")
    sbx.add_argument("--ends", type=_day, required=True, help="first day without a plan")
    sbx.add_argument("--reason", default=None)
    sbi = sbsub.add_parser(
        "import", help="upsert intervals from CSV (org_id,plan,starts_at,ends_at)"
    )
    sbi.add_argument("file", type=_existing_file)
    for sp in (sbl, sbh, sbc, sbs, sbx, sbi):
        sp.set_defaults(func=cmd_subscriptions)

    ing = sub.add_parser("ingest", help="usage ingestion: load a day, report on it")
    ingsub = ing.add_subparsers(dest="ingest_command", required=True, parser_class=_Parser)
    ir = ingsub.add_parser(
        "run", help="load one arrival day's usage files (run end = next midnight UTC)"
    )
    ir.add_argument("--day", type=_day, required=True)
    ir.add_argument("--format", choices=["table", "json"], default="table")
    ir.set_defaults(func=cmd_ingest_run)
    irp = ingsub.add_parser("report", help="manifest and quarantine of one arrival day")
    irp.add_argument("--day", type=_day, required=True)
    irp.add_argument("--format", choices=["table", "json"], default="table")
    irp.set_defaults(func=cmd_ingest_report)

    inv = sub.add_parser("invoices", help="read the invoice snapshot (dbt, Postgres)")
    isub = inv.add_subparsers(dest="invoices_command", required=True, parser_class=_Parser)
    il = isub.add_parser("list", help="invoices of one period")
    il.add_argument("--period", type=_period_arg, required=True, help="YYYY-MM")
    il.add_argument("--org", help="only this org_id")
    il.add_argument("--format", choices=["table", "json"], default="table")
    il.set_defaults(func=cmd_invoices_list)
    ish = isub.add_parser("show", help="one invoice with its lines and tier breakdown")
    ish.add_argument("invoice_id")
    ish.add_argument("--format", choices=["table", "json"], default="table")
    ish.set_defaults(func=cmd_invoices_show)

    t = sub.add_parser(
        "transform", help="sync the catalog and run dbt (snapshot + rollups) for a day"
    )
    t.add_argument("--day", type=_day, help="run day (arrival day), YYYY-MM-DD (required)")
    t.add_argument("--since", type=_day, help="first arrival day of the window (default: --day)")
    t.add_argument(
        "--target",
        action="append",
        choices=["postgres", "clickhouse"],
        help="only this dbt target (repeatable; default: both)",
    )
    t.add_argument("--full-refresh", action="store_true", help="rebuild every model from scratch")
    t.add_argument(
        "--parse", action="store_true", help="only write the manifests Cosmos renders the DAG from"
    )
    t.set_defaults(func=cmd_transform)

    dc = sub.add_parser("docs", help="dbt docs per warehouse: generate, then serve one")
    dcsub = dc.add_subparsers(dest="docs_command", required=True, parser_class=_Parser)
    dg = dcsub.add_parser("generate", help="dbt docs generate into target/<target>/")
    dg.add_argument("--target", action="append", choices=["postgres", "clickhouse"])
    dg.set_defaults(func=cmd_docs)
    dv = dcsub.add_parser("serve", help="serve one target's docs on localhost")
    dv.add_argument("--target", choices=["postgres", "clickhouse"], default="postgres")
    dv.add_argument("--port", type=_positive, default=8580)
    dv.set_defaults(func=cmd_docs)

    q = sub.add_parser("sql", help="read-only query on the analytics store (ClickHouse)")
    q.add_argument("query")
    q.add_argument("--format", choices=["table", "json"], default="table")
    q.set_defaults(func=cmd_sql)

    pu = sub.add_parser(
        "purge", help="retention purge of old usage partitions (dry run unless --confirm CONFIRM)"
    )
    pu.add_argument("--older-than", type=_positive, required=True, metavar="DAYS")
    pu.add_argument("--as-of", type=_day, default=None, help="count back from this day (UTC)")
    pu.add_argument("--confirm", default=None, help="type CONFIRM to really delete")
    pu.add_argument("--skip-clickhouse", action="store_true", help="leave hourly rollups alone")
    pu.set_defaults(func=cmd_purge)

    pk = sub.add_parser("parked", help="Stripe writes parked after failed retries (Redis)")
    pksub = pk.add_subparsers(dest="parked_command", required=True, parser_class=_Parser)
    pksub.add_parser("list", help="list parked writes").set_defaults(func=cmd_parked)
    pks = pksub.add_parser("show", help="one parked write: Redis record and outbox row")
    pks.add_argument("key")
    pks.set_defaults(func=cmd_parked)
    pkr = pksub.add_parser("retry", help="re-send parked writes (adopts what Stripe already has)")
    pkr.add_argument("keys", nargs="*", metavar="KEY")
    pkr.add_argument("--all", action="store_true", help="retry every parked write")
    pkr.set_defaults(func=cmd_parked)

    st = sub.add_parser("stripe", help="Stripe sync: outage mode, drain, push, month end")
    stsub = st.add_subparsers(dest="stripe_command", required=True, parser_class=_Parser)
    sro = stsub.add_parser("read-only", help="outage mode: queue every Stripe write in the outbox")
    sro.add_argument("state", choices=["on", "off", "status"])
    sro.add_argument("--reason", default=None)
    sro.set_defaults(func=cmd_stripe)
    stsub.add_parser("drain", help="send queued writes in order").set_defaults(func=cmd_stripe)
    sp = stsub.add_parser("push", help="push one run day's overage items")
    sp.add_argument("--day", type=_day, required=True)
    sp.set_defaults(func=cmd_stripe)
    sc = stsub.add_parser("close-period", help="create and finalize the period's invoices")
    sc.add_argument("period", type=_month, metavar="YYYY-MM")
    sc.set_defaults(func=cmd_stripe)
    stsub.add_parser("sync-invoices", help="copy invoice status from Stripe").set_defaults(
        func=cmd_stripe
    )
    stsub.add_parser("counters", help="durable push counters").set_defaults(func=cmd_stripe)

    rc = sub.add_parser(
        "reconcile", help="compare the invoice snapshot with Stripe (fails above tolerance)"
    )
    rc.add_argument("--period", type=_period_arg, required=True, help="YYYY-MM")
    rc.add_argument("--org", action="append", metavar="ID", help="only this org_id (repeatable)")
    rc.add_argument("--idempotency-key", default=None, help="same key = same stored result")
    rc.add_argument("--json", action="store_true", help="print the payload as JSON")
    rc.set_defaults(func=cmd_reconcile)

    rr = sub.add_parser(
        "rerate", help="re-price a past period from its events; diff with Stripe; --apply corrects"
    )
    rr.add_argument("--period", type=_period_strict, required=True, help="YYYY-MM")
    rr.add_argument("--org", default=None, metavar="ID", help="only this org_id")
    rr.add_argument("--apply", action="store_true", help="write the corrections (default: dry run)")
    rr.add_argument("--format", choices=["table", "json"], default="table")
    rr.set_defaults(func=cmd_rerate)

    inc = sub.add_parser("incidents", help="reconciliation incidents (Engineering + Finance)")
    incsub = inc.add_subparsers(dest="incidents_command", required=True, parser_class=_Parser)
    incl = incsub.add_parser("list", help="open incidents (--all: with the resolved history)")
    incl.add_argument("--all", action="store_true", help="resolved incidents too, newest last")
    incl.add_argument("--format", choices=["table", "json"], default="table")
    incl.set_defaults(func=cmd_incidents)
    incr = incsub.add_parser("resolve", help="close an incident after the fix is reconciled")
    incr.add_argument("incident_id", type=_positive)
    incr.add_argument("--note", required=True, help="what was wrong and how it was fixed")
    incr.set_defaults(func=cmd_incidents)

    dn = sub.add_parser("dunning", help="staged notices for overdue invoices (docs/DUNNING.md)")
    dnsub = dn.add_subparsers(dest="dunning_command", required=True, parser_class=_Parser)
    dr = dnsub.add_parser("run", help="send the notices due as of a day (exactly once)")
    dr.add_argument("--as-of", type=_day, required=True, help="run day, YYYY-MM-DD (UTC)")
    dr.add_argument("--dry-run", action="store_true", help="show what would happen; change nothing")
    dr.add_argument("--format", choices=["table", "json"], default="table")
    dr.set_defaults(func=cmd_dunning)
    ds = dnsub.add_parser("status", help="service levels, notices and overdue invoices")
    ds.add_argument("--org", default=None, help="only this org_id")
    ds.add_argument("--as-of", type=_day, default=None, help="overdue as of (default: today UTC)")
    ds.add_argument("--format", choices=["table", "json"], default="table")
    ds.set_defaults(func=cmd_dunning)

    cr = sub.add_parser(
        "credits", help="prepaid credits: grant, list, void (docs/SUBSCRIPTIONS.md)"
    )
    crsub = cr.add_subparsers(dest="credits_command", required=True, parser_class=_Parser)
    crg = crsub.add_parser("grant", help="grant an org credit in its currency (major units)")
    crg.add_argument("--org", required=True, help="org_id")
    crg.add_argument("--amount", type=_amount, required=True, help="e.g. 50.00 (exact)")
    crg.add_argument("--currency", required=True, help="the org's currency, e.g. usd")
    crg.add_argument("--expires", type=_day, default=None, help="usable through YYYY-MM-DD (UTC)")
    crg.add_argument("--reason", required=True, help="printed on the invoice")
    crg.set_defaults(func=cmd_credits)
    crl = crsub.add_parser("list", help="an org's credit balance and every movement")
    crl.add_argument("--org", required=True, help="org_id")
    crl.add_argument("--as-of", type=_day, default=None, help="expiries as of (default: today UTC)")
    crl.add_argument("--format", choices=["table", "json"], default="table")
    crl.set_defaults(func=cmd_credits)
    crv = crsub.add_parser("void", help="void what a grant has not given yet")
    crv.add_argument("grant_id", type=_positive)
    crv.add_argument("--reason", required=True)
    crv.set_defaults(func=cmd_credits)
    for plugin in plugins() if found is None else found:
        plugin.register(sub)
    return p


def plugins() -> list:
    """The command plugins installed alongside (entry point group ``billing.commands``):
    modules with ``register(subparsers)`` and optionally ``before(args)``, the way Flask
    finds ``flask.commands``. The development package adds the local stack's commands."""
    from importlib.metadata import entry_points

    return [ep.load() for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name)]


def main(argv: list[str] | None = None) -> int:
    found = plugins()
    args = build_parser(found).parse_args(argv)
    for plugin in found:
        if hasattr(plugin, "before"):
            plugin.before(args)
    try:
        return args.func(args) or 0
    except BillingError as exc:
        print(f"billing: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
