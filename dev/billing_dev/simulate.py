"""A month of nightly billing on the real local stack, under faults, checked to the cent.

``billing simulate --days 35 --orgs N --events-per-day M --seed S [--start D] [--faults P]``
runs the nightly cycle day by day across a month boundary: usage files (duplicates,
malformed lines, late events) from :mod:`billing_dev.usage_gen`, then the ``billing_nightly``
steps (ingest -> transform on both targets -> Stripe push -> month-end close -> invoice
sync), payments for some orgs, dunning as of the next morning and a reconciliation with a
per-day idempotency key. After the run it checks the invariants that say nothing was lost
and nothing doubled, prints them and returns them (:func:`run`; exit 1 when one fails).

The steps run as Python functions (a Cosmos ``dags test`` costs ~90 s a day); one day goes
through the real DAG (:func:`billing_dev.runner.run_day`) and the killed task is an Airflow
``tasks test`` process killed mid-way and re-run, as on-call would.

Fault profiles (``--faults``):

* ``none``   -- no faults (the real-DAG day still runs).
* ``stripe`` -- Stripe 5xx / 429 / 409 / resets / timeouts / lost responses through
  :class:`billing_dev.faults.FaultProxy`; an outage window (read-only on, then off + drain);
  writes that fail every attempt for a day (parked, then ``retry_parked --all``).
* ``all``    -- ``stripe`` plus Postgres stopped while an ingest transaction is open (then
  started; the re-run resumes), ``stripe_push`` killed mid-way under Airflow and re-run,
  a day re-run twice, a backfill of an earlier day with a file that landed late.

Business events (issue 20), whatever the profile, scheduled around the first month close
like the faults and done as a user does them (``billing credits grant``, ``billing
subscriptions change|cancel``, ``billing rerate --apply``: the functions those commands
call, actor ``simulate``): prepaid credits for two orgs on day 0 (one grant expiring two
weeks after the close), an upgrade effective a day of the month before its close (the base
fee re-prorated in Stripe), after the close a late event of the closed month (a correction
item tagged it), a cancellation of another org (not billed from that day), and a
retroactive downgrade of the closed month re-rated with ``--apply`` (credit notes), then
the same re-rate again (writes nothing). ``check()`` verifies them to the cent.

Every fault is made to happen at a known point without timing: an advisory lock the step
needs is held by the simulator, it waits until Postgres shows the step blocked on it, then
injects the fault (stop Postgres, SIGKILL the task).

Isolation: the simulation runs on its own stack (``--stack-dir``, default
``.local/simulate``), wiped at the start, so its counts are exact.

Dates: Stripe's due dates follow the real clock (``created + days_until_due``), so the
simulated month end should not be before today. The default start puts the first month
end at the end of the current month; ``days_until_due`` is chosen at each close so the due
date is the simulated close day, and a compressed dunning policy (one stage every
``--dunning-step`` days) lets a short run reach every stage.
"""

from __future__ import annotations

import datetime as dt
import email
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from psycopg import sql

from billing.platform.dates import month_end, parse_period, period_of
from billing.platform.errors import BillingError

log = logging.getLogger(__name__)

PROFILES = ("none", "stripe", "all")
STAGES = ("reminder", "second_notice", "final_notice", "service_degraded", "escalation")
DRAIN_LOCK = 7_202_612  # billing.stripe_sync.engine.DRAIN_LOCK (not imported: Airflow-free)


class SimulationFailed(BillingError):
    """At least one invariant does not hold after the run."""

    exit_code = 1


@dataclass
class Config:
    days: int = 35
    orgs: int = 5
    events_per_day: int = 2000
    seed: int = 7
    start: dt.date | None = None
    faults: str = "all"
    stack_dir: Path | None = None
    keep_stack: bool = False
    bad_ratio: float = 0.01
    dup_ratio: float = 0.02
    late_ratio: float = 0.03
    late_days: int = 5
    files_per_day: int = 2
    dunning_step: int | None = None  # days between dunning stages; None: fit the run
    dag_day: int | None = None  # index of the day run through the real DAG; -1: none
    quiet: bool = False

    def __post_init__(self):
        if self.faults not in PROFILES:
            raise BillingError(f"unknown fault profile {self.faults!r} ({', '.join(PROFILES)})")
        if self.days < 2:
            raise BillingError("simulate at least 2 days")
        if self.start is None:
            self.start = default_start(self.days)


def default_start(days: int, today: dt.date | None = None) -> dt.date:
    """Start so the run crosses the end of the current month with room after it."""
    today = today or dt.datetime.now(dt.UTC).date()
    before = max(1, min(days // 2, 4))
    return month_end(today) - dt.timedelta(days=before - 1)


def _snapshot(table: str) -> sql.Identifier:
    """A table of the published invoice snapshot."""
    from billing.platform import settings

    return sql.Identifier(settings.snapshot_schema(), table)


def _month_end(day: dt.date) -> bool:
    return day == month_end(day)


# ------------------------------------------------------------------ environment
def prepare_environment(stack_dir: Path, *, wipe: bool = True):
    """Point this process (before Airflow is imported) at a private stack; start it."""
    from billing_dev.stack.manager import Stack

    stack_dir = stack_dir.resolve()
    stack = Stack(stack_dir)
    if wipe and stack_dir.exists():
        if stack.state_file.exists():
            os.environ["BILLING_LOCAL_DIR"] = str(stack_dir)
            stack.destroy()  # also PostgreSQL's data outside the checkout, if any
        shutil.rmtree(stack_dir)
    os.environ["BILLING_LOCAL_DIR"] = str(stack_dir)
    os.environ["BILLING_LANDING_URI"] = (stack_dir / "landing").as_uri()
    os.environ["BILLING_MAIL_DIR"] = str(stack_dir / "mail")
    state = stack._init_state()
    os.environ.update(stack.env(state))
    stack.up()
    return stack


# ------------------------------------------------------------------ expected counts
@dataclass
class Expected:
    """What the generator wrote, classified independently of the product code."""

    valid_ids: set[str] = field(default_factory=set)
    valid_lines: int = 0
    bad_lines: int = 0
    lines: int = 0

    def add_file(self, path: str) -> None:
        with open(path.removeprefix("file://"), encoding="utf-8") as fh:
            for line in fh:
                line = line.rstrip("\n")
                if not line:
                    continue
                self.lines += 1
                try:
                    obj = json.loads(line)
                    event_id = obj["event_id"]
                except (ValueError, KeyError, TypeError):
                    self.bad_lines += 1
                    continue
                if str(event_id).startswith("bad-"):
                    self.bad_lines += 1
                else:
                    self.valid_lines += 1
                    self.valid_ids.add(event_id)

    @property
    def duplicates(self) -> int:
        return self.valid_lines - len(self.valid_ids)


# ------------------------------------------------------------------ the simulation
@dataclass(frozen=True)
class _Facts:
    """What the invariant checks read from Postgres after the run."""

    snapshot: dict  # (org, period) -> (total_cents, currency)
    closes: dict  # (org, period) -> (Stripe invoice status, its id)
    due_on: dict  # Stripe invoice id -> due date
    late_after_close: dict  # (org, period) -> billable events that arrived after its close
    outbox_status: dict  # status -> rows
    sent_rows: list  # (kind, idempotency_key, stripe_object_id) of sent outbox rows
    notices: list  # (stripe_invoice_id, org_id, stage, status, message_id)
    audit: dict  # (org, period) -> (latest status, is_above_tolerance)
    incidents: list  # (period, org_ids, status)
    plans: dict  # org -> plan
    applications: list  # (grant_id, org, period, amount_cents, outbox_key) of applied credits

    @classmethod
    def read(cls, cx) -> _Facts:
        closes, due_on = {}, {}
        for o, p, iid, st, due in cx.execute(
            """SELECT org_id, period, stripe_invoice_id, status,
                      (due_at AT TIME ZONE 'UTC')::date FROM billing.stripe_invoices"""
        ).fetchall():
            closes[(o, p)] = (st, iid)
            due_on[iid] = due
        return cls(
            snapshot={
                (o, p): (int(t), c.strip().lower())
                for o, p, t, c in cx.execute(
                    sql.SQL("SELECT org_id, period_start, total_cents, currency FROM {}").format(
                        _snapshot("fct_invoices")
                    )
                ).fetchall()
            },
            closes=closes,
            due_on=due_on,
            late_after_close={
                (o, p): n
                for o, p, n in cx.execute(
                    """SELECT e.org_id, date_trunc('month', e.occurred_at AT TIME ZONE 'UTC')::date,
                              count(*)
                         FROM billing.usage_events e
                         JOIN billing.stripe_invoices i ON i.org_id = e.org_id
                          AND i.period = date_trunc('month', e.occurred_at AT TIME ZONE 'UTC')::date
                        WHERE e.billable
                          AND e.arrival_day > (i.period + interval '1 month' - interval '1 day')::date
                        GROUP BY 1, 2"""
                ).fetchall()
            },
            outbox_status=dict(
                cx.execute("SELECT status, count(*) FROM billing.stripe_outbox GROUP BY 1")
            ),
            sent_rows=cx.execute(
                """SELECT kind, idempotency_key, stripe_object_id FROM billing.stripe_outbox
                    WHERE status = 'sent'"""
            ).fetchall(),
            notices=cx.execute(
                """SELECT stripe_invoice_id, org_id, stage, status, message_id
                     FROM billing.dunning_notices"""
            ).fetchall(),
            audit={
                (o, p): (s, above)
                for o, p, s, above in cx.execute(
                    """SELECT DISTINCT ON (org_id, period) org_id, period, status, is_above_tolerance
                         FROM billing.billing_audit ORDER BY org_id, period, audit_id DESC"""
                ).fetchall()
            },
            incidents=cx.execute(
                "SELECT period, org_ids, status FROM billing.billing_incidents"
            ).fetchall(),
            plans=dict(cx.execute("SELECT org_id, plan FROM billing.organizations")),
            applications=cx.execute(
                """SELECT grant_id, org_id, period, amount_cents, outbox_key
                     FROM billing.credit_applications ORDER BY period, grant_id"""
            ).fetchall(),
        )


class Simulation:
    def __init__(self, cfg: Config, stack):
        from billing import pricing

        self.cfg = cfg
        self.stack = stack
        self.state = stack.load_state()
        self.catalog = pricing.load_catalog()
        self.metrics = sorted(self.catalog.metrics)
        self.days = [cfg.start + dt.timedelta(days=i) for i in range(cfg.days)]
        self.expected = Expected()
        self.events_log: list[dict] = []
        self.timings: dict[str, float] = defaultdict(float)
        self.day_seconds: list[float] = []
        self.proxy = None
        self.pending_close: set[dt.date] = set()
        self.closed_at: dict[tuple[str, dt.date], int] = {}  # snapshot total when closed
        self.reconcile_runs = 0
        self.reconcile_failed_runs = 0
        self.payments: dict[str, str] = {}  # invoice id -> sim day paid
        self.rng_orgs = [o.org_id for o in self._orgs()]
        n = len(self.days)
        faults = cfg.faults
        self.schedule: dict[str, int | None] = {
            "pg_restart": 1 if faults == "all" else None,
            "outage_on": 1 if faults != "none" and n > 3 else None,
            "outage_off": 3 if faults != "none" and n > 3 else None,
            "sticky": 3 if faults != "none" and n > 4 else None,
            "retry_parked": 4 if faults != "none" and n > 4 else None,
            "kill_push": 4 if faults == "all" and n > 4 else None,
            "dag_day": cfg.dag_day if cfg.dag_day is not None else min(5, n - 1),
            "rerun": 6 if faults == "all" and n > 6 else None,
            "backfill": 7 if faults == "all" and n > 7 else None,
        }
        if self.schedule["dag_day"] is not None and self.schedule["dag_day"] < 0:
            self.schedule["dag_day"] = None
        self._schedule_business()

    def _schedule_business(self) -> None:
        """Business events (issue 20), like the faults: a day index each, from the calendar.

        Around the first month close (index ``c``): prepaid credits granted on day 0, an
        upgrade effective a day before the close, then after the close a late event for the
        closed month (its invoice finalized: a correction item), a cancellation of another
        org, and a retroactive downgrade of the closed month with ``billing rerate --apply``
        (a credit note) run twice. The orgs are picked from the demo orgs' plans (same
        currency, a cheaper and a dearer plan), so they follow the seed and ``--orgs``."""
        n = len(self.days)
        c = next((i for i, d in enumerate(self.days) if _month_end(d)), None)
        self.first_close = c
        orgs = self._orgs()
        plans = self.catalog.plans
        by_currency = defaultdict(list)
        for name, plan in plans.items():
            by_currency[plan.currency].append((plan.base_fee, name))
        # an org on a plan with a dearer plan in its currency: upgraded, then re-rated down
        self.upgrade_org = self.upgrade_to = self.downgrade_to = None
        for o in orgs:
            dearer = sorted(x for x in by_currency[o.currency] if x[0] > plans[o.plan].base_fee)
            if dearer:
                self.upgrade_org, self.upgrade_to, self.downgrade_to = (
                    o.org_id,
                    dearer[0][1],
                    o.plan,
                )
                break
        others = [o for o in orgs if o.org_id != self.upgrade_org]
        # cancelled: an org that does not pay late (its dunning is the never-paying org's)
        cancel = next((o for o in others if self.group(o.org_id) == "prompt"), None)
        cancel = cancel or (others[0] if others else None)
        self.cancel_org = cancel.org_id if cancel else None
        late = [o for o in others if o.org_id != self.cancel_org]
        self.late_org = late[0].org_id if late else (others[0].org_id if others else None)
        self.late_metric = "api_calls" if "api_calls" in self.metrics else self.metrics[0]

        def at(i: int | None, ok: bool = True) -> int | None:
            return i if ok and i is not None and 0 <= i < n else None

        have_close = c is not None
        self.schedule.update(
            {
                "credit_grants": at(0, have_close),
                "plan_upgrade": at(
                    max(1, (c or 0) - 2), have_close and bool(c) and bool(self.upgrade_org)
                ),
                "late_event": at((c or 0) + 2, have_close and bool(self.late_org)),
                "plan_cancel": at((c or 0) + 2, have_close and bool(self.cancel_org)),
                "rerate": at((c or 0) + 3, have_close and bool(self.upgrade_org)),
            }
        )
        self.grants: list[dict] = []  # what the simulation granted (the checks' own record)
        self.plan_changes: list[dict] = []
        self.rerates: list[dict] = []
        self.late_event_ids: list[str] = []

    # ---------------------------------------------------------------- helpers
    def say(self, msg: str) -> None:
        if not self.cfg.quiet:
            print(msg, flush=True)

    def note(self, day: dt.date, kind: str, **detail) -> None:
        self.events_log.append({"day": day.isoformat(), "event": kind, **detail})
        self.say(f"  [{kind}] " + ", ".join(f"{k}={v}" for k, v in detail.items()))

    def timed(self, name: str, fn: Callable, *a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            self.timings[name] += time.perf_counter() - t

    def _orgs(self):
        from billing_dev import usage_gen

        return usage_gen.demo_orgs(self.cfg.orgs, self.catalog)

    def group(self, org_id: str) -> str:
        """Payment behaviour: pays at once, pays after the second notice, never pays."""
        i = int(org_id.rsplit("-", 1)[1])
        return ("never", "prompt", "after_second")[i % 3]

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        from billing import orgs as orgs_mod
        from billing.platform import db

        with db.transaction() as cx:
            orgs_mod.upsert(cx, self._orgs())
        step = self.cfg.dunning_step
        if step is None:  # fit all five stages between the first close and the run's end
            close = next((d for d in self.days if _month_end(d)), self.days[-1])
            after = (self.days[-1] - close).days
            step = max(1, min(7, (after - 2) // 5))
        self.dunning_step = step
        path = self.stack.root / "simulate-dunning.yaml"
        path.write_text(_policy_yaml(step))
        os.environ["BILLING_DUNNING_POLICY"] = str(path)
        # Retries at simulated speed: the schedule's shape is the product's, its unit is 10 ms.
        os.environ["BILLING_STRIPE_BACKOFF_BASE_SECONDS"] = "0.01"
        os.environ["BILLING_STRIPE_MAX_RPS"] = "0"
        os.environ["BILLING_STRIPE_TIMEOUT_SECONDS"] = "2"
        os.environ.setdefault("BILLING_INGEST_WORKERS", "2")
        if self.cfg.faults != "none":
            self._start_proxy()

    def _start_proxy(self) -> None:
        from billing.platform import connections
        from billing_dev.faults import FaultProxy

        conn = connections.get(connections.STRIPE)
        self.emulator_url = conn.host
        self.proxy = FaultProxy(
            conn.host,
            seed=self.cfg.seed,
            rates={
                "500": 0.03,
                "429": 0.03,
                "409": 0.01,
                "reset": 0.02,
                "timeout": 0.01,
                "lost": 0.04,
            },
            forced=("500", "429", "409", "reset", "timeout", "lost"),
            hold_seconds=2.5,
            retry_after=0,
        ).start()
        moved = connections.Conn(
            conn.conn_id, conn.conn_type, self.proxy.url, None, None, conn.password, None
        )
        os.environ[connections.env_var(conn.conn_id)] = moved.to_json()

    def direct(self):
        """An SDK client straight to the emulator (payments, checks): never faulted."""
        import stripe

        from billing.platform import connections

        url = getattr(self, "emulator_url", None) or connections.get(connections.STRIPE).host
        key = connections.get(connections.STRIPE).password
        return stripe.StripeClient(key, base_addresses={"api": url}, max_network_retries=0)

    # ---------------------------------------------------------------- usage
    def write_usage(self, day: dt.date, *, seed: int | None = None, files: int | None = None):
        from billing.platform import settings
        from billing_dev import usage_gen

        late_cap = min(self.cfg.late_days, (day - period_of(self.cfg.start)).days)
        late_cap = min(late_cap, settings.lateness_days() - 1)
        spec = usage_gen.UsageSpec(
            day,
            self.cfg.orgs,
            self.cfg.events_per_day,
            self.cfg.seed if seed is None else seed,
            bad_ratio=self.cfg.bad_ratio,
            dup_ratio=self.cfg.dup_ratio,
            late_ratio=self.cfg.late_ratio if late_cap > 0 else 0.0,
            late_days=max(1, late_cap),
        )
        paths = self.timed(
            "generate",
            usage_gen.write_day,
            spec,
            self.metrics,
            settings.landing_uri(),
            files=files or self.cfg.files_per_day,
        )
        for p in paths:
            self.expected.add_file(p)
        return paths

    def replay_file(self, src: str, day: dt.date) -> str:
        """The same file delivered again under another name on a later day (all duplicates)."""
        from billing.platform import settings

        root = Path(settings.landing_uri().removeprefix("file://")) / "usage" / f"dt={day}"
        root.mkdir(parents=True, exist_ok=True)
        dst = root / ("replayed-" + Path(src).name)
        shutil.copyfile(src.removeprefix("file://"), dst)
        self.expected.add_file(str(dst))
        return str(dst)

    # ---------------------------------------------------------------- nightly steps
    @staticmethod
    def run_end(day: dt.date) -> dt.datetime:
        from billing.platform.dates import arrival_interval

        return arrival_interval(day)[1]

    def ingest(self, day: dt.date) -> dict:
        from billing.ingest import loader as ingest

        return self.timed("ingest", ingest.ingest_day, day, self.run_end(day))

    def transform(self, day: dt.date) -> None:
        from billing import transform

        self.timed("transform", transform.transform_day, day)

    def push(self, day: dt.date) -> dict:
        from billing import stripe_sync

        return self.timed("stripe_push", stripe_sync.push_day, day)

    def close(self, day: dt.date) -> dict:
        if not _month_end(day):
            return {"status": "skipped"}
        return self.close_period(period_of(day), day)

    def close_period(self, period: dt.date, today: dt.date) -> dict:
        """Close ``period`` so its invoice is due on the simulated day it is finalized."""
        from billing import stripe_sync

        real_today = dt.datetime.now(dt.UTC).date()
        os.environ["BILLING_STRIPE_DAYS_UNTIL_DUE"] = str(max(0, (today - real_today).days))
        res = self.timed("stripe_close", stripe_sync.close_period, period)
        self.capture_close_snapshots()
        # close_period's "blocked" orgs are overwritten by the drain's blocked count, so
        # ask the outbox: orgs with the period's items but no invoice write yet.
        blocked = self.unclosed_orgs(period)
        if blocked:
            self.pending_close.add(period)
            self.note(today, "close_blocked", period=f"{period:%Y-%m}", orgs=",".join(blocked))
        else:
            self.pending_close.discard(period)
        return res

    def unclosed_orgs(self, period: dt.date) -> list[str]:
        from billing.platform import db

        with db.connect() as cx:
            return [
                o
                for (o,) in cx.execute(
                    """SELECT DISTINCT org_id FROM billing.stripe_outbox o
                        WHERE period = %(p)s AND kind IN ('usage_item', 'base_fee')
                          AND status <> 'cancelled'
                          AND NOT EXISTS (SELECT 1 FROM billing.stripe_invoices i
                                           WHERE i.org_id = o.org_id AND i.period = %(p)s)
                        ORDER BY 1""",
                    {"p": period},
                ).fetchall()
            ]

    def capture_close_snapshots(self) -> None:
        """The snapshot total each invoice was closed against (what Stripe must equal)."""
        from billing.platform import db

        with db.connect() as cx:
            for o, p, total in cx.execute(
                sql.SQL(
                    """SELECT i.org_id, i.period, f.total_cents FROM billing.stripe_invoices i
                         JOIN {} f ON f.org_id = i.org_id AND f.period_start = i.period"""
                ).format(_snapshot("fct_invoices"))
            ).fetchall():
                self.closed_at.setdefault((o, p), int(total))

    def sync(self) -> dict:
        from billing import stripe_sync

        return self.timed("stripe_sync", stripe_sync.sync_invoices)

    def nightly(self, day: dt.date, *, push_fn: Callable | None = None) -> dict:
        """billing_nightly's steps for ``day`` in its order (billing.orchestration.nightly),
        each through the simulation's stand-in."""
        from billing.orchestration import nightly

        done = nightly.run(
            day,
            {
                "ingest": self.ingest,
                "prepare_pricing": self.transform,  # transform_day: its transform steps
                "stripe_push": push_fn or self.push,
                "stripe_close_period": self.close,
            },
            skip={
                "dbt_snapshot": "run by transform_day (prepare_pricing)",
                "publish_snapshot": "run by transform_day (prepare_pricing)",
                "dbt_rollups": "run by transform_day (prepare_pricing)",
                "stripe_sync_invoices": "after the day's payments (after_night)",
                "render_invoice_pdfs": "PDFs are not part of the invariants",
                "stripe_all_delivered": "the invariants check delivery at the end",
            },
        )
        return {
            "ingest": done["ingest"]["total"],
            "push": done["stripe_push"],
            "close": done["stripe_close_period"],
        }

    def after_night(self, day: dt.date) -> None:
        """Payments during the day, invoice sync, dunning next morning, reconciliation."""
        self.pay(day)
        self.sync()
        self.dun(day + dt.timedelta(days=1))
        self.reconcile(day)

    def pay(self, day: dt.date) -> None:
        from billing.platform import db

        with db.connect() as cx:
            rows = cx.execute(
                """SELECT i.org_id, i.stripe_invoice_id,
                          EXISTS (SELECT 1 FROM billing.dunning_notices n
                                   WHERE n.stripe_invoice_id = i.stripe_invoice_id
                                     AND n.stage = 'second_notice' AND n.status = 'sent')
                     FROM billing.stripe_invoices i WHERE i.status = 'open' ORDER BY 1"""
            ).fetchall()
        client = None
        for org_id, inv_id, second_sent in rows:
            g = self.group(org_id)
            if g == "prompt" or (g == "after_second" and second_sent):
                client = client or self.direct()
                client.v1.invoices.pay(inv_id, params={"paid_out_of_band": True})
                self.payments[inv_id] = day.isoformat()
                self.note(day, "paid", org=org_id, invoice=inv_id, group=g)

    def dun(self, as_of: dt.date) -> dict:
        from billing import dunning

        res = self.timed("dunning", dunning.run, as_of)
        if res.get("sent"):
            self.say(
                f"  dunning {as_of}: "
                + ", ".join(f"{n['org_id']}:{n['stage']}" for n in res["notices"])
            )
        return res

    def reconcile(self, day: dt.date) -> None:
        from billing import reconcile
        from billing.platform import db

        periods = {period_of(day)}
        with db.connect() as cx:  # closed periods still inside the lateness window
            for (p,) in cx.execute("SELECT DISTINCT period FROM billing.stripe_invoices"):
                periods.add(p)
        for p in sorted(periods):
            key = f"simulate:{self.cfg.seed}:{p:%Y-%m}:{day.isoformat()}"
            self.reconcile_runs += 1
            try:
                self.timed("reconcile", reconcile.reconcile, p, idempotency_key=key)
            except reconcile.ReconcileMismatch as exc:
                self.reconcile_failed_runs += 1
                inc = exc.payload.get("incident") or {}
                self.say(f"  reconcile {p:%Y-%m}: mismatch -> incident {inc.get('incident_id')}")

    # ---------------------------------------------------------------- faults
    def wait_for_lock_waiter(self, where: str, timeout: float = 60.0) -> int:
        """Block until a backend waits on an advisory lock matching ``where``; its pid."""
        from billing.platform import db

        deadline = time.monotonic() + timeout
        with db.connect(autocommit=True) as cx:
            while time.monotonic() < deadline:
                row = cx.execute(
                    f"""SELECT l.pid FROM pg_locks l
                         WHERE l.locktype = 'advisory' AND NOT l.granted AND {where} LIMIT 1"""
                ).fetchone()
                if row:
                    return row[0]
                # a condition wait on Postgres' own lock table, not a timed guess
                cx.execute("SELECT pg_sleep(0.05)")
        raise BillingError(f"no backend blocked on the advisory lock ({where}) in {timeout}s")

    def ingest_with_pg_restart(self, day: dt.date) -> dict:
        """Stop Postgres while file 2 of the day is inside its transaction; restart; resume."""
        import threading

        from billing.ingest import loader as ingest
        from billing.platform import db

        files = ingest._list_files(ingest._day_root(day, None))
        if len(files) < 2:
            return self.ingest(day)
        key = ingest._lock_key(str(files[1]))
        holder = db.connect(autocommit=True)
        holder.execute("SELECT pg_advisory_lock(%s)", (key,))
        outcome: dict[str, Any] = {}

        def load():
            try:
                outcome["result"] = ingest.ingest_day(day, self.run_end(day), workers_=1)
            except Exception as exc:
                outcome["error"] = exc

        t = threading.Thread(target=load, name="sim-ingest")
        t.start()
        hi, lo = (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF
        self.wait_for_lock_waiter(f"l.classid = {hi}::oid AND l.objid = {lo}::oid")
        self.stack.postgres_down(self.state)  # fast shutdown: open transactions roll back
        t.join()
        holder.close()
        self.note(
            day,
            "postgres_stopped_mid_ingest",
            error=type(outcome.get("error")).__name__,
        )
        self.stack.postgres_up(self.state)
        # The loaded file is skipped, the rolled-back ones load: resume, not restart.
        res = self.ingest(day)
        statuses = Counter(f["status"] for f in res["files"])
        self.note(day, "ingest_resumed", **statuses)
        return res

    def airflow_task(self, day: dt.date, task_id: str, *, kill_when_blocked: bool = False):
        """``airflow tasks test billing_nightly TASK`` for arrival day ``day`` (logical date D)."""
        from billing.platform.dates import logical_date_of

        airflow = Path(sys.executable).parent / "airflow"
        run_at = logical_date_of(day).isoformat()
        cmd = [str(airflow), "tasks", "test", "billing_nightly", task_id, run_at]
        logf = open(self.stack.root / f"airflow-{task_id}-{day}.log", "ab")
        proc = subprocess.Popen(
            cmd,
            env=os.environ.copy(),
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if not kill_when_blocked:
            rc = proc.wait()
            logf.close()
            if rc != 0:
                raise BillingError(f"airflow tasks test {task_id} {day} failed (exit {rc})")
            return rc
        try:
            pid = self.wait_for_lock_waiter(f"l.classid = 0::oid AND l.objid = {DRAIN_LOCK}::oid")
        except BillingError:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        logf.close()
        return pid

    def push_killed_and_rerun(self, day: dt.date) -> dict:
        """stripe_push under Airflow, SIGKILLed while it waits to drain; then run again."""
        from billing.platform import db

        holder = db.connect(autocommit=True)
        holder.execute("SELECT pg_advisory_lock(%s)", (DRAIN_LOCK,))
        t = time.perf_counter()
        backend = self.airflow_task(day, "stripe_push", kill_when_blocked=True)
        holder.execute("SELECT pg_terminate_backend(%s)", (backend,))  # the killed task's session
        holder.execute("SELECT pg_advisory_unlock(%s)", (DRAIN_LOCK,))
        with db.connect() as cx:
            pending = cx.execute(
                "SELECT count(*) FROM billing.stripe_outbox WHERE status = 'pending' AND day = %s",
                (day,),
            ).fetchone()[0]
        holder.close()
        self.note(day, "stripe_push_killed", pending_rows_left=pending)
        self.airflow_task(day, "stripe_push")
        self.timings["airflow_tasks"] += time.perf_counter() - t
        with db.connect() as cx:
            left = cx.execute(
                "SELECT count(*) FROM billing.stripe_outbox WHERE status = 'pending' AND day = %s",
                (day,),
            ).fetchone()[0]
        self.note(day, "stripe_push_rerun", pending_rows_left=left)
        return {"killed_with_pending": pending, "pending_after_rerun": left}

    def fingerprint(self) -> dict:
        from billing.platform import db

        with db.connect() as cx:
            q = {
                "usage_events": "SELECT count(*) FROM billing.usage_events",
                "quarantine": "SELECT count(*) FROM billing.usage_quarantine",
                "usage_files": "SELECT count(*) FROM billing.usage_files",
                "outbox_rows": "SELECT count(*) FROM billing.stripe_outbox",
                "outbox_cents": "SELECT coalesce(sum(amount_cents), 0) FROM billing.stripe_outbox",
                "notices": "SELECT count(*) FROM billing.dunning_notices",
                "reconcile_runs": "SELECT count(*) FROM billing.reconcile_runs",
            }
            out = {k: int(cx.execute(v).fetchone()[0]) for k, v in q.items()}
        out["stripe_items"] = sum(len(v) for v in self.stripe_items().values())
        out["emails"] = len(list(Path(os.environ["BILLING_MAIL_DIR"]).glob("*.eml")))
        return out

    # ---------------------------------------------------------------- the run
    def run_days(self) -> None:
        first_files: dict[dt.date, list[str]] = {}
        for i, day in enumerate(self.days):
            t0 = time.perf_counter()
            self.say(f"day {i + 1}/{len(self.days)} {day} ({day:%a})")
            files = self.write_usage(day)
            first_files[day] = files
            if i > 0 and i % 3 == 0:  # a producer re-delivers yesterday's first file
                self.replay_file(first_files[self.days[i - 1]][0], day)
            self._before_night(i, day)
            for period in sorted(self.pending_close):  # on-call closes what was blocked
                if not self.parked_count():
                    self.close_period(period, day)
            self._night(i, day)
            if self.schedule["sticky"] == i:
                self.note(day, "parked_after_push", parked=self.parked_count())
            self.after_night(day)
            if self.schedule["rerun"] == i:
                self._rerun_twice(day)
            self.day_seconds.append(time.perf_counter() - t0)
        self._morning_after()

    def _before_night(self, i: int, day: dt.date) -> None:
        """The faults and on-call actions scheduled for day i, before its nightly run."""
        s = self.schedule
        if s["backfill"] == i:
            self.backfill(i)
        if s["outage_off"] == i:
            from billing import stripe_sync

            stripe_sync.set_read_only(False)
            res = self.timed("stripe_drain", stripe_sync.drain)
            self.note(day, "stripe_outage_off", drained=res.get("sent", 0))
        if s["retry_parked"] == i:
            self.proxy.sticky_rate = 0.0
            self.retry_parked(day)
        if s["sticky"] == i:
            self.proxy.sticky_rate = 0.4
            self.note(day, "stripe_sticky_failures_on", rate=0.4)
        if s["outage_on"] == i:
            from billing import stripe_sync

            stripe_sync.set_read_only(True, "simulated Stripe outage")
            self.note(day, "stripe_outage_on")
        self._business(i, day)

    # ---------------------------------------------------------------- business events
    def _business(self, i: int, day: dt.date) -> None:
        """Day i's business events (issue 20), before its night, as a user does them."""
        s = self.schedule
        if s["credit_grants"] == i:
            self.grant_credits(day)
        if s["plan_upgrade"] == i:
            self.change_plan(day, self.upgrade_org, self.upgrade_to, day, "plan_upgrade")
        if s["plan_cancel"] == i:
            self.cancel_plan(day, self.cancel_org, day)
        if s["late_event"] == i:
            self.late_event(day)
        if s["rerate"] == i:
            self.retroactive_downgrade_and_rerate(day)

    def grant_credits(self, day: dt.date) -> None:
        """``billing credits grant`` for two orgs before the first close: the cancelled org
        gets a small grant that never expires, then a large one expiring two weeks after the
        close (before the second close): oldest expiring first, so the large one pays its
        first invoice (capped at the total) and the small one waits; the upgraded org gets
        a grant smaller than its invoice (applied whole)."""
        from decimal import Decimal

        from billing import credits
        from billing.platform import db
        from billing.pricing.catalog import minor_exponent

        close = self.days[self.first_close]
        expires = month_end(close) + dt.timedelta(days=14)
        orgs = {o.org_id: o for o in self._orgs()}
        plan = []
        if self.cancel_org:
            plan += [(self.cancel_org, 5_000, None), (self.cancel_org, 500_000, expires)]
        if self.upgrade_org:
            plan.append((self.upgrade_org, 1_000, None))
        for org_id, minor, through in plan:
            cur = orgs[org_id].currency.strip().lower()
            amount = str(Decimal(minor).scaleb(-minor_exponent(cur)))
            with db.transaction() as cx:
                g = credits.grant(
                    cx,
                    org_id,
                    amount,
                    cur,
                    reason="simulate: prepaid credit",
                    actor="simulate",
                    valid_through=through,
                )
            self.grants.append(
                {
                    "grant_id": g["grant_id"],
                    "org_id": org_id,
                    "amount_cents": g["amount_cents"],
                    "valid_through": through,
                }
            )
            self.note(
                day,
                "credit_granted",
                org=org_id,
                grant=g["grant_id"],
                amount_cents=g["amount_cents"],
                valid_through=through.isoformat() if through else "never",
            )
        second_close = month_end(month_end(close) + dt.timedelta(days=1))
        if self.days[-1] < second_close:
            self.note(
                day,
                "credit_expiry_not_exercised",
                why=f"one close in the run; the expiring grant is usable through {expires}",
            )

    def change_plan(
        self, day: dt.date, org_id: str, plan: str, effective: dt.date, kind: str
    ) -> list[dict]:
        """``billing subscriptions change`` (billing.subscriptions.change_plan)."""
        from billing import subscriptions
        from billing.platform import db

        with db.transaction() as cx:
            written = subscriptions.change_plan(
                cx, org_id, plan, effective, "simulate", "cli", f"simulate: {kind}"
            )
            closed = subscriptions.closed_periods_since(cx, effective) if written else []
        self.plan_changes.append(
            {
                "kind": kind,
                "org_id": org_id,
                "plan": plan,
                "effective": effective,
                "recorded_on": day,
                "written": len(written),
                "closed_periods": closed,
            }
        )
        self.note(
            day,
            kind,
            org=org_id,
            plan=plan,
            effective=effective.isoformat(),
            changes=len(written),
            **({"closed_periods": ",".join(closed)} if closed else {}),
        )
        return written

    def cancel_plan(self, day: dt.date, org_id: str, ends: dt.date) -> None:
        """``billing subscriptions cancel --ends D``: billed through D-1, not from D."""
        from billing import subscriptions
        from billing.platform import db

        with db.transaction() as cx:
            written = subscriptions.cancel(
                cx, org_id, ends, "simulate", "cli", "simulate: cancellation"
            )
        self.plan_changes.append(
            {
                "kind": "plan_cancel",
                "org_id": org_id,
                "plan": None,
                "effective": ends,
                "recorded_on": day,
                "written": len(written),
                "closed_periods": [],
            }
        )
        self.note(day, "plan_cancel", org=org_id, ends=ends.isoformat(), changes=len(written))

    def late_event(self, day: dt.date) -> None:
        """A producer delivers an event of the closed month's last day on ``day`` (inside
        the lateness window), after that month's invoice was finalized: the night pushes it
        as a 'Correction for P' item tagged P, for the next invoice."""
        from billing.platform import db, settings

        closed = self.days[self.first_close]
        period = period_of(closed)
        with db.connect() as cx:
            row = cx.execute(
                "SELECT status FROM billing.stripe_invoices WHERE org_id = %s AND period = %s",
                (self.late_org, period),
            ).fetchone()
        event_id = f"simulate-late-{self.cfg.seed}-{self.late_org}-{day}"
        event = {
            "event_id": event_id,
            "org_id": self.late_org,
            "metric": self.late_metric,
            "quantity": 20_000,
            "occurred_at": f"{closed.isoformat()}T12:00:00Z",
            "billable": True,
            "source": "late-producer",
        }
        root = Path(settings.landing_uri().removeprefix("file://")) / "usage" / f"dt={day}"
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"zz-late-{self.cfg.seed}.jsonl"
        path.write_text(json.dumps(event, separators=(",", ":")) + "\n")
        self.expected.add_file(str(path))
        self.late_event_ids.append(event_id)
        self.note(
            day,
            "late_event_for_closed_month",
            org=self.late_org,
            period=f"{period:%Y-%m}",
            occurred=closed.isoformat(),
            invoice_status=row[0] if row else None,
        )

    def retroactive_downgrade_and_rerate(self, day: dt.date) -> None:
        """The upgrade of the closed month was wrong from its second day: the org goes back
        to its plan from then (recorded now, after the close), then ``billing rerate
        --period P --apply`` (corrections.rerate, as the CLI calls it) credits the difference,
        and the same command run again writes nothing."""
        from billing.stripe_sync import corrections

        close_i = self.first_close
        up = self.schedule["plan_upgrade"]
        effective = self.days[min(up + 1, close_i)] if up is not None else self.days[close_i]
        period = period_of(self.days[close_i])
        self.change_plan(day, self.upgrade_org, self.downgrade_to, effective, "plan_retroactive")
        for attempt in (1, 2):
            before = self.outbox_rows()
            res = self.timed("rerate", corrections.rerate, period, None, apply=True)
            written = self.outbox_rows() - before
            enq = [c for c in res["corrections"] if c["enqueued"]]
            self.rerates.append(
                {
                    "attempt": attempt,
                    "period": period,
                    "outbox_rows_written": written,
                    "enqueued": enq,
                    "corrections": res["corrections"],
                    "drain": res.get("drain"),
                }
            )
            self.note(
                day,
                "rerate_apply",
                period=f"{period:%Y-%m}",
                attempt=attempt,
                outbox_rows_written=written,
                kinds=",".join(
                    f"{k}:{n}" for k, n in sorted(Counter(c["kind"] for c in enq).items())
                )
                or "-",
            )

    def _night(self, i: int, day: dt.date) -> None:
        """Day i's nightly run: the real DAG on its scheduled day, else the steps in-process."""
        s = self.schedule
        if s["dag_day"] == i:
            from billing_dev import runner

            t = time.perf_counter()
            self.timed("real_dag", runner.run_day, day, quiet=True)
            self.capture_close_snapshots()
            if _month_end(day) and self.unclosed_orgs(period_of(day)):
                self.pending_close.add(period_of(day))
            self.note(day, "billing_nightly_dags_test", seconds=round(time.perf_counter() - t))
            return
        if s["pg_restart"] == i:
            self.ingest_with_pg_restart(day)
        else:
            self.ingest(day)
        self.transform(day)
        if s["kill_push"] == i:
            self.push_killed_and_rerun(day)
        else:
            self.push(day)
        self.close(day)

    def _rerun_twice(self, day: dt.date) -> None:
        before = self.fingerprint()
        for _ in range(2):
            self.nightly(day)
            self.after_night(day)
        after = self.fingerprint()
        self.rerun_check = {"before": before, "after": after}
        self.note(day, "day_rerun_twice", unchanged=before == after)

    def _morning_after(self) -> None:
        """On-call, the morning after the last day: nothing parked or queued may stay behind."""
        from billing import stripe_sync

        if self.proxy:
            self.proxy.sticky_rate = 0.0
        if stripe_sync.read_only():
            stripe_sync.set_read_only(False)
        self.retry_parked(self.days[-1])
        for period in sorted(self.pending_close):
            self.close_period(period, self.days[-1])
        self.sync()
        self.final_reconcile()

    def backfill(self, i: int) -> None:
        """A file for an earlier day landed after that day ran: on-call re-runs that day."""
        earlier = self.days[max(0, i - 2)]
        if period_of(earlier) != period_of(self.days[i]):
            earlier = self.days[i - 1]
        self.write_usage(earlier, seed=self.cfg.seed + 1000, files=1)
        before = self.outbox_rows()
        self.nightly(earlier)
        self.sync()
        self.note(
            self.days[i],
            "backfill",
            backfilled_day=earlier.isoformat(),
            new_outbox_rows=self.outbox_rows() - before,
        )

    def retry_parked(self, day: dt.date) -> None:
        from billing import stripe_sync

        n = self.parked_count()
        res = self.timed("retry_parked", stripe_sync.retry_parked, all=True)
        self.note(day, "retry_parked_all", parked_before=n, sent=res.get("sent", 0))

    def parked_count(self) -> int:
        from billing.stripe_sync import parking

        return len(parking.parked(parking.client()))

    def outbox_rows(self) -> int:
        from billing.platform import db

        with db.connect() as cx:
            return cx.execute("SELECT count(*) FROM billing.stripe_outbox").fetchone()[0]

    def final_reconcile(self) -> None:
        from billing import reconcile
        from billing.platform import db

        with db.connect() as cx:
            periods = [
                p for (p,) in cx.execute("SELECT DISTINCT period FROM billing.stripe_outbox")
            ]
        self.final_results = {}
        for p in sorted(periods):
            try:
                res = reconcile.reconcile(p, idempotency_key=f"simulate:{self.cfg.seed}:final:{p}")
            except reconcile.ReconcileMismatch as exc:
                res = exc.payload
            self.final_results[f"{p:%Y-%m}"] = res

    # ---------------------------------------------------------------- Stripe reads
    def _customers(self) -> dict[str, str]:
        from billing.platform import db

        with db.connect() as cx:
            return dict(
                cx.execute("SELECT org_id, stripe_customer_id FROM billing.stripe_customers")
            )

    def stripe_items(self) -> dict[str, list]:
        """Every invoice item per org (from the emulator directly)."""
        from billing.platform import db

        client = self.direct()
        with db.connect() as cx:
            customers = dict(
                cx.execute("SELECT org_id, stripe_customer_id FROM billing.stripe_customers")
            )
        out: dict[str, list] = {}
        for org, cust in customers.items():
            items, params = [], {"customer": cust, "limit": 100}
            while True:
                page = client.v1.invoice_items.list(params=params)
                items.extend(x.to_dict() for x in page["data"])
                if not page["has_more"]:
                    break
                params["starting_after"] = page["data"][-1]["id"]
            out[org] = items
        return out

    # ---------------------------------------------------------------- invariants
    def check(self) -> dict:
        """Every invariant of the run: name -> {"ok": bool, the numbers behind it}."""
        from billing.platform import db

        with db.connect() as cx:
            inv = {
                "events_counted_once": self._check_events(cx),
                "quarantine_has_reasons": self._check_quarantine(cx),
            }
            facts = _Facts.read(cx)
            inv["plan_changes"] = self._check_plan_changes(cx)
        client = self.direct()
        items = self.stripe_items()
        notes = self.stripe_credit_notes(client)
        inv.update(self._check_stripe(facts, client, items, notes))
        inv["credits_applied_exactly"] = self._check_credits(facts, client, items)
        inv["corrections_after_close"] = self._check_corrections(facts, items, notes)
        inv["reconciled_or_incident"] = self._check_reconciled(facts)
        inv["dunning_once_per_stage"] = self._check_dunning(facts)
        parked = self.parked_count()
        inv["parked_queue_empty"] = {
            "ok": parked == 0 and facts.outbox_status.get("parked", 0) == 0,
            "redis_parked": parked,
            "outbox_parked": facts.outbox_status.get("parked", 0),
        }
        inv["no_orphan_outbox_rows"] = self._check_outbox(facts, client)
        if hasattr(self, "rerun_check"):
            rc = self.rerun_check
            inv["rerun_changes_nothing"] = {
                "ok": rc["before"] == rc["after"],
                **rc,
            }
        return inv

    def _check_events(self, cx) -> dict:
        """Every valid line stored once: events, registry and manifest agree with the files."""
        n_events, n_distinct = cx.execute(
            "SELECT count(*), count(DISTINCT event_id) FROM billing.usage_events"
        ).fetchone()
        n_registry = cx.execute("SELECT count(*) FROM billing.usage_event_ids").fetchone()[0]
        exp = len(self.expected.valid_ids)
        accepted = cx.execute(
            "SELECT coalesce(sum(accepted + non_billable), 0), coalesce(sum(duplicate), 0) "
            "FROM billing.usage_files"
        ).fetchone()
        return {
            "ok": n_events == n_distinct == n_registry == exp == accepted[0]
            and accepted[1] == self.expected.duplicates,
            "usage_events": n_events,
            "distinct_event_ids": n_distinct,
            "registry": n_registry,
            "expected_unique_valid": exp,
            "manifest_accepted": int(accepted[0]),
            "duplicates": int(accepted[1]),
            "expected_duplicates": self.expected.duplicates,
            "lines_written": self.expected.lines,
        }

    def _check_quarantine(self, cx) -> dict:
        """Every bad line quarantined, each with a reason and a detail."""
        q_total, q_noreason = cx.execute(
            """SELECT count(*), count(*) FILTER (WHERE reason IS NULL OR reason = ''
                      OR detail IS NULL OR detail = '') FROM billing.usage_quarantine"""
        ).fetchone()
        reasons = dict(
            cx.execute(
                "SELECT reason, count(*) FROM billing.usage_quarantine GROUP BY 1 ORDER BY 1"
            ).fetchall()
        )
        return {
            "ok": q_noreason == 0 and q_total == self.expected.bad_lines,
            "quarantined": q_total,
            "expected_bad_lines": self.expected.bad_lines,
            "without_reason": q_noreason,
            "by_reason": reasons,
        }

    def _check_stripe(self, facts: _Facts, client, items: dict, notes: list) -> dict:
        """Stripe per org/period vs snapshot, to the cent; no idempotency key twice.

        Per org and period: its invoice items (on its own invoice or, late, on a later one,
        correction items included) - its credit notes - its prepaid credit items = the
        snapshot's total - the credits applied to it (billing.credit_applications)."""
        applied: dict[tuple[str, dt.date], int] = defaultdict(int)
        for _g, org, p, cents, _key in facts.applications:
            applied[(org, p)] += int(cents)
        credit_side: dict[tuple[str, dt.date], int] = defaultdict(int)
        after_close: dict[tuple[str, dt.date], int] = defaultdict(int)
        stripe_side: dict[tuple[str, dt.date], int] = defaultdict(int)
        # Items of period P that P's own invoice collected (late ones land on a later invoice).
        on_own_invoice: dict[tuple[str, dt.date], int] = defaultdict(int)
        invoice_of = {iid: k for k, (_, iid) in facts.closes.items()}
        keys: Counter = Counter()
        for org, its in items.items():
            for ii in its:
                meta = dict(ii.get("metadata") or {})
                keys[meta.get("idempotency_key")] += 1
                p = parse_period(meta["period"])
                stripe_side[(org, p)] += int(ii["amount"])
                if meta.get("kind") == "credit":  # prepaid credit: checked against applied
                    credit_side[(org, p)] += int(ii["amount"])
                elif invoice_of.get(ii.get("invoice")) == (org, p):
                    on_own_invoice[(org, p)] += int(ii["amount"])
                else:  # pushed after its close (late usage, corrections): a later invoice
                    after_close[(org, p)] += int(ii["amount"])
        # Corrections after finalization: a period's credit notes lower what it billed.
        for org, cn in notes:
            meta = dict(cn.get("metadata") or {})
            if cn["status"] != "void" and meta.get("period"):
                stripe_side[(org, parse_period(meta["period"]))] -= int(cn["total"])
        invoices_total = {
            k: int(client.v1.invoices.retrieve(iid)["total"])
            for k, (_, iid) in facts.closes.items()
        }
        diffs, unbilled = [], {}
        for k in sorted(set(facts.snapshot) | set(stripe_side) | set(applied)):
            now = facts.snapshot.get(k, (0, None))[0] - applied.get(k, 0)
            closed = self.closed_at.get(k)
            got = stripe_side.get(k, 0)
            if credit_side.get(k, 0) != -applied.get(k, 0):
                diffs.append(
                    {
                        "org_id": k[0],
                        "period": f"{k[1]:%Y-%m}",
                        "credits_applied_cents": applied.get(k, 0),
                        "stripe_credit_items_cents": credit_side.get(k, 0),
                    }
                )
            # Every period's items add up to the snapshot now, late events included; a
            # closed invoice carries exactly the snapshot it was closed from.
            if now != got or (closed is not None and on_own_invoice.get(k, 0) != closed):
                diffs.append(
                    {
                        "org_id": k[0],
                        "period": f"{k[1]:%Y-%m}",
                        "snapshot_cents": now + applied.get(k, 0),
                        "credits_applied_cents": applied.get(k, 0),
                        "snapshot_at_close": closed,
                        "stripe_items_cents": got,
                        "stripe_items_on_own_invoice": on_own_invoice.get(k, 0),
                        "stripe_invoice_total": invoices_total.get(k),
                    }
                )
            if closed is not None and now != got:
                unbilled[f"{k[0]}:{k[1]:%Y-%m}"] = {
                    "snapshot_at_close": closed,
                    "snapshot_now": now,
                    "stripe_items_cents": got,
                    "unbilled_cents": now - got,
                    "billable_events_after_close": facts.late_after_close.get(k, 0),
                }
        doubled = {k: n for k, n in keys.items() if n > 1}
        return {
            "stripe_equals_snapshot": {
                "ok": not diffs and not doubled and len(invoices_total) == len(self.closed_at),
                "rule": "every period: Stripe items (correction and credit items included) - "
                "credit notes = snapshot now - credits applied; closed: the items its own "
                "invoice collected (credits aside) = snapshot the close was made from",
                "credit_notes": sum(1 for _, cn in notes if cn["status"] != "void"),
                "credits_applied_cents": sum(applied.values()),
                "org_periods": len(set(facts.snapshot) | set(stripe_side)),
                "closed_invoices": len(invoices_total),
                "stripe_items": sum(len(v) for v in items.values()),
                "total_cents": sum(stripe_side.values()),
                "differences": diffs,
                "idempotency_keys_doubled": doubled,
            },
            "no_usage_after_close": {
                "ok": not unbilled,
                "note": "late events that arrive after their period's Stripe invoice was "
                "finalized are pushed as items of that period, collected by the next invoice",
                "late_cents_pushed_after_close": sum(after_close.get(k, 0) for k in self.closed_at),
                "unbilled_cents_total": sum(v["unbilled_cents"] for v in unbilled.values()),
                "billable_events_after_close": sum(facts.late_after_close.values()),
                "org_periods": unbilled,
            },
        }

    def stripe_credit_notes(self, client) -> list[tuple[str, Any]]:
        """Every credit note per org (from the emulator directly): (org, credit note)."""
        out = []
        for org, cust in sorted(self._customers().items()):
            for cn in client.v1.credit_notes.list(
                params={"customer": cust, "limit": 100}
            ).auto_paging_iter():
                out.append((org, cn.to_dict()))
        return out

    def _check_credits(self, facts: _Facts, client, items: dict) -> dict:
        """Prepaid credits applied exactly: each closed invoice takes min(balance, its total)
        from the org's usable grants, oldest expiring first (never expiring last, then by
        grant), computed here from the simulation's own grants and each invoice's Stripe lines;
        billing.credit_applications and Stripe's credit items both say exactly that, no grant
        applies twice to an invoice and no invoice goes below zero."""
        lines: dict[str, int] = defaultdict(int)  # invoice -> its lines, credits aside
        stripe_credit: dict[tuple, int] = defaultdict(int)
        stripe_credit_n: Counter = Counter()
        for org, its in items.items():
            for ii in its:
                meta = dict(ii.get("metadata") or {})
                if meta.get("kind") == "credit":
                    k = (org, f"{parse_period(meta['period']):%Y-%m}", int(meta["grant_id"]))
                    stripe_credit[k] += -int(ii["amount"])
                    stripe_credit_n[k] += 1
                elif ii.get("invoice"):
                    lines[ii["invoice"]] += int(ii["amount"])
        remaining = {g["grant_id"]: g["amount_cents"] for g in self.grants}
        expected: dict[tuple, int] = {}
        invoices = {}
        for (org, p), (_st, iid) in sorted(facts.closes.items(), key=lambda kv: (kv[0][1], kv)):
            left = max(0, lines.get(iid, 0))
            usable = sorted(
                (
                    g
                    for g in self.grants
                    if g["org_id"] == org
                    and remaining[g["grant_id"]] > 0
                    and (g["valid_through"] is None or g["valid_through"] >= month_end(p))
                ),
                key=lambda g: (g["valid_through"] is None, g["valid_through"] or p, g["grant_id"]),
            )
            for g in usable:
                take = min(remaining[g["grant_id"]], left)
                if take > 0:
                    expected[(org, f"{p:%Y-%m}", g["grant_id"])] = take
                    remaining[g["grant_id"]] -= take
                    left -= take
            invoices[iid] = (org, p)
        recorded: dict[tuple, int] = defaultdict(int)
        per_grant_period: Counter = Counter()
        for gid, org, p, cents, _key in facts.applications:
            recorded[(org, f"{p:%Y-%m}", gid)] += int(cents)
            per_grant_period[(gid, p)] += 1
        twice = [f"grant {g} {p:%Y-%m}" for (g, p), n in per_grant_period.items() if n > 1]
        twice += [f"stripe {k}" for k, n in stripe_credit_n.items() if n > 1]
        over = []
        for iid, (org, p) in sorted(invoices.items()):
            credited = sum(
                v for (o, pp, _), v in recorded.items() if (o, pp) == (org, f"{p:%Y-%m}")
            )
            if not credited:
                continue
            total = int(client.v1.invoices.retrieve(iid)["total"])
            if credited > lines.get(iid, 0) or total < 0:
                over.append(
                    {
                        "invoice": iid,
                        "org_id": org,
                        "lines_cents": lines.get(iid, 0),
                        "credited_cents": credited,
                        "stripe_total": total,
                    }
                )
        key = lambda d: {f"{o} {p} grant {g}": v for (o, p, g), v in sorted(d.items())}  # noqa: E731
        return {
            "ok": expected == dict(recorded) == dict(stripe_credit) and not twice and not over,
            "rule": "applied = min(balance, invoice total), oldest expiring first; "
            "credit_applications = Stripe credit items = expected",
            "grants": len(self.grants),
            "applications": len(recorded),
            "applied_cents": sum(recorded.values()),
            "expected": key(expected),
            "credit_applications": key(recorded),
            "stripe_credit_items": key(stripe_credit),
            "applied_twice": twice,
            "above_invoice_total": over,
            "remaining_cents": {f"grant {g}": v for g, v in sorted(remaining.items())},
        }

    def _check_plan_changes(self, cx) -> dict:
        """The scheduled subscription edits were recorded (as 'simulate'), the upgraded month
        is priced in segments, the base fee was re-prorated in Stripe, and the cancelled org
        is charged nothing from its cancellation on though its usage still arrives."""
        logged = dict(
            cx.execute(
                """SELECT action, count(*) FROM billing.subscription_changes
                    WHERE changed_by = 'simulate' GROUP BY 1"""
            ).fetchall()
        )
        not_written = [f"{c['kind']}:{c['org_id']}" for c in self.plan_changes if c["written"] == 0]
        segments = 0
        if self.schedule["plan_upgrade"] is not None:
            period = period_of(self.days[self.first_close])
            segments = cx.execute(
                sql.SQL(
                    """SELECT count(DISTINCT charge_label) FROM {}
                        WHERE org_id = %s AND period_start = %s AND charge_label LIKE '%% from %%'"""
                ).format(_snapshot("fct_daily_charges")),
                (self.upgrade_org, period),
            ).fetchone()[0]
        base_fee_adjustments = cx.execute(
            """SELECT count(*) FROM billing.stripe_outbox
                WHERE kind IN ('usage_item', 'credit_note') AND metric = 'base_fee'
                  AND status = 'sent'"""
        ).fetchone()[0]
        cancel = next((c for c in self.plan_changes if c["kind"] == "plan_cancel"), None)
        charged_after, events_after = 0, 0
        if cancel:
            charged_after = cx.execute(
                sql.SQL(
                    """SELECT count(*) FROM {} WHERE org_id = %s AND usage_date >= %s"""
                ).format(_snapshot("fct_daily_charges")),
                (cancel["org_id"], cancel["effective"]),
            ).fetchone()[0]
            events_after = cx.execute(
                """SELECT count(*) FROM billing.usage_events
                    WHERE org_id = %s AND billable AND occurred_at >= %s""",
                (cancel["org_id"], cancel["effective"]),
            ).fetchone()[0]
        upgraded = self.schedule["plan_upgrade"] is not None
        return {
            "ok": not not_written
            and charged_after == 0
            and (not upgraded or (segments > 0 and base_fee_adjustments > 0)),
            "plan_changes": len(self.plan_changes),
            "changes": [
                {
                    **c,
                    "effective": c["effective"].isoformat(),
                    "recorded_on": c["recorded_on"].isoformat(),
                }
                for c in self.plan_changes
            ],
            "change_rows_logged": logged,
            "not_written": not_written,
            "segment_labels_of_upgraded_month": segments,
            "base_fee_adjustments_sent": base_fee_adjustments,
            "cancelled_org_charge_rows_after_cancel": charged_after,
            "cancelled_org_billable_events_after_cancel": events_after,
        }

    def _check_corrections(self, facts: _Facts, items: dict, notes: list) -> dict:
        """Corrections after finalization: the late event became a 'Correction for P' item
        tagged P; the retroactive downgrade's rerate wrote credit notes once; the same rerate
        run again wrote nothing; every rerate write reached Stripe exactly once."""
        correction_items = []
        for org, its in items.items():
            for ii in its:
                meta = dict(ii.get("metadata") or {})
                if meta.get("correction_of"):
                    correction_items.append(
                        (org, meta["correction_of"], meta.get("idempotency_key"), int(ii["amount"]))
                    )
        live_notes = [(o, cn) for o, cn in notes if cn["status"] != "void"]
        note_keys = Counter(
            dict(cn.get("metadata") or {}).get("idempotency_key") for _, cn in live_notes
        )
        item_keys = Counter(k for _, _, k, _ in correction_items)
        closed = (
            f"{period_of(self.days[self.first_close]):%Y-%m}"
            if self.first_close is not None
            else None
        )
        late_ok = True
        if self.schedule["late_event"] is not None:
            late_ok = any(o == self.late_org and p == closed for o, p, _, _ in correction_items)
        rerate = {}
        rerate_ok = True
        if self.rerates:
            first = [r for r in self.rerates if r["attempt"] == 1]
            again = [r for r in self.rerates if r["attempt"] > 1]
            keys = [c["idempotency_key"] for r in first for c in r["enqueued"]]
            in_stripe = {k: note_keys.get(k, 0) + item_keys.get(k, 0) for k in keys}
            kinds = Counter(c["kind"] for r in first for c in r["enqueued"])
            rerate = {
                "first_outbox_rows": sum(r["outbox_rows_written"] for r in first),
                "first_kinds": dict(kinds),
                "first_cents": sum(c["amount_cents"] for r in first for c in r["enqueued"]),
                "again_outbox_rows": sum(r["outbox_rows_written"] for r in again),
                "again_enqueued": sum(len(r["enqueued"]) for r in again),
                "again_corrections_planned": sum(len(r["corrections"]) for r in again),
                "keys_in_stripe": in_stripe,
            }
            rerate_ok = (
                kinds.get("credit_note", 0) > 0
                and rerate["first_outbox_rows"] == len(keys)
                and rerate["again_outbox_rows"] == 0
                and rerate["again_enqueued"] == 0
                and all(n == 1 for n in in_stripe.values())
            )
        doubled = {k: n for k, n in (note_keys + item_keys).items() if n > 1}
        return {
            "ok": late_ok and rerate_ok and not doubled,
            "correction_items": len(correction_items),
            "correction_items_cents": sum(a for _, _, _, a in correction_items),
            "late_event_org_has_correction_item": late_ok,
            "credit_notes": len(live_notes),
            "credit_notes_cents": sum(int(cn["total"]) for _, cn in live_notes),
            "rerate": rerate,
            "rerate_applied_once": rerate_ok,
            "keys_doubled": doubled,
        }

    def _check_reconciled(self, facts: _Facts) -> dict:
        """Reconciled within tolerance, or an incident names the org/period."""
        open_inc = defaultdict(set)
        for p, org_ids, _status in facts.incidents:
            for o in org_ids:
                open_inc[p].add(o)
        bad = [
            {"org_id": o, "period": f"{p:%Y-%m}", "status": status}
            for (o, p), (status, above) in sorted(facts.audit.items())
            if above and o not in open_inc[p]
        ]
        unreconciled = [
            f"{o}:{p:%Y-%m}"
            for (o, p) in sorted(set(facts.snapshot) | set(facts.closes))
            if (o, p) not in facts.audit
        ]
        return {
            "ok": not bad and not unreconciled,
            "org_periods": len(facts.audit),
            "latest": dict(Counter(s for s, _ in facts.audit.values())),
            "above_tolerance_without_incident": bad,
            "never_reconciled": unreconciled,
            "incidents": len(facts.incidents),
            "runs": self.reconcile_runs,
            "runs_failed": self.reconcile_failed_runs,
        }

    def _check_dunning(self, facts: _Facts) -> dict:
        """Each stage at most once per invoice (rows and e-mails); unpaid got all."""
        notices = facts.notices
        sent = Counter((i, s) for i, _, s, st, _ in notices if st == "sent")
        mails = self.mail_message_ids()
        dunning_mails = {m: n for m, n in mails.items() if m.startswith("<dunning.")}
        twice = [f"{i}:{s}" for (i, s), n in sent.items() if n > 1]
        twice += [m for m, n in dunning_mails.items() if n > 1]
        stages_by_invoice = defaultdict(list)
        skipped_by_invoice = defaultdict(list)
        for i, o, s, st, _ in notices:
            if st == "sent":
                stages_by_invoice[(i, o)].append(s)
            elif st == "skipped":
                skipped_by_invoice[(i, o)].append(s)
        missing_stages = self._missing_stages(facts, stages_by_invoice, skipped_by_invoice)
        paid_dunned = [
            f"{i}:{s}"
            for i, o, s, st, _ in notices
            if st == "sent" and self.group(o) == "prompt" and i in self.payments
        ]
        return {
            "ok": not twice and not missing_stages and not paid_dunned,
            "notices_sent": sum(sent.values()),
            "emails": sum(dunning_mails.values()),
            "by_stage": dict(Counter(s for (_, s) in sent)),
            "sent_twice": twice,
            "unpaid_missing_stages": missing_stages,
            "paid_at_once_but_dunned": paid_dunned,
            "invoices": {
                iid: {"org": o, "status": st, "stages": stages_by_invoice.get((iid, o), [])}
                for (o, _), (st, iid) in sorted(facts.closes.items())
            },
        }

    def _missing_stages(self, facts: _Facts, sent_by_invoice, skipped_by_invoice) -> dict:
        """Open invoices of never-paying orgs whose due stages were not all sent."""
        from billing import dunning

        policy = dunning.load_policy()
        missing = {}
        for (o, _p), (status, iid) in facts.closes.items():
            if status != "open" or self.group(o) != "never":
                continue
            # Every stage due by the last dunning run (as of the morning after the run) is
            # sent, except a leading run of stages recorded 'skipped': the invoice was
            # first seen open when they were already past (e.g. its finalisation was
            # parked by a Stripe failure and retried a day later). Never a gap after.
            overdue = (self.days[-1] + dt.timedelta(days=1) - facts.due_on[iid]).days
            want = [s.name for s in policy.for_plan(facts.plans[o]) if s.days_past_due <= overdue]
            got = sent_by_invoice.get((iid, o), [])
            skipped = skipped_by_invoice.get((iid, o), [])
            k = len(skipped)
            if not got or sorted(skipped) != sorted(want[:k]) or sorted(got) != sorted(want[k:]):
                missing[iid] = {"want": want, "sent": got, "skipped": skipped}
        return missing

    def _check_outbox(self, facts: _Facts, client) -> dict:
        """Every outbox row sent (its Stripe object exists) or cancelled."""
        import stripe

        fetch = {
            "customer": client.v1.customers.retrieve,
            "usage_item": client.v1.invoice_items.retrieve,
            "base_fee": client.v1.invoice_items.retrieve,
            "invoice": client.v1.invoices.retrieve,
            "finalize": client.v1.invoices.retrieve,
            "credit_note": client.v1.credit_notes.retrieve,
            "credit": client.v1.invoice_items.retrieve,
        }
        missing_objects = []
        for kind, key, obj_id in facts.sent_rows:
            try:
                if not obj_id:
                    raise LookupError
                fetch[kind](obj_id)
            except (stripe.InvalidRequestError, LookupError):
                missing_objects.append(key)
        outbox_status = facts.outbox_status
        open_rows = {s: n for s, n in outbox_status.items() if s not in ("sent", "cancelled")}
        return {
            "ok": not open_rows and not missing_objects,
            "by_status": outbox_status,
            "not_sent_or_cancelled": open_rows,
            "sent_without_stripe_object": missing_objects,
        }

    def mail_message_ids(self) -> Counter:
        out: Counter = Counter()
        for p in Path(os.environ["BILLING_MAIL_DIR"]).glob("*.eml"):
            with open(p, "rb") as fh:
                msg = email.message_from_binary_file(fh)
            mid = (msg.get("Message-ID") or "").strip()
            if mid:
                out[mid] += 1
        return out


def _policy_yaml(step: int) -> str:
    days = {s: 1 + step * i for i, s in enumerate(STAGES)}
    lines = [
        f"# Compressed dunning policy written by billing simulate (one stage every {step} day(s)).",
        "version: 1",
        "stages:",
        f"  - {{name: reminder, days_past_due: {days['reminder']}, action: notice}}",
        f"  - {{name: second_notice, days_past_due: {days['second_notice']}, action: notice}}",
        f"  - {{name: final_notice, days_past_due: {days['final_notice']}, action: notice}}",
        f"  - {{name: service_degraded, days_past_due: {days['service_degraded']}, action: degrade}}",
        f"  - {{name: escalation, days_past_due: {days['escalation']}, action: escalate}}",
        "minimum_amount_due: {usd: 500, eur: 500, gbp: 500, jpy: 500}",
        "degradation: {enabled: true}",
        'pay_link: "https://billing.example.test/pay/{stripe_invoice_id}"',
        'support_contact: "billing-support@example.test"',
        "plan_overrides:",
        "  enterprise:",
        "    degradation: {enabled: false}",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ entry points
def run(cfg: Config) -> dict:
    """Run the simulation on a fresh private stack; return the report (never raises for a
    failed invariant: ``report["ok"]`` says)."""
    from billing.platform import settings

    stack_dir = cfg.stack_dir or settings.PROJECT_DIR / ".local" / "simulate"
    started = time.perf_counter()
    stack = prepare_environment(Path(stack_dir))
    sim = Simulation(cfg, stack)
    try:
        sim.setup()
        t = time.perf_counter()
        sim.run_days()
        run_seconds = time.perf_counter() - t
        try:
            invariants = sim.check()
        except Exception as exc:  # a broken check must not throw the run's evidence away
            log.exception("invariant checks crashed")
            invariants = {"checks_ran": {"ok": False, "error": f"{type(exc).__name__}: {exc}"}}
    finally:
        if sim.proxy:
            sim.proxy.stop()
        if not cfg.keep_stack:
            stack.down()
    events = cfg.days * cfg.events_per_day
    report = {
        "ok": all(v["ok"] for v in invariants.values()),
        "config": {
            k: str(v) if isinstance(v, Path | dt.date) else v for k, v in asdict(cfg).items()
        },
        "days": [d.isoformat() for d in sim.days],
        "dunning_step_days": sim.dunning_step,
        "schedule": {k: sim.days[v].isoformat() for k, v in sim.schedule.items() if v is not None},
        "invariants": invariants,
        "faults": {
            "events": sim.events_log,
            "stripe_injected": dict(sim.proxy.injected) if sim.proxy else {},
            "stripe_forwarded": sim.proxy.forwarded if sim.proxy else 0,
        },
        "timing": {
            "total_seconds": round(time.perf_counter() - started, 1),
            "days_seconds": round(run_seconds, 1),
            "per_day_seconds": [round(x, 2) for x in sim.day_seconds],
            "per_event_ms": round(1000 * run_seconds / max(1, events), 4),
            "steps_seconds": {k: round(v, 2) for k, v in sorted(sim.timings.items())},
        },
    }
    return report


def format_report(report: dict) -> str:
    lines = [
        f"billing simulate: {len(report['days'])} days {report['days'][0]} .. {report['days'][-1]}, "
        f"faults={report['config']['faults']}, seed={report['config']['seed']}",
        "",
        "invariants:",
    ]
    for name, v in report["invariants"].items():
        detail = {
            k: x
            for k, x in v.items()
            if k != "ok" and k not in ("invoices", "note", "before", "after") and x not in ({}, [])
        }
        lines.append(
            f"  {'PASS' if v['ok'] else 'FAIL'}  {name}: {json.dumps(detail, default=str)}"
        )
    f = report["faults"]
    lines += [
        "",
        f"Stripe faults injected: {json.dumps(f['stripe_injected'])} "
        f"(requests forwarded: {f['stripe_forwarded']})",
        "timeline (faults and business events):",
        *(
            f"  {e['day']} {e['event']} "
            + " ".join(f"{k}={v}" for k, v in e.items() if k not in ("day", "event"))
            for e in f["events"]
            if e["event"] != "paid"
        ),
        "",
        f"time: {report['timing']['days_seconds']} s for {len(report['days'])} days "
        f"({report['timing']['days_seconds'] / len(report['days']):.1f} s/day, "
        f"{report['timing']['per_event_ms']} ms/event); steps: "
        + json.dumps(report["timing"]["steps_seconds"]),
        f"result: {'all invariants hold' if report['ok'] else 'INVARIANTS FAILED'}",
    ]
    return "\n".join(lines)


def _quiet_logs() -> None:
    """The steps log per request at INFO; the simulation prints its own timeline."""
    for name in ("billing", "stripe", "great_expectations", "airflow", "cosmos", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


def main(args) -> int:
    if not args.verbose:
        _quiet_logs()
    cfg = Config(
        days=args.days,
        orgs=args.orgs,
        events_per_day=args.events_per_day,
        seed=args.seed,
        start=args.start,
        faults=args.faults,
        stack_dir=Path(args.stack_dir) if args.stack_dir else None,
        keep_stack=args.keep_stack,
        dunning_step=args.dunning_step,
        dag_day=-1 if args.no_dag else None,
        quiet=args.json,
    )
    report = run(cfg)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1, default=str))
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print()
        print(format_report(report))
    return 0 if report["ok"] else 1
