"""Subscriptions over time: which plan an org is on, day by day (docs/SUBSCRIPTIONS.md).

An org's plans are non-overlapping intervals [starts, ends) of whole UTC days in
``billing.subscriptions`` (starts None: since always; ends None: open). Every function here
works in the caller's transaction, locks the org's row first (so two edits of one org
serialise), validates against the pricing catalog and writes one
``billing.subscription_changes`` row per interval it inserts, changes or deletes, with who
(``actor``), through what (``source``) and why (``reason``). A request the data already
satisfies writes nothing, so a re-run (a cleared Airflow task, a re-imported file) is harmless.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from billing.orgs import ORG_ID_PATTERN
from billing.platform import csvfile
from billing.platform.errors import ConfigError

SOURCES = ("cli", "airflow", "csv")
ACTIONS = ("change", "start", "cancel")
CSV_COLUMNS = ("org_id", "plan", "starts_at", "ends_at")
_ORG_ID = re.compile(ORG_ID_PATTERN)
_SINCE_ALWAYS = "-infinity"
_LO, _HI = dt.date.min, dt.date.max
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subscription:
    subscription_id: int
    org_id: str
    plan: str
    starts: dt.date | None  # None: since always
    ends: dt.date | None  # None: open
    created_by: str = ""
    created_at: dt.datetime | None = None

    def covers(self, day: dt.date) -> bool:
        return _lo(self.starts) <= day < _hi(self.ends)

    def span(self) -> str:
        return _span(self.starts, self.ends)

    def as_json(self) -> dict:
        return {
            "subscription_id": self.subscription_id,
            "org_id": self.org_id,
            "plan": self.plan,
            "starts_at": _day_json(self.starts, _SINCE_ALWAYS),
            "ends_at": _day_json(self.ends, None),
            "created_by": self.created_by,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }


# An interval as the functions below plan it: (starts, ends, plan).
_Interval = tuple[dt.date | None, dt.date | None, str]


def _lo(d: dt.date | None) -> dt.date:
    return _LO if d is None else d


def _hi(d: dt.date | None) -> dt.date:
    return _HI if d is None else d


def _day_json(d: dt.date | None, none):
    return none if d is None else d.isoformat()


def _span(starts, ends) -> str:
    return f"[{_day_json(starts, _SINCE_ALWAYS)}, {_day_json(ends, 'open')})"


def _overlap(a_starts, a_ends, b_starts, b_ends) -> bool:
    return _lo(a_starts) < _hi(b_ends) and _lo(b_starts) < _hi(a_ends)


def _interval_json(iv: _Interval | None):
    if iv is None:
        return None
    return {
        "plan": iv[2],
        "starts_at": _day_json(iv[0], _SINCE_ALWAYS),
        "ends_at": _day_json(iv[1], None),
    }


def _ts(d: dt.date | None, none):
    """A UTC day as the timestamptz it is stored as (midnight UTC)."""
    return none if d is None else dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC)


_SELECT = """SELECT subscription_id, org_id, plan,
                    CASE WHEN starts_at = '-infinity' THEN NULL
                         ELSE (starts_at AT TIME ZONE 'UTC')::date END,
                    (ends_at AT TIME ZONE 'UTC')::date, created_by, created_at
               FROM billing.subscriptions"""


# ---------------------------------------------------------------- reads
def history(cx, org_id: str) -> list[Subscription]:
    """The org's intervals, oldest first."""
    _org_currency(cx, org_id, lock=False)
    return _intervals(cx, org_id)


def changes(cx, org_id: str) -> list[dict]:
    """The org's change log (``billing.subscription_changes``), oldest first."""
    _org_currency(cx, org_id, lock=False)
    rows = cx.execute(
        """SELECT change_id, action, before, after, changed_by, source, reason, changed_at
             FROM billing.subscription_changes WHERE org_id = %s ORDER BY change_id""",
        (org_id,),
    ).fetchall()
    keys = ("change_id", "action", "before", "after", "changed_by", "source", "reason")
    return [{**dict(zip(keys, r[:7], strict=True)), "changed_at": r[7]} for r in rows]


def list_in_force(cx, on: dt.date, org_id: str | None = None) -> list[Subscription]:
    """The subscriptions in force on the UTC day ``on`` (of one org or of all), by org."""
    rows = cx.execute(
        _SELECT
        + """ WHERE starts_at <= %(on)s AND (ends_at IS NULL OR ends_at > %(on)s)
                        AND (%(org)s::text IS NULL OR org_id = %(org)s)
                      ORDER BY org_id""",
        {"on": _ts(on, None), "org": org_id},
    ).fetchall()
    return [Subscription(*r) for r in rows]


def closed_periods_since(cx, day: dt.date) -> list[str]:
    """The closed (invoiced) periods, YYYY-MM, that contain ``day`` or come after it: an edit
    from ``day`` on changes what they should have billed; ``billing rerate`` corrects them."""
    rows = cx.execute(
        """SELECT to_char(period, 'YYYY-MM') FROM billing.period_closes
            WHERE period + interval '1 month' > %s ORDER BY period""",
        (day,),
    ).fetchall()
    return [r[0] for r in rows]


def rerate_hint(org_id: str, periods: list[str]) -> str:
    return (
        f"note: closed period(s) {', '.join(periods)} already invoiced; "
        f"'billing rerate --period YYYY-MM --org {org_id} --apply' corrects each"
    )


def _intervals(cx, org_id: str) -> list[Subscription]:
    rows = cx.execute(_SELECT + " WHERE org_id = %s ORDER BY starts_at", (org_id,)).fetchall()
    return [Subscription(*r) for r in rows]


# ---------------------------------------------------------------- validation
def _org_currency(cx, org_id: str, lock: bool = True) -> str:
    row = cx.execute(
        "SELECT currency FROM billing.organizations WHERE org_id = %s"
        + (" FOR UPDATE" if lock else ""),
        (org_id,),
    ).fetchone()
    if row is None:
        raise ConfigError(f"unknown org {org_id!r}")
    return row[0].strip()


def _check_plan(catalog, plan: str, currency: str, org_id: str) -> None:
    if plan not in catalog.plans:
        known = ", ".join(sorted(catalog.plans)) or "none"
        raise ConfigError(f"plan {plan!r} is not in the catalog ({known})")
    plan_currency = catalog.plans[plan].currency
    if plan_currency != currency:
        raise ConfigError(
            f"plan {plan!r} is billed in {plan_currency!r} but org {org_id!r} pays in {currency!r}"
        )


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, not {source!r}")


def _begin(cx, org_id: str, actor: str, source: str) -> str:
    """Check the source, record the actor for this transaction, lock the org; its currency."""
    _check_source(source)
    cx.execute("SELECT set_config('billing.actor', %s, true)", (actor,))
    return _org_currency(cx, org_id)


def _catalog(catalog):
    if catalog is not None:
        return catalog
    from billing.pricing import load_catalog

    return load_catalog()


# ---------------------------------------------------------------- edits
def change_plan(
    cx,
    org_id: str,
    plan: str,
    effective: dt.date,
    actor: str,
    source: str,
    reason: str | None = None,
    *,
    catalog=None,
) -> list[dict]:
    """From ``effective`` on, the org is on ``plan``: the interval containing that day ends
    there and [effective, its end) on ``plan`` starts (replacing the interval when it starts
    that day). The new interval merges with a neighbour on the same plan that it touches.
    Returns the change rows written; none when the org is already on ``plan`` that day."""
    currency = _begin(cx, org_id, actor, source)
    _check_plan(_catalog(catalog), plan, currency, org_id)
    current = _intervals(cx, org_id)
    hit = next((s for s in current if s.covers(effective)), None)
    if hit is None:
        raise ConfigError(
            f"org {org_id!r} has no subscription on {effective}; "
            "start one with 'billing subscriptions start'"
        )
    if hit.plan == plan:
        return []
    desired = [(s.starts, s.ends, s.plan) for s in current if s is not hit]
    if _lo(hit.starts) < effective:
        desired.append((hit.starts, effective, hit.plan))
    new = (effective, hit.ends, plan)
    desired.append(new)
    return _apply(cx, org_id, current, _merge_around(desired, new), "change", actor, source, reason)


def start(
    cx,
    org_id: str,
    plan: str,
    starts: dt.date,
    ends: dt.date | None,
    actor: str,
    source: str,
    reason: str | None = None,
    *,
    catalog=None,
) -> list[dict]:
    """A subscription [starts, ends) on ``plan`` for days the org has none (after a cancel).
    A no-op when the org is already on ``plan`` every one of those days."""
    if ends is not None and ends <= starts:
        raise ConfigError(f"ends {ends} must be after starts {starts}")
    currency = _begin(cx, org_id, actor, source)
    _check_plan(_catalog(catalog), plan, currency, org_id)
    current = _intervals(cx, org_id)
    clashing = [s for s in current if _overlap(s.starts, s.ends, starts, ends)]
    if clashing and _covered(clashing, plan, starts, ends):
        return []
    if clashing:
        s = clashing[0]
        raise ConfigError(
            f"org {org_id!r} already has a subscription {s.span()} on {s.plan!r} overlapping "
            f"{_span(starts, ends)}; use 'billing subscriptions change' or 'cancel' first"
        )
    new = (starts, ends, plan)
    desired = [(s.starts, s.ends, s.plan) for s in current] + [new]
    return _apply(cx, org_id, current, _merge_around(desired, new), "start", actor, source, reason)


def cancel(
    cx,
    org_id: str,
    ends: dt.date,
    actor: str,
    source: str,
    reason: str | None = None,
) -> list[dict]:
    """The org's last day on a plan is ``ends`` - 1: the interval containing it ends at
    ``ends`` and later intervals are removed. A no-op when that is already so."""
    _begin(cx, org_id, actor, source)
    last = ends - dt.timedelta(days=1)
    current = _intervals(cx, org_id)
    hit = next((s for s in current if s.covers(last)), None)
    if hit is None:
        ended = [s for s in current if _hi(s.ends) <= ends]
        was = f" (its subscription ended {ended[-1].ends})" if ended else ""
        raise ConfigError(f"org {org_id!r} has no subscription on {last} to cancel{was}")
    desired = [(s.starts, s.ends, s.plan) for s in current if _hi(s.ends) <= _lo(hit.starts)]
    desired.append((hit.starts, ends, hit.plan))
    return _apply(cx, org_id, current, desired, "cancel", actor, source, reason)


def _covered(found: list[Subscription], plan: str, starts: dt.date, ends) -> bool:
    """Whether intervals on ``plan`` cover every day of [starts, ends) without a gap."""
    at = starts
    for s in sorted(found, key=lambda s: _lo(s.starts)):
        if s.plan != plan or _lo(s.starts) > at:
            return False
        at = _hi(s.ends)
        if at >= _hi(ends):
            return True
    return False


def _merge_around(desired: list[_Interval], new: _Interval) -> list[_Interval]:
    """Merge ``new`` with the neighbours on its plan that it touches (one interval, not two
    back to back); other intervals stay as they are."""
    out = sorted(desired, key=lambda iv: _lo(iv[0]))
    i = out.index(new)
    starts, ends, plan = new
    if i + 1 < len(out) and ends is not None and out[i + 1][0] == ends and out[i + 1][2] == plan:
        ends = out.pop(i + 1)[1]
    if i > 0 and starts is not None and out[i - 1][1] == starts and out[i - 1][2] == plan:
        starts = out.pop(i - 1)[0]
        i -= 1
    out[i] = (starts, ends, plan)
    return out


def _apply(
    cx,
    org_id: str,
    current: list[Subscription],
    desired: list[_Interval],
    action: str,
    actor: str,
    source: str,
    reason: str | None,
    *,
    plan_in_place: bool = False,
) -> list[dict]:
    """Turn ``current`` into ``desired`` (matched by start) with the fewest row edits, each
    logged. A plan is not rewritten in place (the interval is deleted and a new one inserted)
    unless ``plan_in_place`` (the CSV import's upsert by key). Deletes and shrinking updates
    go first, so no intermediate state overlaps (the trigger checks every row)."""
    wanted = {iv[0]: iv for iv in desired}
    have = {s.starts for s in current}
    deletes, updates, inserts = [], [], []
    for s in current:
        iv = wanted.get(s.starts)
        if iv is None or (iv[2] != s.plan and not plan_in_place):
            deletes.append(s)
            if iv is not None:
                inserts.append(iv)
        elif (iv[1], iv[2]) != (s.ends, s.plan):
            updates.append((s, iv))
    inserts += [iv for iv in desired if iv[0] not in have]
    updates.sort(key=lambda u: _hi(u[1][1]) >= _hi(u[0].ends))  # shrinking first
    written = []

    def log(before: _Interval | None, after: _Interval | None) -> None:
        cx.execute(
            """INSERT INTO billing.subscription_changes
                   (org_id, action, before, after, changed_by, source, reason)
               VALUES (%s, %s, %s::jsonb, %s::jsonb, %s, %s, %s)""",
            (
                org_id,
                action,
                json.dumps(_interval_json(before)) if before else None,
                json.dumps(_interval_json(after)) if after else None,
                actor,
                source,
                reason,
            ),
        )
        written.append(
            {"action": action, "before": _interval_json(before), "after": _interval_json(after)}
        )

    for s in deletes:
        cx.execute(
            "DELETE FROM billing.subscriptions WHERE subscription_id = %s", (s.subscription_id,)
        )
        log((s.starts, s.ends, s.plan), None)
    for s, iv in updates:
        cx.execute(
            "UPDATE billing.subscriptions SET plan = %s, ends_at = %s WHERE subscription_id = %s",
            (iv[2], _ts(iv[1], None), s.subscription_id),
        )
        log((s.starts, s.ends, s.plan), iv)
    for iv in sorted(inserts, key=lambda iv: _lo(iv[0])):
        cx.execute(
            """INSERT INTO billing.subscriptions (org_id, plan, starts_at, ends_at, created_by)
               VALUES (%s, %s, %s::timestamptz, %s, %s)""",
            (org_id, iv[2], _ts(iv[0], _SINCE_ALWAYS), _ts(iv[1], None), actor),
        )
        log(None, iv)
    return written


# ---------------------------------------------------------------- CSV import
@dataclass(frozen=True)
class _Row:
    line: int
    org_id: str
    plan: str
    starts: dt.date | None
    ends: dt.date | None


def _csv_day(value: str, where: str, column: str) -> dt.date | None:
    if not value:
        return None
    try:
        if len(value) == 10:
            return dt.date.fromisoformat(value)
    except ValueError:
        pass
    raise ConfigError(f"{where}: {column} {value!r} is not a day (YYYY-MM-DD)")


def _read_csv(path: Path) -> list[_Row]:
    rows = []
    for where, (org_id, plan, starts, ends) in csvfile.read(path, CSV_COLUMNS):
        if not _ORG_ID.match(org_id):
            raise ConfigError(f"{where}: org_id {org_id!r} must be 1-64 of A-Z a-z 0-9 _ . -")
        if not plan:
            raise ConfigError(f"{where}: plan is empty")
        row = _Row(
            int(where.rsplit(":", 1)[1]),
            org_id,
            plan,
            _csv_day(starts, where, "starts_at"),
            _csv_day(ends, where, "ends_at"),
        )
        if row.ends is not None and _lo(row.starts) >= row.ends:
            raise ConfigError(f"{where}: ends_at {row.ends} must be after starts_at {starts}")
        rows.append(row)
    return rows


def import_csv(cx, path: Path, actor: str, *, catalog=None) -> dict:
    """Upsert intervals from ``org_id,plan,starts_at,ends_at`` (key: org_id + starts_at;
    empty starts_at: since always, empty ends_at: open). The whole file is checked first
    (days, orgs, plans, currencies, overlaps within the file and with the org's intervals
    the file does not name): any error is ``path:line: message`` and nothing is written.
    Re-importing the same file writes nothing. Returns {inserted, updated, unchanged}."""
    path = Path(path)
    catalog = _catalog(catalog)
    rows = _read_csv(path)
    cx.execute("SELECT set_config('billing.actor', %s, true)", (actor,))
    by_org: dict[str, list[_Row]] = {}
    for row in rows:
        by_org.setdefault(row.org_id, []).append(row)
    plans: dict[str, tuple[list[Subscription], list[_Interval]]] = {}
    for org_id in sorted(by_org):  # one lock order: concurrent imports cannot deadlock
        org_rows = by_org[org_id]
        first = min(r.line for r in org_rows)
        try:
            currency = _org_currency(cx, org_id)
        except ConfigError as exc:
            raise ConfigError(f"{path}:{first}: {exc}") from None
        for r in org_rows:
            try:
                _check_plan(catalog, r.plan, currency, org_id)
            except ConfigError as exc:
                raise ConfigError(f"{path}:{r.line}: {exc}") from None
        current = _intervals(cx, org_id)
        plans[org_id] = (current, _planned(path, org_rows, current))
    counts = {"inserted": 0, "updated": 0, "unchanged": 0}
    for org_id in sorted(plans):
        current, desired = plans[org_id]
        have = {s.starts: s for s in current}
        for row in by_org[org_id]:
            s = have.get(row.starts)
            if s is None:
                counts["inserted"] += 1
            elif (s.plan, s.ends) != (row.plan, row.ends):
                counts["updated"] += 1
            else:
                counts["unchanged"] += 1
        _apply(
            cx,
            org_id,
            current,
            desired,
            "import",
            actor,
            "csv",
            f"import {path.name}",
            plan_in_place=True,
        )
    return counts


def _planned(path: Path, rows: list[_Row], current: list[Subscription]) -> list[_Interval]:
    """The org's intervals after the import: the file's, plus its existing ones the file
    does not name; an overlap is an error at the file's line."""
    seen: dict = {}
    for r in rows:
        if r.starts in seen:
            raise ConfigError(
                f"{path}:{r.line}: org {r.org_id!r} starting "
                f"{_day_json(r.starts, _SINCE_ALWAYS)} is already on line {seen[r.starts].line}"
            )
        seen[r.starts] = r
    ordered = sorted(rows, key=lambda r: _lo(r.starts))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if _overlap(a.starts, a.ends, b.starts, b.ends):
            late = max(a, b, key=lambda r: r.line)
            other = a if late is b else b
            raise ConfigError(
                f"{path}:{late.line}: org {late.org_id!r} {_span(late.starts, late.ends)} "
                f"overlaps line {other.line} {_span(other.starts, other.ends)}"
            )
    kept = [s for s in current if s.starts not in seen]
    for r in rows:
        for s in kept:
            if _overlap(r.starts, r.ends, s.starts, s.ends):
                raise ConfigError(
                    f"{path}:{r.line}: org {r.org_id!r} {_span(r.starts, r.ends)} overlaps its "
                    f"subscription {s.span()} on {s.plan!r}, which the file does not name "
                    "(add it with its starts_at, or cancel/change it first)"
                )
    return [(s.starts, s.ends, s.plan) for s in kept] + [(r.starts, r.ends, r.plan) for r in rows]


def write_csv(path: Path, subscriptions: Iterable[Subscription]) -> Path:
    """The intervals as an import file (round-trips through :func:`import_csv`)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for s in subscriptions:
            w.writerow([s.org_id, s.plan, _day_json(s.starts, ""), _day_json(s.ends, "")])
    return path


# ---------------------------------------------------------------- Airflow task
def run_task(params: dict, triggering_user: str | None) -> dict:
    """billing_subscriptions' task: one change from the trigger form, recorded as
    ``airflow:<user>``. Idempotent: a cleared or re-run task finds the change made and writes
    nothing. A bad form raises ConfigError (the DAG fails it without retries)."""
    from billing.platform import db

    p = {k: (v.strip() if isinstance(v, str) else v) for k, v in (params or {}).items()}
    action = p.get("action")
    if action not in ACTIONS:
        raise ConfigError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
    needed = (
        ("org_id", "plan", "effective", "reason")
        if action != "cancel"
        else ("org_id", "effective", "reason")
    )
    missing = [k for k in needed if not p.get(k)]
    if missing:
        raise ConfigError(f"{action}: fill in {', '.join(missing)}")
    if p.get("ends") and action != "start":
        raise ConfigError(f"{action}: ends is for start only (a cancel ends on its effective day)")
    org_id = p["org_id"]
    effective = _form_day(p, "effective")
    ends = _form_day(p, "ends")
    actor = f"airflow:{triggering_user or 'unknown'}"
    with db.transaction() as cx:
        if action == "change":
            written = change_plan(cx, org_id, p["plan"], effective, actor, "airflow", p["reason"])
        elif action == "start":
            written = start(cx, org_id, p["plan"], effective, ends, actor, "airflow", p["reason"])
        else:
            written = cancel(cx, org_id, effective, actor, "airflow", p["reason"])
        now = [s.as_json() for s in _intervals(cx, org_id)]
        closed = closed_periods_since(cx, effective) if written else []
    if closed:
        log.warning("%s", rerate_hint(org_id, closed))
    return {
        "action": action,
        "org_id": org_id,
        "actor": actor,
        "changes": written,
        "intervals": now,
        "closed_periods": closed,
    }


def _form_day(p: dict, key: str) -> dt.date | None:
    value = p.get(key)
    if not value:
        return None
    try:
        return dt.date.fromisoformat(str(value)[:10]) if len(str(value)) == 10 else _bad(key, value)
    except ValueError:
        return _bad(key, value)


def _bad(key: str, value):
    raise ConfigError(f"{key} {value!r} is not a day (YYYY-MM-DD)")
