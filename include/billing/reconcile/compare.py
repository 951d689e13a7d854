"""Reconciliation: the internal invoice snapshot vs Stripe, per org and period.

Playbook: "Compare internal snapshot vs Stripe; tolerance 0.5%; persist diffs to
billing_audit", and "if >0.5% mismatch, file an incident and assign Engineering + Finance".

* Internal side: ``fct_invoices`` / ``fct_invoice_lines`` through :mod:`billing.invoices`.
* Stripe side: every invoice item of the org's customer whose ``metadata.period`` is the
  period (items without that metadata fall in the month of their ``period.start``), minus
  items on a void invoice. Once the period's invoice is finalized, its ``total`` replaces
  the items it carries, so discounts, taxes or dashboard edits on it count; its period's
  credit notes (corrections after finalization) are subtracted, by ``metadata.metric``.
* Exact money: integer cents and Decimal ratios. ``rel_diff = |stripe - internal| /
  |internal|``; 1 when the sides cannot be compared (one side missing, currencies differ).
* Great Expectations (ephemeral context, loaded only here) checks the tolerance, that no
  org is missing on either side, and that currencies agree; its results are stored per org.
* A run is claimed by its idempotency key (``billing.reconcile_runs``) in the transaction
  that writes its audit rows and incident: the same key always returns the stored payload.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from billing.platform import db, settings
from billing.platform.dates import period_from
from billing.platform.errors import BillingError, ConfigError
from billing.stripe_sync.engine import field as _field

log = logging.getLogger(__name__)

ASSIGNEES = ("Engineering", "Finance")
EMAIL_LEASE = dt.timedelta(minutes=15)  # a claimed-but-unsent alert is re-sent after this
RUNBOOK = "docs/runbooks/reconciliation-mismatch.md"
ONE_SIDED = ("missing_in_stripe", "missing_internal", "currency_mismatch")
# billing.billing_audit.status (migration 0030): the outcome labels of
# billing_reconcile_checks_total, exported from 0.
OUTCOMES = ("match", "within_tolerance", "mismatch", *ONE_SIDED)
# Prepaid credits: Stripe items of metadata.kind credit vs billing.credit_applications.
CREDIT_LINE = "credit"
EXPECTATIONS = ("rel_diff_within_tolerance", "in_snapshot", "in_stripe", "currencies_equal")


class ReconcileMismatch(BillingError):
    """At least one org differs by more than the tolerance: the run fails, an incident is open."""

    exit_code = 1

    def __init__(self, message: str, payload: dict):
        super().__init__(message)
        self.payload = payload


class ReconcileKeyConflict(ConfigError):
    """An idempotency key reused with other parameters (period or orgs)."""


def _period(value: str | dt.date | dt.datetime) -> dt.date:
    """The period of ``value`` (``YYYY-MM``, ``YYYY-MM-DD``, a date or datetime)."""
    try:
        return period_from(value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# ---------------------------------------------------------------- the two sides
@dataclass
class Side:
    cents: int
    currencies: set[str]
    lines: dict[str, int] = field(default_factory=dict)
    source: str = "items"  # invoice | items (Stripe); snapshot for the internal side
    invoice_id: str | None = None


def _internal(cx, period: dt.date, org_ids: Sequence[str] | None) -> dict[str, Side]:
    """The snapshot's invoices less the prepaid credits the close applied to them (line
    ``credit``, compared with Stripe's credit items)."""
    from billing import credits
    from billing.invoices.snapshot import list_invoices

    applied = credits.applied(cx, period, org_ids)
    out: dict[str, Side] = {}
    for inv in list_invoices(cx, period):
        if org_ids is not None and inv.org_id not in org_ids:
            continue
        lines: dict[str, int] = defaultdict(int)
        for line in inv.lines:
            lines[line.charge] += line.amount_cents
        credit = applied.get(inv.org_id, 0)
        if credit:
            lines[CREDIT_LINE] -= credit
        out[inv.org_id] = Side(
            int(inv.total_cents) - credit, {inv.currency.strip().lower()}, dict(lines), "snapshot"
        )
    return out


class StripeReader:
    """Reads the period from Stripe through the sync package's gateway (rate limit + retries)."""

    def __init__(self, gateway=None):
        from billing.stripe_sync.client import Gateway

        self.gw = gateway or Gateway()

    def _call(self, op: str, fn):
        from billing.platform.errors import ServiceError
        from billing.stripe_sync.client import GiveUp

        try:
            return self.gw.call(op, fn)[0]
        except GiveUp as exc:
            raise ServiceError(f"Stripe {op} failed: {exc.failure.message}") from None

    def _pages(self, op: str, fetch, params: dict) -> Iterator[Any]:
        params = {**params, "limit": 100}
        while True:
            page = self._call(op, lambda p=dict(params): fetch(p))
            data = list(page["data"])
            yield from data
            if not page["has_more"] or not data:
                return
            params["starting_after"] = data[-1]["id"]

    def customers(self, cx, org_ids: Sequence[str] | None) -> dict[str, str]:
        """org_id -> customer id: our mapping plus Stripe customers tagged with an org_id.

        Stripe-only customers are found by listing customers (strongly consistent), never by
        search: Stripe's search lags new objects by up to a minute (longer in an outage), so
        a customer created just before the run would be reported missing. With ``org_ids``
        the listing stops as soon as every wanted org is found.
        """
        found = dict(cx.execute("SELECT org_id, stripe_customer_id FROM billing.stripe_customers"))
        wanted = None if org_ids is None else set(org_ids) - set(found)
        if wanted is None or wanted:
            for c in self._pages(
                "list_customers", lambda p: self.gw.v1.customers.list(params=p), {}
            ):
                org = _field(_field(c, "metadata", {}), "org_id")
                if not org or org in found or (wanted is not None and org not in wanted):
                    continue
                found[org] = c["id"]  # newest first: the newest customer tagged with it
                if wanted is not None:
                    wanted.discard(org)
                    if not wanted:
                        break
        if org_ids is None:
            return found
        return {o: c for o, c in found.items() if o in org_ids}

    def side(self, customer_id: str, period: dt.date, invoice_id: str | None) -> Side | None:
        """What Stripe charges this customer for ``period``; None when it has nothing for it."""
        key = f"{period:%Y-%m}"
        invoice = None
        if invoice_id:
            invoice = self._call(
                "retrieve_invoice", lambda: self.gw.v1.invoices.retrieve(invoice_id)
            )
        void = {invoice_id} if invoice is not None and invoice["status"] == "void" else set()
        finalized = invoice is not None and invoice["status"] in ("open", "paid", "uncollectible")
        items, carried_foreign = [], 0
        for ii in self._pages(
            "list_invoice_items",
            lambda p: self.gw.v1.invoice_items.list(params=p),
            {"customer": customer_id},
        ):
            if _item_period(ii) == key:
                if _field(ii, "invoice") not in void:
                    items.append(ii)
            elif finalized and _field(ii, "invoice") == invoice_id:
                # A late item of an earlier period that this invoice collected: it is
                # charged here but belongs to (and is reconciled with) its own period.
                carried_foreign += int(ii["amount"])
        if not items and not finalized:
            return None
        lines: dict[str, int] = defaultdict(int)
        currencies: set[str] = set()
        extra = 0  # period items not on the finalized invoice (charged on another one)
        if finalized:  # corrections after finalization: credit notes of the period
            for label, cents in self.credit_notes(customer_id, key, invoice_id).items():
                lines[label] -= cents
                extra -= cents
        for ii in items:
            meta = _field(ii, "metadata", {})
            kind = _field(meta, "kind")
            line = (
                kind
                if kind in ("base_fee", CREDIT_LINE)
                else _field(meta, "metric", "unattributed")
            )
            lines[line] += int(ii["amount"])
            currencies.add(str(ii["currency"]).lower())
            if not finalized or _field(ii, "invoice") != invoice_id:
                extra += int(ii["amount"])
        if finalized:
            currencies.add(str(invoice["currency"]).lower())
            return Side(
                int(invoice["total"]) - carried_foreign + extra,
                currencies,
                dict(lines),
                "invoice",
                invoice_id,
            )
        return Side(extra, currencies, dict(lines), "items")

    def credit_notes(self, customer_id: str, period: str, invoice_id: str) -> dict[str, int]:
        """label -> cents of the customer's issued (not void) credit notes for ``period``
        (``metadata.period``, else the period's invoice), by ``metadata.metric``."""
        out: dict[str, int] = defaultdict(int)
        for cn in self._pages(
            "list_credit_notes",
            lambda p: self.gw.v1.credit_notes.list(params=p),
            {"customer": customer_id},
        ):
            meta = _field(cn, "metadata", {})
            mine = _field(meta, "period") == period or (
                not _field(meta, "period") and _field(cn, "invoice") == invoice_id
            )
            if mine and _field(cn, "status") != "void":
                out[_field(meta, "metric", "unattributed")] += int(cn["total"])
        return dict(out)


def _item_period(ii: Any) -> str | None:
    meta = _field(ii, "metadata", {})
    if _field(meta, "period"):
        return str(meta["period"])
    start = _field(_field(ii, "period", {}), "start")
    if start is None:
        return None
    return dt.datetime.fromtimestamp(int(start), dt.UTC).strftime("%Y-%m")


# ---------------------------------------------------------------- comparison
def _ratio(diff: int, base: int) -> Decimal:
    if base == 0:
        return Decimal(0) if diff == 0 else Decimal(1)
    return Decimal(abs(diff)) / Decimal(abs(base))


def compare(
    org_id: str, internal: Side | None, stripe: Side | None, tol: Decimal
) -> dict[str, Any]:
    """One org's result: status, both amounts, absolute and relative difference, lines."""
    if stripe is None and internal is not None and internal.cents == 0:
        stripe = Side(0, set(internal.currencies), {}, "none")  # nothing to charge, nothing charged
    i_cents = internal.cents if internal else None
    s_cents = stripe.cents if stripe else None
    i_cur = next(iter(internal.currencies)) if internal else None
    s_cur = ",".join(sorted(stripe.currencies)) if stripe and stripe.currencies else None
    if internal is None:
        status, diff, rel = "missing_internal", abs(s_cents), Decimal(1)
    elif stripe is None:
        status, diff, rel = "missing_in_stripe", abs(i_cents), Decimal(1)
    else:
        diff = abs(s_cents - i_cents)
        rel = _ratio(diff, i_cents)
        if stripe.currencies and stripe.currencies != internal.currencies:
            status, rel = "currency_mismatch", Decimal(1)
        elif diff == 0:
            status = "match"
        else:
            status = "within_tolerance" if rel <= tol else "mismatch"
    lines = []
    i_lines = internal.lines if internal else {}
    s_lines = stripe.lines if stripe else {}
    for name in sorted(set(i_lines) | set(s_lines)):
        a, b = i_lines.get(name), s_lines.get(name)
        row: dict[str, Any] = {"line": name, "internal_cents": a, "stripe_cents": b}
        if a is not None and b is not None:
            row.update(abs_diff_cents=abs(b - a), rel_diff=_dec(_ratio(b - a, a)))
        lines.append(row)
    return {
        "org_id": org_id,
        "status": status,
        "above_tolerance": status in ONE_SIDED or rel > tol,
        "internal_cents": i_cents,
        "stripe_cents": s_cents,
        "internal_currency": i_cur,
        "stripe_currency": s_cur,
        "abs_diff_cents": diff,
        "rel_diff": _dec(rel),
        "stripe_source": stripe.source if stripe else "none",
        "stripe_invoice_id": stripe.invoice_id if stripe else None,
        "lines": lines,
    }


def _dec(value: Decimal) -> str:
    """A Decimal as an exact, readable string (no exponent, no trailing zeros)."""
    return format(value.normalize(), "f")


# ---------------------------------------------------------------- Great Expectations
def validate(results: list[dict], tol: Decimal) -> tuple[bool, list[dict], dict[str, dict]]:
    """Run the suite over the per-org rows; return (success, summary, per-org outcome)."""
    import logging as _logging

    import great_expectations as gx
    import pandas as pd

    _logging.getLogger("great_expectations").setLevel(_logging.WARNING)
    per_org = {r["org_id"]: dict.fromkeys(EXPECTATIONS, True) for r in results}
    if not results:
        return True, [], per_org
    frame = pd.DataFrame(
        {
            "org_id": [r["org_id"] for r in results],
            # a ratio, not money: float for GX; exact Decimal is stored next to it
            "rel_diff": [float(Decimal(r["rel_diff"])) for r in results],
            "internal_cents": pd.array([r["internal_cents"] for r in results], dtype="Int64"),
            "stripe_cents": pd.array([r["stripe_cents"] for r in results], dtype="Int64"),
            "internal_currency": [r["internal_currency"] for r in results],
            "stripe_currency": [r["stripe_currency"] for r in results],
        }
    )
    context = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # cosmetic only
        pass
    batch = (
        context.data_sources.add_pandas("reconcile")
        .add_dataframe_asset("orgs")
        .add_batch_definition_whole_dataframe("run")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    E = gx.expectations
    named = {
        "rel_diff_within_tolerance": E.ExpectColumnValuesToBeBetween(
            column="rel_diff", min_value=0, max_value=float(tol)
        ),
        "in_snapshot": E.ExpectColumnValuesToNotBeNull(column="internal_cents"),
        "in_stripe": E.ExpectColumnValuesToNotBeNull(column="stripe_cents"),
        "currencies_equal": E.ExpectColumnPairValuesToBeEqual(
            column_A="internal_currency",
            column_B="stripe_currency",
            ignore_row_if="either_value_is_missing",
        ),
    }
    suite = gx.ExpectationSuite(name="billing_reconcile")
    for expectation in named.values():
        suite.add_expectation(expectation)
    result = batch.validate(
        suite,
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["org_id"]},
    )
    by_column = {
        "rel_diff": "rel_diff_within_tolerance",
        "internal_cents": "in_snapshot",
        "stripe_cents": "in_stripe",
        "internal_currency": "currencies_equal",
    }
    summary = []
    for r in result.results:
        kwargs = r.expectation_config.kwargs
        name = by_column[kwargs.get("column") or kwargs["column_A"]]
        bad = sorted({str(u["org_id"]) for u in r.result.get("unexpected_index_list") or []})
        for org in bad:
            per_org[org][name] = False
        summary.append(
            {
                "expectation": name,
                "type": r.expectation_config.type,
                "success": bool(r.success),
                "unexpected_org_ids": bad,
            }
        )
    summary.sort(key=lambda s: EXPECTATIONS.index(s["expectation"]))
    return bool(result.success), summary, per_org


# ---------------------------------------------------------------- the run
def reconcile(
    period: dt.date | str,
    org_ids: Sequence[str] | None = None,
    idempotency_key: str | None = None,
    run_id: str | None = None,
    *,
    reader: StripeReader | None = None,
) -> dict:
    """Reconcile ``period`` for ``org_ids`` (None = every org on either side).

    Returns the payload (also stored with the run). Raises :class:`ReconcileMismatch` when
    any org is above the tolerance, after the incident row is written and its alert sent.
    The same ``idempotency_key`` returns the stored payload (and finishes a pending alert).
    """
    period = _period(period)
    orgs = sorted(set(org_ids)) if org_ids else None
    key = idempotency_key or f"reconcile:{period:%Y-%m}:{uuid.uuid4().hex}"
    run_id = run_id or f"adhoc__{uuid.uuid4().hex[:12]}"
    stored = _stored(key, period, orgs)
    if stored is None:
        payload = _run(period, orgs, key, run_id, reader)
        stored = _claim(payload, period, orgs)
    return _finish(stored)


def _stored(key: str, period: dt.date, orgs: list[str] | None) -> dict | None:
    with db.connect() as cx:
        row = cx.execute(
            "SELECT period, org_filter, payload FROM billing.reconcile_runs WHERE idempotency_key = %s",
            (key,),
        ).fetchone()
    if row is None:
        return None
    if row[0] != period or (row[1] or None) != orgs:
        raise ReconcileKeyConflict(
            f"idempotency key {key!r} was used for period {row[0]:%Y-%m} and orgs "
            f"{row[1] or 'all'}, not {period:%Y-%m} and {orgs or 'all'}: use a new key"
        )
    log.info("reconcile %s: replaying the stored result of key %s", f"{period:%Y-%m}", key)
    return row[2]


def _run(
    period: dt.date,
    orgs: list[str] | None,
    key: str,
    run_id: str,
    reader: StripeReader | None,
) -> dict:
    tol = settings.reconcile_tolerance()
    reader = reader or StripeReader()
    with db.connect() as cx:
        internal = _internal(cx, period, orgs)
        customers = reader.customers(cx, orgs)
        invoices = dict(
            cx.execute(
                "SELECT org_id, stripe_invoice_id FROM billing.stripe_invoices WHERE period = %s",
                (period,),
            )
        )
    stripe: dict[str, Side] = {}
    for org, customer_id in sorted(customers.items()):
        side = reader.side(customer_id, period, invoices.get(org))
        if side is not None:
            stripe[org] = side
    universe = sorted(set(internal) | set(stripe))
    results = [compare(o, internal.get(o), stripe.get(o), tol) for o in universe]
    gx_success, gx_summary, per_org = validate(results, tol)
    for r in results:
        r["expectations"] = per_org[r["org_id"]]
        # GX is the gate too: an org it flags fails the run even if the exact check passed
        r["above_tolerance"] = r["above_tolerance"] or not all(r["expectations"].values())
    failing = [r for r in results if r["above_tolerance"]]
    discrepancies = [r for r in results if r["status"] != "match"]
    max_rel = max((Decimal(r["rel_diff"]) for r in results), default=Decimal(0))
    return {
        "idempotency_key": key,
        "run_id": run_id,
        "period": f"{period:%Y-%m}",
        "org_ids": orgs,
        "tolerance": _dec(tol),
        "status": "failed" if failing or not gx_success else "passed",
        "counts": {
            "orgs": len(results),
            "match": sum(r["status"] == "match" for r in results),
            "within_tolerance": sum(r["status"] == "within_tolerance" for r in results),
            "discrepancies": len(discrepancies),
            "above_tolerance": len(failing),
        },
        "max_relative_diff": _dec(max_rel),
        "discrepancies": [_public(r) for r in discrepancies],
        "expectations": gx_summary,
        "incident": None,
        "results": results,
    }


def _public(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "expectations"}


def _claim(payload: dict, period: dt.date, orgs: list[str] | None) -> dict:
    """Store the run, its audit rows and incident at once, unless the key is already taken."""
    results = payload.pop("results")
    key = payload["idempotency_key"]
    with db.transaction() as cx:
        claimed = cx.execute(
            """INSERT INTO billing.reconcile_runs (idempotency_key, run_id, period, org_filter,
                   tolerance, status, orgs_checked, discrepancies, above_tolerance,
                   max_rel_diff, payload)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (idempotency_key) DO NOTHING RETURNING created_at""",
            (
                key,
                payload["run_id"],
                period,
                orgs,
                Decimal(payload["tolerance"]),
                payload["status"],
                payload["counts"]["orgs"],
                payload["counts"]["discrepancies"],
                payload["counts"]["above_tolerance"],
                Decimal(payload["max_relative_diff"]),
                json.dumps(payload),
            ),
        ).fetchone()
        if claimed is None:  # a concurrent run with the same key won; return its result
            stored = None
        else:
            payload["checked_at"] = claimed[0].isoformat()
            with cx.cursor() as cur:
                cur.executemany(
                    """INSERT INTO billing.billing_audit (idempotency_key, run_id, period, org_id,
                           status, is_above_tolerance, internal_cents, stripe_cents,
                           internal_currency, stripe_currency, abs_diff_cents, rel_diff,
                           stripe_source, stripe_invoice_id, lines, expectations, checked_at)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                    [
                        (
                            key,
                            payload["run_id"],
                            period,
                            r["org_id"],
                            r["status"],
                            r["above_tolerance"],
                            r["internal_cents"],
                            r["stripe_cents"],
                            r["internal_currency"],
                            r["stripe_currency"],
                            r["abs_diff_cents"],
                            Decimal(r["rel_diff"]),
                            r["stripe_source"],
                            r["stripe_invoice_id"],
                            json.dumps(r["lines"]),
                            json.dumps(r["expectations"]),
                            claimed[0],
                        )
                        for r in results
                    ],
                )
            if payload["status"] == "failed":
                payload["incident"] = _open_incident(cx, payload, period, results)
            cx.execute(
                "UPDATE billing.reconcile_runs SET payload = %s WHERE idempotency_key = %s",
                (json.dumps(payload), key),
            )
            stored = payload
    return stored if stored is not None else _stored(key, period, orgs)


def _open_incident(cx, payload: dict, period: dt.date, results: list[dict]) -> dict:
    from email.utils import make_msgid

    from billing.platform import mailer

    failing = [r for r in results if r["above_tolerance"]]
    names = [r["org_id"] for r in failing]
    emails = mailer.addresses()
    to = [emails["engineering"], emails["finance"]]
    summary = (
        f"Reconciliation {period:%Y-%m}: {len(names)} org(s) above the "
        f"{_pct(payload['tolerance'])} tolerance: {', '.join(names)}"
    )
    message_id = make_msgid(idstring=f"reconcile-{uuid.uuid4().hex[:12]}", domain="billing.local")
    incident_id = cx.execute(
        """INSERT INTO billing.billing_incidents (idempotency_key, period, org_ids, assignees,
               summary, max_rel_diff, message_id, email_to)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING incident_id""",
        (
            payload["idempotency_key"],
            period,
            names,
            list(ASSIGNEES),
            summary,
            Decimal(payload["max_relative_diff"]),
            message_id,
            to,
        ),
    ).fetchone()[0]
    return {
        "incident_id": incident_id,
        "status": "open",
        "assignees": list(ASSIGNEES),
        "org_ids": names,
        "message_id": message_id,
        "email_to": to,
    }


def _pct(ratio: str | Decimal) -> str:
    return f"{_dec(Decimal(ratio) * 100)}%"


def _finish(payload: dict) -> dict:
    if payload["status"] != "failed":
        return payload
    send_alert(payload["idempotency_key"])
    failing = [d for d in payload["discrepancies"] if d["above_tolerance"]]
    detail = (
        ", ".join(f"{d['org_id']} ({d['status']}, {_pct(d['rel_diff'])})" for d in failing)
        or "see the expectation results"
    )
    incident = payload.get("incident") or {}
    raise ReconcileMismatch(
        f"reconciliation {payload['period']} failed: {len(failing)} org(s) above the "
        f"{_pct(payload['tolerance'])} tolerance: {detail}; incident "
        f"#{incident.get('incident_id', '?')} open for Engineering + Finance "
        f"(key {payload['idempotency_key']})",
        payload,
    )


def send_alert(key: str) -> str | None:
    """Email the incident of run ``key`` to Engineering + Finance once; returns the Message-ID.

    The send is claimed on the row first (a lease, so a crash mid-send is retried later with
    the same Message-ID), then stamped as sent. Returns None when it was already sent.
    """
    from billing.platform import mailer

    with db.connect(autocommit=True) as cx:
        row = cx.execute(
            """UPDATE billing.billing_incidents i SET email_claimed_at = now()
                WHERE idempotency_key = %s AND email_sent_at IS NULL
                  AND (email_claimed_at IS NULL OR email_claimed_at < now() - %s)
            RETURNING incident_id, message_id, email_to, summary,
                      (SELECT payload FROM billing.reconcile_runs r
                        WHERE r.idempotency_key = i.idempotency_key)""",
            (key, EMAIL_LEASE),
        ).fetchone()
        if row is None:
            return None
        incident_id, message_id, to, summary, payload = row
        msg = mailer.build(
            to,
            f"[billing] INCIDENT #{incident_id}: {summary}",
            _alert_text(incident_id, summary, payload),
            message_id=message_id,
            headers={"X-Billing-Incident": str(incident_id), "X-Billing-Reconcile-Key": key},
        )
        try:
            mailer.send(msg)
        except Exception:
            cx.execute(
                "UPDATE billing.billing_incidents SET email_claimed_at = NULL WHERE incident_id = %s",
                (incident_id,),
            )
            raise
        cx.execute(
            "UPDATE billing.billing_incidents SET email_sent_at = now() WHERE incident_id = %s",
            (incident_id,),
        )
    log.warning("reconcile incident #%s emailed to %s", incident_id, ", ".join(to))
    return message_id


def _alert_text(incident_id: int, summary: str, payload: dict) -> str:
    rows = [
        f"  {d['org_id']:<24} {d['status']:<18} internal {_money(d['internal_cents'], d['internal_currency'])}"
        f"  stripe {_money(d['stripe_cents'], d['stripe_currency'])}"
        f"  diff {d['abs_diff_cents']} cents ({_pct(d['rel_diff'])})"
        for d in payload["discrepancies"]
        if d["above_tolerance"]
    ]
    return "\n".join(
        [
            summary,
            "",
            f"Incident #{incident_id}, assigned to Engineering + Finance (status open).",
            f"Period {payload['period']}, run {payload['run_id']}, key {payload['idempotency_key']}.",
            "",
            "Above tolerance:",
            *rows,
            "",
            "Every compared org is in billing.billing_audit (idempotency_key above).",
            f"Runbook: {RUNBOOK}",
        ]
    )


def _money(cents: int | None, currency: str | None) -> str:
    return "-" if cents is None else f"{cents} {currency or ''}".strip()


# ---------------------------------------------------------------- Airflow task entry
def run_task(
    params: dict,
    run_id: str,
    days: Iterable[Any],
    pushed: Iterable[tuple[Any, int]] | None = None,
) -> dict:
    """The DAG's task: period from ``params`` or else from the run's days (asset events /
    data interval). The key defaults to one derived from the run id, so retries replay it.

    ``pushed``: ``(day, snapshot publish)`` of each triggering push. A period is deferred
    when a publish after every triggering push of it changed its invoices (another nightly,
    or a scheduled run beside a backfill, re-priced it before its own push): Stripe is then
    behind by design, not in disagreement, and that publish's push triggers the
    reconciliation that compares. Nothing is recorded for it."""
    period_param = (params or {}).get("period") or ""
    if period_param:
        periods = [_period(period_param)]
    else:
        periods = sorted({_period(d) for d in days if d})
    if not periods:
        raise ConfigError("no period: set the 'period' param (YYYY-MM)")
    org_ids = (params or {}).get("org_ids") or None
    given = (params or {}).get("idempotency_key") or ""
    seqs: dict[dt.date, int] = {}
    for d, seq in pushed or ():
        p = _period(d)
        seqs[p] = max(seq, seqs.get(p, seq))
    payloads, failures = [], []
    for p in periods:
        current = _published_seq(p) if p in seqs and not period_param else 0
        if p in seqs and not period_param and current > seqs[p]:
            log.info(
                "reconciliation of %s deferred: snapshot publish %s changed it after the pushed"
                " %s; its push triggers the next reconciliation",
                f"{p:%Y-%m}",
                current,
                seqs[p],
            )
            payloads.append(
                {
                    "status": "deferred",
                    "run_id": run_id,
                    "period": f"{p:%Y-%m}",
                    "pushed_snapshot_seq": seqs[p],
                    "published_snapshot_seq": current,
                }
            )
            continue
        key = given if given and len(periods) == 1 else f"{given or 'airflow:' + run_id}:{p:%Y-%m}"
        try:
            payloads.append(reconcile(p, org_ids, key, run_id))
        except ReconcileMismatch as exc:
            log.error("%s\n%s", exc, json.dumps(exc.payload, indent=2, sort_keys=True))
            payloads.append(exc.payload)
            failures.append(exc)
    if failures:
        if len(failures) == 1:
            raise failures[0]
        raise ReconcileMismatch("; ".join(str(e) for e in failures), {"runs": payloads})
    return payloads[0] if len(payloads) == 1 else {"runs": payloads}


def _published_seq(period: dt.date) -> int:
    from billing.platform import db
    from billing.transform import published_seq

    with db.connect() as cx:
        return published_seq(cx, period)


# ---------------------------------------------------------------- incidents
def open_incidents() -> list[dict]:
    return incidents(include_resolved=False)


def incidents(include_resolved: bool = False) -> list[dict]:
    """Incidents, oldest first: the open ones, or (``include_resolved``) the whole history."""
    from psycopg.rows import dict_row

    with db.connect() as cx, cx.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            """SELECT incident_id, to_char(period, 'YYYY-MM') AS period, status, org_ids,
                      assignees, summary, max_rel_diff::text AS max_rel_diff, idempotency_key,
                      created_at, email_sent_at, resolved_at, resolution
                 FROM billing.billing_incidents
                WHERE status = 'open' OR %(all)s
                ORDER BY incident_id""",
            {"all": include_resolved},
        ).fetchall()


def resolve_incident(incident_id: int, resolution: str) -> dict:
    """Close an incident once Engineering + Finance agree it is fixed (re-reconciled)."""
    if not (resolution or "").strip():
        raise ConfigError("say how the incident was resolved (--note)")
    with db.transaction() as cx:
        row = cx.execute(
            """UPDATE billing.billing_incidents
                  SET status = 'resolved', resolved_at = now(), resolution = %s
                WHERE incident_id = %s AND status = 'open'
            RETURNING incident_id, to_char(period, 'YYYY-MM'), resolved_at""",
            (resolution.strip(), incident_id),
        ).fetchone()
        if row is None:
            found = cx.execute(
                "SELECT status FROM billing.billing_incidents WHERE incident_id = %s",
                (incident_id,),
            ).fetchone()
            raise ConfigError(
                f"incident #{incident_id} is already {found[0]}"
                if found
                else f"no reconciliation incident #{incident_id}"
            )
    return {"incident_id": row[0], "period": row[1], "status": "resolved", "resolved_at": row[2]}
