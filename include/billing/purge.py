"""Retention purge: drop whole monthly partitions of raw usage once they are billed for good.

A month goes only when it is entirely older than the retention window (counted back from
the run's ``as_of`` date, never from the clock) AND ``billing.usage_period_purge_blocker``
says it was invoiced and reconciled. The exactly-once registry rows of a dropped partition's
events go with it (from then on ingest accepts no event in or before that month:
``billing.usage_registry_horizon``, migration 0050), and the quarantine rows and the ClickHouse
hourly rollups (the raw-level analytics) follow the same months. Dry-run is the default;
deleting needs ``confirm == "CONFIRM"``. Every run writes audit rows.
Runbook: docs/runbooks/retention-purge.md.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import asdict, dataclass, replace

from billing.platform import settings
from billing.platform.dates import day_of
from billing.platform.errors import ConfigError

log = logging.getLogger(__name__)

CONFIRM_WORD = "CONFIRM"
REGISTRY = "billing.usage_event_ids"
PARTITION_RE = re.compile(r"^usage_events_p(\d{4})(\d{2})$")


class PurgeRefused(ConfigError):
    """A real purge was asked for without the exact confirmation word."""


def cutoff(as_of: dt.date, days: int) -> dt.date:
    """Data strictly before this day is past retention; a window reaching back before the
    year 1 (``--older-than 1000000``, ``--as-of 0001-01-01``) is a user error, not a crash."""
    try:
        return as_of - dt.timedelta(days=days)
    except OverflowError:
        raise ConfigError(
            f"retention of {days} days before {as_of} reaches back before the year 1; "
            "use a later as-of day or fewer days"
        ) from None


def first_kept_month(as_of: dt.date, days: int) -> dt.date:
    """Months before this one are wholly past retention (a month straddling the cutoff stays)."""
    return cutoff(as_of, days).replace(day=1)


@dataclass(frozen=True)
class Item:
    target: str  # postgres_partition | registry | quarantine | clickhouse
    object: str
    period: dt.date
    eligible: bool
    reason: str
    rows: int | None = None
    bytes: int | None = None


def check_confirm(dry_run: bool, confirm: str | None) -> None:
    if not dry_run and confirm != CONFIRM_WORD:
        raise PurgeRefused(
            f"refusing to purge: confirm must be exactly {CONFIRM_WORD!r} "
            f"(got {confirm or ''!r}); nothing was deleted. Run a dry run first to see what would go"
        )


def check_as_of(as_of: dt.date, today: dt.date, dry_run: bool) -> None:
    """A real purge counts back from a day that has happened: a future ``as_of`` would drop
    months still in use and, through the registry, stop ingest accepting them."""
    if not dry_run and as_of > today:
        raise PurgeRefused(
            f"refusing to purge: as-of {as_of} is after today ({today}); nothing was deleted"
        )


def _partitions(cx) -> list[tuple[str, dt.date, int, int]]:
    rows = cx.execute(
        """SELECT c.relname, greatest(c.reltuples, 0)::bigint, pg_total_relation_size(c.oid)
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'billing.usage_events'::regclass
            ORDER BY c.relname"""
    ).fetchall()
    out = []
    for name, est_rows, size in rows:
        m = PARTITION_RE.match(name)
        if m:  # only partitions named by billing.ensure_usage_partition
            out.append((name, dt.date(int(m[1]), int(m[2]), 1), est_rows, size))
    return out


def _blocker(cx, period: dt.date) -> str | None:
    return cx.execute("SELECT billing.usage_period_purge_blocker(%s)", (period,)).fetchone()[0]


class _Verdicts:
    """Eligibility per period, asked of the database once per period."""

    def __init__(self, cx, keep_from: dt.date):
        self.cx, self.keep_from, self.cache = cx, keep_from, {}

    def __call__(self, period: dt.date) -> tuple[bool, str]:
        if period not in self.cache:
            if period >= self.keep_from:
                self.cache[period] = (False, f"within retention (keep from {self.keep_from})")
            else:
                blocker = _blocker(self.cx, period)
                self.cache[period] = (
                    (False, blocker) if blocker else (True, "past retention, invoiced, reconciled")
                )
        return self.cache[period]


def plan(cx, as_of: dt.date, days: int, clickhouse=None) -> list[Item]:
    """What a purge as of ``as_of`` would do, object by object; reads only."""
    keep_from = first_kept_month(as_of, days)
    verdict = _Verdicts(cx, keep_from)
    items: list[Item] = []
    registry: list[Item] = []
    for name, period, est_rows, size in _partitions(cx):
        ok, reason = verdict(period)
        items.append(
            Item("postgres_partition", f"billing.{name}", period, ok, reason, est_rows, size)
        )
        if period < keep_from:  # its exactly-once registry rows go with it (one per event)
            registry.append(Item("registry", REGISTRY, period, ok, reason, est_rows))
    items += registry
    for period, n in cx.execute(
        """SELECT date_trunc('month', arrival_day)::date, count(*) FROM billing.usage_quarantine
            WHERE arrival_day < %s GROUP BY 1 ORDER BY 1""",
        (keep_from,),
    ).fetchall():
        ok, reason = verdict(period)
        items.append(Item("quarantine", "billing.usage_quarantine", period, ok, reason, n))
    if clickhouse is not None:
        try:
            items += _clickhouse_items(keep_from, verdict, clickhouse)
        except Exception as exc:  # analytics must not block the Postgres purge; rerun later
            log.warning("ClickHouse hourly rollups skipped this run: %s", exc)
    return items


def _clickhouse_tables(ch) -> dict[str, str]:
    """Hourly rollup tables (raw-level analytics) -> their first DateTime column."""
    rows = ch.query(
        """SELECT t.database, t.name, c.name FROM system.tables t
             JOIN system.columns c ON c.database = t.database AND c.table = t.name
            WHERE t.database = currentDatabase() AND t.name ILIKE '%hourly%'
              AND t.engine NOT ILIKE '%View%' AND c.type ILIKE 'DateTime%'
            ORDER BY t.name, c.position"""
    ).result_rows
    out: dict[str, str] = {}
    for database, name, col in rows:
        out.setdefault(f"{database}.{name}", col)
    return out


def _clickhouse_items(keep_from: dt.date, verdict, ch) -> list[Item]:
    items = []
    for table, col in _clickhouse_tables(ch).items():
        months = ch.query(
            f"SELECT toStartOfMonth({col}) AS m, count() FROM {table} "
            f"WHERE {col} < toDateTime('{keep_from.isoformat()} 00:00:00', 'UTC') "
            "GROUP BY m ORDER BY m"
        ).result_rows
        for month, n in months:
            period = month if isinstance(month, dt.date) else dt.date.fromisoformat(str(month))
            ok, reason = verdict(period)
            items.append(Item("clickhouse", f"{table}:{col}", period, ok, reason, int(n)))
    return items


def _audit(cx, run_id, as_of, days, dry_run, actor, item: Item, action: str) -> None:
    cx.execute(
        """INSERT INTO billing.retention_purge_audit
               (run_id, as_of, retention_days, cutoff, dry_run, actor, target, object, period,
                action, reason, rows, bytes)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (run_id, dry_run, target, object) DO NOTHING""",
        (
            run_id,
            as_of,
            days,
            cutoff(as_of, days),
            dry_run,
            actor,
            item.target,
            f"{item.object}@{item.period:%Y-%m}"
            if item.target != "postgres_partition"
            else item.object,
            item.period,
            action,
            item.reason,
            item.rows,
            item.bytes,
        ),
    )


def _delete(cx, ch, item: Item) -> Item:
    """Delete what ``item`` names; the item with its exact row count where one is known."""
    if item.target == "postgres_partition":
        cx.execute(f"DROP TABLE IF EXISTS {item.object}")
    elif item.target == "registry":
        (n,) = cx.execute("SELECT billing.prune_usage_registry(%s)", (item.period,)).fetchone()
        return replace(item, rows=n)
    elif item.target == "quarantine":
        cx.execute(
            """DELETE FROM billing.usage_quarantine
                WHERE arrival_day >= %s AND arrival_day < (%s::date + interval '1 month')""",
            (item.period, item.period),
        )
    else:
        table, col = item.object.split(":")
        ch.command(
            f"ALTER TABLE {table} DELETE WHERE toStartOfMonth({col}) = "
            f"toDate('{item.period.isoformat()}')"
        )
    return item


def purge(
    cx,
    *,
    as_of: dt.date,
    days: int | None = None,
    dry_run: bool = True,
    confirm: str | None = None,
    run_id: str,
    actor: str,
    clickhouse=None,
) -> dict:
    """Run a purge (or a dry run) in one transaction; return a per-object report.

    ``clickhouse`` is a clickhouse_connect client, or None to leave ClickHouse alone.
    Retries are harmless: dropped partitions are gone, audit rows are keyed by run.
    """
    check_confirm(dry_run, confirm)
    days = days or settings.retention_days()
    cutoff(as_of, days)  # refuse an impossible window before touching anything
    report = []
    with cx.transaction():
        if not dry_run:  # waits for files loading now; new ones wait for this transaction
            cx.execute("SELECT billing.lock_usage_registry()")
        for item in plan(cx, as_of, days, clickhouse):
            action = "kept"
            if item.eligible:
                action = "would_drop" if dry_run else "dropped"
                if not dry_run:
                    item = _delete(cx, clickhouse, item)
            _audit(cx, run_id, as_of, days, dry_run, actor, item, action)
            report.append({**asdict(item), "period": item.period.isoformat(), "action": action})
    summary = {
        "run_id": run_id,
        "as_of": as_of.isoformat(),
        "retention_days": days,
        "cutoff": cutoff(as_of, days).isoformat(),
        "dry_run": dry_run,
        "items": report,
        "dropped": [r["object"] for r in report if r["action"] == "dropped"],
        "would_drop": [r["object"] for r in report if r["action"] == "would_drop"],
    }
    for r in report:
        log.info(
            "%s %s %s %s: %s (rows~%s)",
            "DRY-RUN" if dry_run else "PURGE",
            r["action"],
            r["object"],
            r["period"],
            r["reason"],
            r["rows"],
        )
    return summary


def format_report(summary: dict) -> str:
    head = (
        f"{'DRY RUN' if summary['dry_run'] else 'PURGE'} as of {summary['as_of']}: "
        f"retention {summary['retention_days']} days, cutoff {summary['cutoff']}"
    )
    lines = [head]
    for r in summary["items"]:
        lines.append(
            f"  {r['action']:<10} {r['target']:<18} {r['object']:<40} {r['period'][:7]}  "
            f"rows~{r['rows'] if r['rows'] is not None else '?'}  {r['reason']}"
        )
    if not summary["items"]:
        lines.append("  nothing past retention")
    return "\n".join(lines)


def run_task(params: dict, run_type: str, data_interval_end, run_id: str) -> dict:
    """The DAG task: scheduled runs are always dry runs; refusals fail without retrying."""
    from airflow.sdk.exceptions import AirflowFailException

    from billing.platform import analytics, db

    dry_run = bool(params.get("dry_run", True))
    if "manual" not in run_type.lower():
        dry_run = True
    as_of = day_of(data_interval_end)
    try:
        check_confirm(dry_run, params.get("confirm"))
    except PurgeRefused as exc:
        raise AirflowFailException(str(exc)) from None
    ch = _clickhouse_or_none(analytics)
    with db.connect(autocommit=True) as cx:
        summary = purge(
            cx,
            as_of=as_of,
            dry_run=dry_run,
            confirm=params.get("confirm"),
            run_id=run_id,
            actor=f"airflow:{run_type}",
            clickhouse=ch,
        )
    log.info("%s", format_report(summary))
    return summary


def _clickhouse_or_none(analytics):
    """The ClickHouse client, or None (logged) when the analytics store is not configured."""
    try:
        return analytics.client()
    except Exception as exc:
        log.warning("ClickHouse unavailable, hourly rollups left alone this run: %s", exc)
        return None
