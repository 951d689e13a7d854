"""Dunning: staged notices for overdue Stripe invoices, each sent exactly once.

Playbook "Dunning policy": thresholds for overdue invoices, staged email notices, optional
service degradation, an escalation path. The policy is version-controlled YAML
(``include/config/dunning.yaml``), the wording Jinja2 templates owned by Finance and
approved by Legal (``include/templates/dunning/``); docs/DUNNING.md is the contract.

Exactly once: each (invoice, stage) is a ``billing.dunning_notices`` row, claimed (with
its Message-ID) in a committed transaction before the send and marked ``sent`` after.
A crash in between leaves ``claimed``; the next run resends it with the same Message-ID,
so the receiving side can drop the duplicate. Refused recipients leave ``failed`` rows
that the next run retries. Nothing here knows about Airflow: the DAG and the CLI pass
the run day.
"""

from __future__ import annotations

import datetime as dt
import logging
import smtplib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import yaml

from billing.platform import settings
from billing.platform.errors import BillingError, ConfigError

log = logging.getLogger(__name__)

ACTIONS = ("notice", "degrade", "escalate")
# billing.dunning_notices.status (migration 0040): the status labels of
# billing_dunning_notices_total, exported from 0 for every stage of the policy.
NOTICE_STATUSES = ("claimed", "sent", "failed", "skipped", "cancelled")
NORMAL, DEGRADED = "normal", "degraded"
REDIS_KEY = "billing:org:{org_id}:service_level"
# Errors of one message (a refused recipient, a dropped connection): recorded and retried.
SEND_ERRORS = (smtplib.SMTPException, OSError)


class TemplateError(BillingError):
    """A dunning template is missing or needs a variable the renderer does not provide."""


# ---------------------------------------------------------------- policy
@dataclass(frozen=True)
class Stage:
    name: str
    days_past_due: int
    action: str  # notice | degrade | escalate


@dataclass(frozen=True)
class DunningPolicy:
    stages: tuple[Stage, ...]
    minimum_amount_due: Mapping[str, int]
    degradation_enabled: bool
    pay_link: str
    support_contact: str
    plan_overrides: Mapping[str, dict] = field(default_factory=dict)

    def for_plan(self, plan: str) -> DunningPolicy:
        """The policy for one plan: overrides applied, degrade stages dropped when disabled."""
        o = self.plan_overrides.get(plan, {})
        days = o.get("stages", {})
        stages = tuple(replace(s, days_past_due=days.get(s.name, s.days_past_due)) for s in self)
        enabled = o.get("degradation_enabled", self.degradation_enabled)
        if not enabled:
            stages = tuple(s for s in stages if s.action != "degrade")
        return replace(
            self,
            stages=stages,
            minimum_amount_due=MappingProxyType(
                {**self.minimum_amount_due, **o.get("minimum_amount_due", {})}
            ),
            degradation_enabled=enabled,
            plan_overrides={},
        )

    def __iter__(self):
        return iter(self.stages)

    def minimum(self, currency: str) -> int:
        return self.minimum_amount_due.get(currency.lower(), 0)

    def current_stage(self, days_overdue: int) -> Stage | None:
        due = [s for s in self.stages if s.days_past_due <= days_overdue]
        return due[-1] if due else None

    def degrade_stage(self) -> Stage | None:
        return next((s for s in self.stages if s.action == "degrade"), None)


def _fail(path: Path, where: str, problem: str):
    raise ConfigError(f"dunning policy {path}: {where}: {problem}")


def _int(path, where, value, minimum=0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(path, where, f"expected an integer >= {minimum}, got {value!r}")
    return value


def _bool(path, where, value) -> bool:
    if not isinstance(value, bool):
        _fail(path, where, f"expected true or false, got {value!r}")
    return value


def _minimums(path, where, value) -> dict[str, int]:
    from billing.pricing.catalog import CURRENCIES

    if not isinstance(value, dict):
        _fail(path, where, "expected a mapping currency -> minor units")
    out = {}
    for cur, amount in value.items():
        if str(cur).lower() not in CURRENCIES:
            _fail(
                path, f"{where}.{cur}", f"unsupported currency (supported: {', '.join(CURRENCIES)})"
            )
        out[str(cur).lower()] = _int(path, f"{where}.{cur}", amount)
    return out


def _degradation(path, where, value) -> bool:
    if not isinstance(value, dict) or set(value) != {"enabled"}:
        _fail(path, where, "expected {enabled: true|false}")
    return _bool(path, f"{where}.enabled", value["enabled"])


def _check_order(path, where, stages) -> None:
    for a, b in zip(stages, stages[1:], strict=False):
        if b.days_past_due <= a.days_past_due:
            _fail(
                path,
                where,
                f"days_past_due must increase: {b.name} ({b.days_past_due}) "
                f"comes after {a.name} ({a.days_past_due})",
            )


def parse_policy(doc, path: Path) -> DunningPolicy:
    """Validate a policy document; every problem names its field."""
    _check_fields(path, doc)
    stages = _stages(path, doc.get("stages"))
    _texts(path, doc)
    minimums = _minimums(path, "minimum_amount_due", doc.get("minimum_amount_due", {}))
    enabled = _degradation(path, "degradation", doc.get("degradation", {"enabled": False}))
    overrides = _plan_overrides(path, doc.get("plan_overrides") or {}, stages)
    return DunningPolicy(
        tuple(stages),
        MappingProxyType(minimums),
        enabled,
        doc["pay_link"],
        doc["support_contact"],
        MappingProxyType(overrides),
    )


def _check_fields(path, doc) -> None:
    if not isinstance(doc, dict):
        _fail(path, "(top level)", "expected a mapping")
    known = {"version", "stages", "minimum_amount_due", "degradation", "pay_link"}
    known |= {"support_contact", "plan_overrides"}
    for key in doc:
        if key not in known:
            _fail(path, str(key), f"unknown field (expected one of {', '.join(sorted(known))})")
    if doc.get("version") != 1:
        _fail(path, "version", f"expected 1, got {doc.get('version')!r}")


def _stages(path, raw) -> list[Stage]:
    if not isinstance(raw, list) or not raw:
        _fail(path, "stages", "expected a non-empty list")
    stages, names = [], set()
    for i, s in enumerate(raw):
        where = f"stages[{i}]"
        if not isinstance(s, dict) or set(s) - {"name", "days_past_due", "action"}:
            _fail(path, where, "expected {name, days_past_due, action}")
        name = s.get("name")
        if not isinstance(name, str) or not name.isidentifier():
            _fail(path, f"{where}.name", f"expected an identifier, got {name!r}")
        if name in names:
            _fail(path, f"{where}.name", f"duplicate stage {name!r}")
        names.add(name)
        if s.get("action") not in ACTIONS:
            _fail(
                path,
                f"{where}.action",
                f"expected one of {', '.join(ACTIONS)}, got {s.get('action')!r}",
            )
        days = _int(path, f"{where}.days_past_due", s.get("days_past_due"), minimum=1)
        stages.append(Stage(name, days, s["action"]))
    _check_order(path, "stages", stages)
    if sum(s.action == "degrade" for s in stages) > 1:
        _fail(path, "stages", "at most one stage may have action degrade")
    return stages


def _texts(path, doc) -> None:
    """pay_link and support_contact: non-empty, and the link uses only its two variables."""
    for key in ("pay_link", "support_contact"):
        if not isinstance(doc.get(key), str) or not doc[key].strip():
            _fail(path, key, "expected a non-empty string")
    try:
        doc["pay_link"].format(stripe_invoice_id="x", org_id="x")
    except (KeyError, IndexError, ValueError) as exc:
        _fail(path, "pay_link", f"may only use {{stripe_invoice_id}} and {{org_id}} ({exc})")


def _plan_overrides(path, raw, stages: list[Stage]) -> dict[str, dict]:
    if not isinstance(raw, dict):
        _fail(path, "plan_overrides", "expected a mapping plan -> overrides")
    overrides = {
        str(plan): _plan_override(path, f"plan_overrides.{plan}", o, stages)
        for plan, o in raw.items()
    }
    for plan, entry in overrides.items():
        days = entry.get("stages", {})
        moved = [replace(s, days_past_due=days.get(s.name, s.days_past_due)) for s in stages]
        _check_order(path, f"plan_overrides.{plan}.stages", moved)
    return overrides


def _plan_override(path, where: str, o, stages: list[Stage]) -> dict:
    if not isinstance(o, dict) or set(o) - {"stages", "minimum_amount_due", "degradation"}:
        _fail(path, where, "expected any of stages, minimum_amount_due, degradation")
    entry: dict = {}
    if "stages" in o:
        if not isinstance(o["stages"], dict):
            _fail(path, f"{where}.stages", "expected a mapping stage -> days_past_due")
        names = {s.name for s in stages}
        for name, days in o["stages"].items():
            if name not in names:
                _fail(path, f"{where}.stages.{name}", "no such stage in stages")
            _int(path, f"{where}.stages.{name}", days, minimum=1)
        entry["stages"] = dict(o["stages"])
    if "minimum_amount_due" in o:
        entry["minimum_amount_due"] = _minimums(
            path, f"{where}.minimum_amount_due", o["minimum_amount_due"]
        )
    if "degradation" in o:
        entry["degradation_enabled"] = _degradation(path, f"{where}.degradation", o["degradation"])
    return entry


def load_policy(path: Path | None = None) -> DunningPolicy:
    path = Path(path or settings.dunning_policy_path())
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"dunning policy {path}: file not found (BILLING_DUNNING_POLICY)"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"dunning policy {path}: not valid YAML: {exc}") from None
    return parse_policy(doc, path)


# ---------------------------------------------------------------- templates
# Every template gets exactly these variables (docs/DUNNING.md); anything else fails.
VARIABLES = (
    "stage",
    "org_id",
    "org_name",
    "org_email",
    "invoice_id",
    "period",
    "amount_due",
    "currency",
    "due_date",
    "days_overdue",
    "pay_link",
    "support_contact",
    "overdue_invoices",
    "overdue_total",
)


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str


def _environment():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    return Environment(
        loader=FileSystemLoader(settings.dunning_templates_dir()),
        undefined=StrictUndefined,
        autoescape=select_autoescape(enabled_extensions=("html.j2",), default=False),
        keep_trailing_newline=True,
    )


def render(stage: str, variables: Mapping, env=None) -> Rendered:
    """Render a stage's text and HTML; the text template's first line is ``Subject: ...``."""
    from jinja2 import TemplateNotFound, TemplateSyntaxError, UndefinedError

    env = env or _environment()
    out = {}
    for kind in ("txt", "html"):
        name = f"{stage}.{kind}.j2"
        try:
            out[kind] = env.get_template(name).render(**variables)
        except TemplateNotFound:
            raise TemplateError(
                f"dunning template {name} not found in {settings.dunning_templates_dir()}"
            ) from None
        except UndefinedError as exc:
            raise TemplateError(
                f"dunning template {name}: {exc.message} "
                f"(provided variables: {', '.join(sorted(variables))}; see docs/DUNNING.md)"
            ) from None
        except TemplateSyntaxError as exc:
            raise TemplateError(
                f"dunning template {name} line {exc.lineno}: {exc.message}"
            ) from None
    first, _, body = out["txt"].partition("\n")
    if not first.startswith("Subject:") or not first[8:].strip():
        raise TemplateError(f"dunning template {stage}.txt.j2: first line must be 'Subject: ...'")
    return Rendered(first[8:].strip(), body.lstrip("\n"), out["html"])


def sample_variables() -> dict:
    """Placeholder values for checking every template before anything is sent."""
    row = {
        "invoice_id": "in_sample",
        "period": "2026-01",
        "amount_due": "$1.00",
        "due_date": "2026-02-01",
        "days_overdue": 1,
    }
    return {
        "stage": "sample",
        "org_id": "org-sample",
        "org_name": "Sample <Org> & Co",
        "org_email": "billing@sample.test",
        "currency": "USD",
        "pay_link": "https://pay.example.test/in_sample",
        "support_contact": "support@example.test",
        "overdue_invoices": [row],
        "overdue_total": "$1.00",
        **row,
    }


def check_templates(policy: DunningPolicy) -> None:
    """Render every stage with sample values: a broken template fails before any send."""
    env = _environment()
    for stage in policy.stages:
        render(stage.name, {**sample_variables(), "stage": stage.name}, env)


# ---------------------------------------------------------------- selection and decisions
@dataclass(frozen=True)
class OverdueInvoice:
    stripe_invoice_id: str
    org_id: str
    org_name: str
    org_email: str
    plan: str
    period: dt.date
    currency: str
    amount_remaining_cents: int
    due_date: dt.date
    days_overdue: int


def overdue_invoices(cx, as_of: dt.date, org_id: str | None = None) -> list[OverdueInvoice]:
    """Open invoices whose due day (UTC) is before ``as_of``, oldest first per org."""
    rows = cx.execute(
        """SELECT i.stripe_invoice_id, i.org_id, o.name, o.email,
                  -- the plan of the period's last subscription (docs/SUBSCRIPTIONS.md)
                  coalesce((SELECT s.plan FROM billing.subscriptions s
                             WHERE s.org_id = i.org_id
                               AND s.starts_at < (i.period + interval '1 month') AT TIME ZONE 'UTC'
                             ORDER BY s.starts_at DESC LIMIT 1), o.plan),
                  i.period,
                  lower(coalesce(i.currency, o.currency)),
                  coalesce(i.amount_remaining_cents, i.amount_due_cents, 0),
                  (i.due_at AT TIME ZONE 'UTC')::date
             FROM billing.stripe_invoices i
             JOIN billing.organizations o USING (org_id)
            WHERE i.status = 'open' AND i.due_at IS NOT NULL
              AND (i.due_at AT TIME ZONE 'UTC')::date < %(as_of)s
              AND (%(org)s::text IS NULL OR i.org_id = %(org)s)
            ORDER BY i.org_id, i.due_at, i.stripe_invoice_id""",
        {"as_of": as_of, "org": org_id},
    ).fetchall()
    return [OverdueInvoice(*r[:8], r[8], (as_of - r[8]).days) for r in rows]


@dataclass
class Decision:
    invoice: OverdueInvoice
    policy: DunningPolicy
    stage: Stage | None = None  # the notice to send (or resend) now
    skip: list[Stage] = field(default_factory=list)  # earlier stages never sent
    supersede: list[Stage] = field(default_factory=list)  # earlier claimed/failed rows
    outcome: str = ""  # send | resend | done | not_due | below_minimum | later_stage_exists


def decide(inv: OverdueInvoice, policy: DunningPolicy, existing: Mapping[str, str]) -> Decision:
    """What one invoice needs today, given its existing notice rows (stage -> status)."""
    p = policy.for_plan(inv.plan)
    d = Decision(inv, p)
    if inv.amount_remaining_cents < max(p.minimum(inv.currency), 1):
        d.outcome = "below_minimum"
        return d
    current = p.current_stage(inv.days_overdue)
    if current is None:
        d.outcome = "not_due"
        return d
    order = [s.name for s in p.stages]
    later = order[order.index(current.name) + 1 :]
    if any(name in existing for name in later):  # a backfill older than what already ran
        d.outcome = "later_stage_exists"
        return d
    for s in p.stages[: order.index(current.name)]:
        if s.name not in existing:
            d.skip.append(s)
        elif existing[s.name] in ("claimed", "failed"):
            d.supersede.append(s)
    status = existing.get(current.name)
    if status is None:
        d.stage, d.outcome = current, "send"
    elif status in ("claimed", "failed"):
        d.stage, d.outcome = current, "resend"
    else:
        d.outcome = "done"
    return d


def message_id(stripe_invoice_id: str, stage: str) -> str:
    """Stable per (invoice, stage): a resend carries the same id so receivers can dedupe."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in stripe_invoice_id)
    return f"<dunning.{safe}.{stage}@billing.local>"


def _variables(d: Decision, stage: Stage, org_invoices: list[OverdueInvoice]) -> dict:
    from billing.pricing.catalog import format_money

    inv = d.invoice

    def row(i: OverdueInvoice) -> dict:
        return {
            "invoice_id": i.stripe_invoice_id,
            "period": i.period.strftime("%Y-%m"),
            "amount_due": format_money(i.amount_remaining_cents, i.currency),
            "due_date": i.due_date.isoformat(),
            "days_overdue": i.days_overdue,
        }

    totals: dict[str, int] = {}
    for i in org_invoices:
        totals[i.currency] = totals.get(i.currency, 0) + i.amount_remaining_cents
    return {
        **row(inv),
        "stage": stage.name,
        "org_id": inv.org_id,
        "org_name": inv.org_name,
        "org_email": inv.org_email,
        "currency": inv.currency.upper(),
        "pay_link": d.policy.pay_link.format(
            stripe_invoice_id=inv.stripe_invoice_id, org_id=inv.org_id
        ),
        "support_contact": d.policy.support_contact,
        "overdue_invoices": [row(i) for i in org_invoices],
        "overdue_total": " + ".join(format_money(v, c) for c, v in sorted(totals.items())),
    }


# ---------------------------------------------------------------- the daily run
def _existing(cx, invoice_ids: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for inv, stage, status in cx.execute(
        """SELECT stripe_invoice_id, stage, status FROM billing.dunning_notices
            WHERE stripe_invoice_id = ANY(%s)""",
        (invoice_ids,),
    ):
        out.setdefault(inv, {})[stage] = status
    return out


def _insert(cx, d: Decision, stage: Stage, as_of, status, recipient=None, mid=None) -> bool:
    inv = d.invoice
    row = cx.execute(
        """INSERT INTO billing.dunning_notices
               (stripe_invoice_id, org_id, stage, days_past_due, days_overdue, as_of, status,
                recipient, message_id, currency, amount_due_cents)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (stripe_invoice_id, stage) DO NOTHING RETURNING notice_id""",
        (
            inv.stripe_invoice_id,
            inv.org_id,
            stage.name,
            stage.days_past_due,
            inv.days_overdue,
            as_of,
            status,
            recipient,
            mid,
            inv.currency,
            inv.amount_remaining_cents,
        ),
    ).fetchone()
    return row is not None


def _recipient(stage: Stage, inv: OverdueInvoice, addrs: Mapping[str, str]) -> str:
    return addrs["finance"] if stage.action == "escalate" else inv.org_email


def _record(cx, d: Decision, as_of: dt.date, addrs: Mapping[str, str]) -> int:
    """Skipped rows, superseded failures and the claim, in one transaction. Returns skips."""
    skipped = 0
    with cx.transaction():
        for s in d.skip:
            skipped += _insert(cx, d, s, as_of, "skipped")
        for s in d.supersede:
            cx.execute(
                """UPDATE billing.dunning_notices
                      SET status = 'cancelled', updated_at = now(),
                          error = concat_ws('; ', error, %s)
                    WHERE stripe_invoice_id = %s AND stage = %s
                      AND status IN ('claimed', 'failed')""",
                (
                    f"superseded by {d.stage.name if d.stage else 'a later stage'} on {as_of}",
                    d.invoice.stripe_invoice_id,
                    s.name,
                ),
            )
        if d.outcome == "send":
            mid = message_id(d.invoice.stripe_invoice_id, d.stage.name)
            _insert(cx, d, d.stage, as_of, "claimed", _recipient(d.stage, d.invoice, addrs), mid)
    return skipped


def _cancel_closed(cx) -> int:
    """Pending rows of invoices that are no longer open stop for good."""
    return cx.execute(
        """UPDATE billing.dunning_notices n
              SET status = 'cancelled', updated_at = now(),
                  error = concat_ws('; ', n.error, 'invoice ' || coalesce(
                      (SELECT i.status FROM billing.stripe_invoices i
                        WHERE i.stripe_invoice_id = n.stripe_invoice_id), 'missing'))
            WHERE n.status IN ('claimed', 'failed')
              AND NOT EXISTS (SELECT 1 FROM billing.stripe_invoices i
                               WHERE i.stripe_invoice_id = n.stripe_invoice_id
                                 AND i.status = 'open')"""
    ).rowcount


def _smtp_error(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "; ".join(
            f"{rcpt} refused: {code} {msg.decode(errors='replace') if isinstance(msg, bytes) else msg}"
            for rcpt, (code, msg) in exc.recipients.items()
        )
    return f"{type(exc).__name__}: {exc}"


def _send(
    cx, d: Decision, org_invoices: list[OverdueInvoice]
) -> tuple[str, str | None, str | None]:
    """Send a claimed/failed notice under its row lock. Returns (status, recipient, error)."""
    from billing.platform import mailer

    inv = d.invoice
    with cx.transaction():
        row = cx.execute(
            """SELECT notice_id, status, recipient, message_id FROM billing.dunning_notices
                WHERE stripe_invoice_id = %s AND stage = %s FOR UPDATE SKIP LOCKED""",
            (inv.stripe_invoice_id, d.stage.name),
        ).fetchone()
        if row is None or row[1] not in ("claimed", "failed"):
            return "busy", None, None  # another run holds it, or finished it meanwhile
        notice_id, _, recipient, mid = row
        r = render(d.stage.name, _variables(d, d.stage, org_invoices))
        msg = mailer.build(
            recipient,
            r.subject,
            r.text,
            r.html,
            message_id=mid,
            headers={
                "X-Billing-Dunning-Stage": d.stage.name,
                "X-Billing-Invoice": inv.stripe_invoice_id,
                "X-Billing-Org": inv.org_id,
            },
        )
        try:
            mailer.send(msg)
        except SEND_ERRORS as exc:
            error = _smtp_error(exc)
            cx.execute(
                """UPDATE billing.dunning_notices
                      SET status = 'failed', attempts = attempts + 1, failures = failures + 1,
                          error = %s, updated_at = now()
                    WHERE notice_id = %s""",
                (error, notice_id),
            )
            return "failed", recipient, error
        cx.execute(
            """UPDATE billing.dunning_notices
                  SET status = 'sent', attempts = attempts + 1, sent_at = now(),
                      updated_at = now()
                WHERE notice_id = %s""",
            (notice_id,),
        )
    return "sent", recipient, None


def _service_level_plan(cx, decisions: list[Decision], as_of: dt.date) -> list[dict]:
    """Orgs to degrade (an invoice at or past its degrade stage) or restore (nothing overdue)."""
    overdue: dict[str, list[Decision]] = {}
    for d in decisions:
        if d.outcome != "below_minimum":
            overdue.setdefault(d.invoice.org_id, []).append(d)
    current = {
        org: (level, since)
        for org, level, since in cx.execute(
            "SELECT org_id, service_level, as_of FROM billing.org_service_levels"
        )
    }
    changes = []
    for org, ds in sorted(overdue.items()):
        hit = [
            d
            for d in ds
            if (s := d.policy.degrade_stage()) and d.invoice.days_overdue >= s.days_past_due
        ]
        level, since = current.get(org, (NORMAL, None))
        if hit and level != DEGRADED and (since is None or since <= as_of):
            worst = max(hit, key=lambda d: d.invoice.days_overdue)
            changes.append(
                {
                    "org_id": org,
                    "from": level,
                    "to": DEGRADED,
                    "stripe_invoice_id": worst.invoice.stripe_invoice_id,
                    "reason": f"invoice {worst.invoice.stripe_invoice_id} "
                    f"{worst.invoice.days_overdue} days overdue",
                }
            )
    for org, (level, since) in sorted(current.items()):
        if level == DEGRADED and org not in overdue and since <= as_of:
            changes.append(
                {
                    "org_id": org,
                    "from": level,
                    "to": NORMAL,
                    "stripe_invoice_id": None,
                    "reason": "no overdue invoice",
                }
            )
    return changes


def _apply_service_levels(cx, changes: list[dict], as_of: dt.date, actor: str) -> list[dict]:
    applied = []
    for c in changes:
        with cx.transaction():
            row = cx.execute(
                """SELECT service_level, as_of FROM billing.org_service_levels
                    WHERE org_id = %s FOR UPDATE""",
                (c["org_id"],),
            ).fetchone()
            if row and (row[0] == c["to"] or row[1] > as_of):
                continue  # a concurrent or newer run already decided
            cx.execute(
                """INSERT INTO billing.org_service_levels (org_id, service_level, as_of, reason)
                   VALUES (%s, %s, %s, %s)
                   ON CONFLICT (org_id) DO UPDATE
                      SET service_level = EXCLUDED.service_level, as_of = EXCLUDED.as_of,
                          reason = EXCLUDED.reason, updated_at = now()""",
                (c["org_id"], c["to"], as_of, c["reason"]),
            )
            cx.execute(
                """INSERT INTO billing.service_level_changes
                       (org_id, from_level, to_level, as_of, reason, stripe_invoice_id, actor)
                   VALUES (%s, %s, %s, %s, %s, %s, %s)""",
                (
                    c["org_id"],
                    c["from"],
                    c["to"],
                    as_of,
                    c["reason"],
                    c["stripe_invoice_id"],
                    actor,
                ),
            )
        applied.append(c)
    return applied


def mirror_service_levels(cx, r=None) -> int:
    """Write every org's level to Redis (``billing:org:<id>:service_level``); Postgres wins."""
    from billing.stripe_sync import parking

    r = r or parking.client()
    rows = cx.execute("SELECT org_id, service_level FROM billing.org_service_levels").fetchall()
    if rows:
        with r.pipeline(transaction=False) as p:
            for org, level in rows:
                p.set(REDIS_KEY.format(org_id=org), level)
            p.execute()
    return len(rows)


def run(
    as_of: dt.date,
    *,
    dry_run: bool = False,
    actor: str = "dunning",
    policy: DunningPolicy | None = None,
    redis_client=None,
) -> dict:
    """Dun every overdue invoice as of ``as_of``; never raises for one refused recipient.

    Order: cancel rows of closed invoices, record skipped stages and claims (committed),
    change service levels, then send each claimed/failed notice under its row lock.
    """
    from billing import observability as obs
    from billing.platform import db, mailer

    policy = policy or load_policy()
    check_templates(policy)
    addrs = mailer.addresses()
    summary: dict = {"as_of": as_of.isoformat(), "dry_run": dry_run}
    with db.connect(autocommit=True) as cx:
        invoices = overdue_invoices(cx, as_of)
        existing = _existing(cx, [i.stripe_invoice_id for i in invoices])
        decisions = [decide(i, policy, existing.get(i.stripe_invoice_id, {})) for i in invoices]
        by_org: dict[str, list[OverdueInvoice]] = {}
        for d in decisions:
            by_org.setdefault(d.invoice.org_id, []).append(d.invoice)
        outcomes: dict[str, int] = {}
        for d in decisions:
            outcomes[d.outcome] = outcomes.get(d.outcome, 0) + 1
        changes = _service_level_plan(cx, decisions, as_of)
        summary.update(overdue_invoices=len(invoices), outcomes=dict(sorted(outcomes.items())))
        if dry_run:
            summary["would_send"] = [
                {
                    "org_id": d.invoice.org_id,
                    "invoice": d.invoice.stripe_invoice_id,
                    "stage": d.stage.name,
                    "recipient": _recipient(d.stage, d.invoice, addrs),
                }
                for d in decisions
                if d.stage
            ]
            summary["would_skip"] = sum(len(d.skip) for d in decisions)
            summary["would_change_service_level"] = changes
            return summary
        cancelled = _cancel_closed(cx)
        skipped = sum(_record(cx, d, as_of, addrs) for d in decisions)
        applied = _apply_service_levels(cx, changes, as_of, actor)
        mirror_service_levels(cx, redis_client)
        sent, failures = [], []
        for d in decisions:
            if d.stage is None:
                continue
            status, recipient, error = _send(cx, d, by_org[d.invoice.org_id])
            item = {
                "org_id": d.invoice.org_id,
                "invoice": d.invoice.stripe_invoice_id,
                "stage": d.stage.name,
                "recipient": recipient,
            }
            if status == "sent":
                sent.append(item)
            elif status == "failed":
                failures.append({**item, "error": error})
                log.warning("dunning notice %s/%s failed: %s", *list(item.values())[1:3], error)
            if status != "busy":
                obs.DUNNING_NOTICES.labels(d.stage.name, status).inc()
    summary.update(
        sent=len(sent),
        failed=len(failures),
        skipped=skipped,
        cancelled=cancelled,
        degraded=[c["org_id"] for c in applied if c["to"] == DEGRADED],
        restored=[c["org_id"] for c in applied if c["to"] == NORMAL],
        notices=sent,
        failures=failures,
    )
    log.info(
        "dunning %s: %d sent, %d failed, %d skipped, %d cancelled, degraded %s, restored %s",
        as_of,
        len(sent),
        len(failures),
        skipped,
        cancelled,
        summary["degraded"],
        summary["restored"],
    )
    return summary


def status(org_id: str | None = None, as_of: dt.date | None = None) -> dict:
    """Service levels, notices and (with ``as_of``) overdue invoices, for on-call and Finance."""
    from billing.platform import db

    with db.connect() as cx:
        levels = [
            {"org_id": o, "service_level": lv, "as_of": a.isoformat(), "reason": r}
            for o, lv, a, r in cx.execute(
                """SELECT org_id, service_level, as_of, reason FROM billing.org_service_levels
                    WHERE %(org)s::text IS NULL OR org_id = %(org)s ORDER BY org_id""",
                {"org": org_id},
            )
        ]
        cols = ("org_id", "invoice", "stage", "status", "recipient", "as_of", "sent_at")
        cols += ("attempts", "error")
        notices = [
            dict(zip(cols, r, strict=True))
            for r in cx.execute(
                """SELECT org_id, stripe_invoice_id, stage, status, recipient, as_of::text,
                          sent_at, attempts, error
                     FROM billing.dunning_notices
                    WHERE %(org)s::text IS NULL OR org_id = %(org)s
                    ORDER BY org_id, stripe_invoice_id, days_past_due""",
                {"org": org_id},
            )
        ]
        out = {"service_levels": levels, "notices": notices}
        if as_of is not None:
            policy = load_policy()
            out["overdue"] = [
                {
                    "org_id": i.org_id,
                    "invoice": i.stripe_invoice_id,
                    "days_overdue": i.days_overdue,
                    "amount_due_cents": i.amount_remaining_cents,
                    "currency": i.currency,
                    "stage": (
                        s.name
                        if (s := policy.for_plan(i.plan).current_stage(i.days_overdue))
                        else None
                    ),
                }
                for i in overdue_invoices(cx, as_of, org_id)
            ]
    return out


def run_task(data_interval_end, run_id: str | None = None) -> dict:
    """Airflow entry point: dun as of the day the data interval ends (the day it runs, UTC)."""
    from billing.platform.dates import day_of

    summary = run(day_of(data_interval_end), actor=f"airflow:{run_id or '?'}")
    if summary["failed"]:
        log.warning(
            "%d dunning notice(s) failed and will be retried on the next run: %s",
            summary["failed"],
            summary["failures"],
        )
    return summary


def format_run(summary: dict) -> str:
    """``billing dunning run`` for a person: what was (or would be) sent, skipped and changed."""
    from billing.platform.tables import render

    head = "dry run: nothing sent or changed" if summary.get("dry_run") else "dunning run"
    out = [f"{head}, as of {summary['as_of']}: {summary.get('overdue_invoices', 0)} overdue"]
    cols = ("org_id", "invoice", "stage", "recipient")
    if summary.get("dry_run"):
        rows = [tuple(n[c] for c in cols) for n in summary.get("would_send", [])]
        out += ["", "would send:", render(cols, rows, empty="(nothing due)")]
        out.append(f"would skip {summary.get('would_skip', 0)} stage(s) already past")
        changes = summary.get("would_change_service_level", [])
        changed = [(c["org_id"], c["from"], c["to"], c["reason"]) for c in changes]
    else:
        rows = [tuple(n[c] for c in cols) for n in summary.get("notices", [])]
        out += ["", f"sent {summary['sent']}:", render(cols, rows, empty="(nothing due)")]
        if summary.get("failures"):
            failed = [(*(f[c] for c in cols), f["error"]) for f in summary["failures"]]
            out += ["", f"failed {summary['failed']} (retried next run):"]
            out.append(render((*cols, "error"), failed))
        out.append(f"skipped {summary['skipped']}, cancelled {summary['cancelled']}")
        changed = [(o, NORMAL, DEGRADED, "") for o in summary.get("degraded", [])]
        changed += [(o, DEGRADED, NORMAL, "") for o in summary.get("restored", [])]
    if changed:
        out += ["", "service levels:", render(("org_id", "from", "to", "reason"), changed)]
    return "\n".join(out)


def format_status(found: dict) -> str:
    """``billing dunning status`` for a person: levels, overdue invoices (money), notice history."""
    from billing.platform.tables import money, render

    levels = [
        (s["org_id"], s["service_level"], s["as_of"], s["reason"] or "")
        for s in found["service_levels"]
    ]
    out = ["service levels:", render(("org_id", "level", "since", "reason"), levels)]
    if "overdue" in found:
        overdue = [
            (
                o["org_id"],
                o["invoice"],
                o["days_overdue"],
                money(o["amount_due_cents"], o["currency"]),
                o["stage"] or "",
            )
            for o in found["overdue"]
        ]
        cols = ("org_id", "invoice", "days overdue", "amount due", "stage")
        out += ["", "overdue invoices:", render(cols, overdue, right=("amount due",))]
    notices = [
        (
            n["org_id"],
            n["invoice"],
            n["stage"],
            n["status"],
            n["as_of"],
            n["sent_at"].strftime("%Y-%m-%d %H:%M") if n["sent_at"] else "",
            n["attempts"],
            n["error"] or "",
        )
        for n in found["notices"]
    ]
    cols = ("org_id", "invoice", "stage", "status", "as_of", "sent", "attempts", "error")
    out += ["", "notices:", render(cols, notices)]
    return "\n".join(out)
