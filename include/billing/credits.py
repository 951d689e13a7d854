"""Prepaid credits: amounts an operator grants an org, used up by its invoices at the close.

Playbook "Invoice lifecycle", issue 20 (docs/SUBSCRIPTIONS.md#prepaid-credits). Tables:
migration 0160 (``billing.credit_grants``, ``billing.credit_applications``).

* A grant is money in the org's currency, given in major units and converted exactly
  (``50.00`` usd -> 5000; ``50.001`` is refused, never rounded).
* At the month close each invoice takes what the org's usable grants hold, **oldest
  expiring first** (grants that never expire last, ties by grant id), never more than the
  invoice total: an invoice never goes negative because of credits. A grant is usable for a
  period when it is not voided and is valid through the period's last day (``expires_at``
  at or after the period's close): data-interval based, the clock is never read.
* Nothing here talks to Stripe: ``billing.stripe_sync`` turns the applications into credit
  items in the same transaction as their claim rows (:func:`record`).
* A void takes only the unapplied remainder; what an expired grant had left stays visible
  as ``expired``.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from psycopg.rows import dict_row

from billing.platform.dates import period_close, period_of, run_end
from billing.platform.errors import BillingError, ConfigError
from billing.pricing.catalog import minor_exponent, to_minor

REASON_MAX = 200  # characters; the reason is printed on the customer's invoice


class CreditError(BillingError):
    """A grant or void that cannot be done (unknown org or grant, currency, amount)."""


@dataclass(frozen=True)
class Application:
    """What one grant gives one invoice."""

    grant_id: int
    org_id: str
    period: dt.date
    amount_cents: int
    currency: str
    reason: str


# ---------------------------------------------------------------- granting
def parse_amount(text: str | Decimal, currency: str) -> int:
    """``"50.00", "usd"`` -> 5000: exact, positive, no more decimals than the currency has."""
    exponent = minor_exponent(currency)  # ConfigError for an unsupported currency
    try:
        amount = Decimal(str(text).strip())
    except InvalidOperation:
        raise ConfigError(f"invalid amount {text!r}: expected a decimal like 50.00") from None
    if not amount.is_finite():
        raise ConfigError(f"invalid amount {text!r}: expected a decimal like 50.00")
    if amount <= 0:
        raise ConfigError(f"amount must be positive, got {text}")
    scaled = amount.scaleb(exponent)
    if scaled != scaled.to_integral_value():
        raise ConfigError(
            f"amount {text} has more decimal places than {currency.lower()} allows ({exponent})"
        )
    return to_minor(amount, currency)


def expiry_of(valid_through: dt.date | None) -> dt.datetime | None:
    """``--expires D``: usable through day D, so it expires at D+1 00:00 UTC."""
    return None if valid_through is None else run_end(valid_through)


def grant(
    cx,
    org_id: str,
    amount: str | Decimal,
    currency: str,
    *,
    reason: str,
    actor: str,
    valid_through: dt.date | None = None,
) -> dict:
    """Grant ``amount`` (major units) to ``org_id``; the currency must be the org's."""
    reason = (reason or "").strip()
    if not reason:
        raise ConfigError("a reason is required")
    if len(reason) > REASON_MAX:
        raise ConfigError(f"reason is longer than {REASON_MAX} characters")
    currency = (currency or "").strip().lower()
    cents = parse_amount(amount, currency)
    row = cx.execute(
        "SELECT currency FROM billing.organizations WHERE org_id = %s", (org_id,)
    ).fetchone()
    if row is None:
        raise CreditError(f"unknown org {org_id!r}")
    if row[0].strip() != currency:
        raise CreditError(f"currency {currency} is not org {org_id}'s currency ({row[0].strip()})")
    grant_id, granted_at = cx.execute(
        """INSERT INTO billing.credit_grants
               (org_id, amount_cents, currency, expires_at, reason, granted_by)
           VALUES (%s, %s, %s, %s, %s, %s) RETURNING grant_id, granted_at""",
        (org_id, cents, currency, expiry_of(valid_through), reason, actor),
    ).fetchone()
    return {
        "grant_id": grant_id,
        "org_id": org_id,
        "amount_cents": cents,
        "currency": currency,
        "expires_at": expiry_of(valid_through),
        "reason": reason,
        "granted_by": actor,
        "granted_at": granted_at,
    }


def void(cx, grant_id: int, *, reason: str, actor: str) -> dict:
    """Void what ``grant_id`` has not given yet; what it gave stays on those invoices."""
    reason = (reason or "").strip()
    if not reason:
        raise ConfigError("a reason is required")
    row = cx.execute(
        """SELECT g.org_id, g.amount_cents, g.currency, g.voided_at,
                  coalesce((SELECT sum(a.amount_cents) FROM billing.credit_applications a
                             WHERE a.grant_id = g.grant_id), 0)
             FROM billing.credit_grants g WHERE g.grant_id = %s FOR UPDATE""",
        (grant_id,),
    ).fetchone()
    if row is None:
        raise CreditError(f"unknown grant {grant_id}")
    org_id, amount, currency, voided_at, applied = row
    if voided_at is not None:
        raise CreditError(f"grant {grant_id} was already voided on {voided_at:%Y-%m-%d}")
    remaining = int(amount) - int(applied)
    if remaining <= 0:
        raise CreditError(f"grant {grant_id} is fully applied: nothing left to void")
    voided_at = cx.execute(
        """UPDATE billing.credit_grants SET voided_at = now(), voided_by = %s, void_reason = %s
            WHERE grant_id = %s RETURNING voided_at""",
        (actor, reason, grant_id),
    ).fetchone()[0]
    return {
        "grant_id": grant_id,
        "org_id": org_id,
        "voided_cents": remaining,
        "currency": currency.strip(),
        "voided_by": actor,
        "voided_at": voided_at,
    }


# ---------------------------------------------------------------- applying at the close
def usable(cx, org_id: str, period: dt.date, currency: str) -> list[dict]:
    """The org's grants usable for ``period``, in the order they are used, with what is left
    (rows locked: a void or another close of the org waits for this transaction)."""
    period = period_of(period)
    with cx.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            """SELECT g.grant_id, g.amount_cents, g.expires_at, g.reason,
                      g.amount_cents - coalesce((SELECT sum(a.amount_cents)
                                                   FROM billing.credit_applications a
                                                  WHERE a.grant_id = g.grant_id), 0) AS remaining_cents
                 FROM billing.credit_grants g
                WHERE g.org_id = %s AND g.currency = %s AND g.voided_at IS NULL
                  AND (g.expires_at IS NULL OR g.expires_at >= %s)
                  AND NOT EXISTS (SELECT 1 FROM billing.credit_applications a
                                   WHERE a.grant_id = g.grant_id AND a.period = %s)
                ORDER BY g.expires_at ASC NULLS LAST, g.grant_id
                  FOR UPDATE OF g""",
            (org_id, currency.strip().lower(), period_close(period), period),
        ).fetchall()
    return [r for r in rows if r["remaining_cents"] > 0]


def allocate(grants: Sequence[dict], invoice_total_cents: int) -> list[tuple[dict, int]]:
    """(grant, amount) taking ``grants`` in order up to the invoice total (pure)."""
    left = max(0, int(invoice_total_cents))
    out = []
    for g in grants:
        if left <= 0:
            break
        take = min(int(g["remaining_cents"]), left)
        if take > 0:
            out.append((g, take))
            left -= take
    return out


def plan(
    cx, org_id: str, period: dt.date, invoice_total_cents: int, currency: str
) -> list[Application]:
    """What the org's credits give its ``period`` invoice of ``invoice_total_cents``."""
    period = period_of(period)
    currency = currency.strip().lower()
    return [
        Application(g["grant_id"], org_id, period, take, currency, g["reason"])
        for g, take in allocate(usable(cx, org_id, period, currency), invoice_total_cents)
    ]


def record(cx, applications: Iterable[tuple[Application, str]]) -> None:
    """The claim rows of ``applications`` (each with its outbox key), in the caller's
    transaction: the one that enqueues the credit items."""
    with cx.cursor() as cur:
        cur.executemany(
            """INSERT INTO billing.credit_applications
                   (grant_id, org_id, period, amount_cents, currency, outbox_key)
               VALUES (%s, %s, %s, %s, %s, %s)""",
            [
                (a.grant_id, a.org_id, a.period, a.amount_cents, a.currency, key)
                for a, key in applications
            ],
        )


def applied(cx, period: dt.date, org_ids: Sequence[str] | None = None) -> dict[str, int]:
    """Credits applied to each org's ``period`` invoice (minor units), for reconciliation."""
    sql = "SELECT org_id, sum(amount_cents) FROM billing.credit_applications WHERE period = %s"
    params: list = [period_of(period)]
    if org_ids is not None:
        sql += " AND org_id = ANY(%s)"
        params.append(list(org_ids))
    return {o: int(c) for o, c in cx.execute(sql + " GROUP BY org_id", params).fetchall()}


# ---------------------------------------------------------------- reading
def statement(cx, org_id: str, as_of: dt.datetime | dt.date) -> dict:
    """The org's credits as of ``as_of``: balance, each grant's state, every movement.

    Movements: ``grant`` (+), ``application`` (- , with its invoice period), ``expiry`` (-,
    what an expired grant had left) and ``void`` (-, the unapplied remainder), oldest first.
    """
    if not isinstance(as_of, dt.datetime):
        as_of = run_end(as_of)  # a day: as of its end
    org = cx.execute(
        "SELECT currency FROM billing.organizations WHERE org_id = %s", (org_id,)
    ).fetchone()
    if org is None:
        raise CreditError(f"unknown org {org_id!r}")
    with cx.cursor(row_factory=dict_row) as cur:
        grants = cur.execute(
            """SELECT grant_id, amount_cents, currency, expires_at, reason, granted_by,
                      granted_at, voided_at, voided_by, void_reason
                 FROM billing.credit_grants WHERE org_id = %s ORDER BY grant_id""",
            (org_id,),
        ).fetchall()
        apps = cur.execute(
            """SELECT grant_id, period, amount_cents, currency, outbox_key, applied_at
                 FROM billing.credit_applications WHERE org_id = %s
                ORDER BY period, grant_id""",
            (org_id,),
        ).fetchall()
    by_grant: dict[int, list[dict]] = defaultdict(list)
    for a in apps:
        by_grant[a["grant_id"]].append(a)
    movements: list[dict] = []
    out_grants: list[dict] = []
    balance: dict[str, int] = defaultdict(int)
    expired_total: dict[str, int] = defaultdict(int)
    for g in grants:
        cur_ = g["currency"].strip()
        used = sum(int(a["amount_cents"]) for a in by_grant[g["grant_id"]])
        remaining = int(g["amount_cents"]) - used
        if g["voided_at"] is not None:
            state = "voided"
        elif g["expires_at"] is not None and g["expires_at"] <= as_of:
            state = "expired" if remaining > 0 else "used"
        else:
            state = "active" if remaining > 0 else "used"
        base = {"grant_id": g["grant_id"], "currency": cur_}
        movements.append(
            {
                **base,
                "type": "grant",
                "at": g["granted_at"],
                "period": None,
                "amount_cents": int(g["amount_cents"]),
                "by": g["granted_by"],
                "note": g["reason"],
            }
        )
        for a in by_grant[g["grant_id"]]:
            movements.append(
                {
                    **base,
                    "type": "application",
                    "at": a["applied_at"],
                    "period": f"{a['period']:%Y-%m}",
                    "amount_cents": -int(a["amount_cents"]),
                    "by": "close",
                    "note": f"invoice {a['period']:%Y-%m}",
                }
            )
        if state == "voided" and remaining > 0:
            movements.append(
                {
                    **base,
                    "type": "void",
                    "at": g["voided_at"],
                    "period": None,
                    "amount_cents": -remaining,
                    "by": g["voided_by"],
                    "note": g["void_reason"] or "",
                }
            )
        if state == "expired":
            movements.append(
                {
                    **base,
                    "type": "expiry",
                    "at": g["expires_at"],
                    "period": None,
                    "amount_cents": -remaining,
                    "by": "expiry",
                    "note": "not used before it expired",
                }
            )
            expired_total[cur_] += remaining
        if state == "active":
            balance[cur_] += remaining
        out_grants.append(
            {
                "grant_id": g["grant_id"],
                "amount_cents": int(g["amount_cents"]),
                "applied_cents": used,
                "remaining_cents": remaining if state == "active" else 0,
                "expired_cents": remaining if state == "expired" else 0,
                "voided_cents": remaining if state == "voided" else 0,
                "currency": cur_,
                "state": state,
                "expires_at": g["expires_at"],
                "reason": g["reason"],
                "granted_by": g["granted_by"],
                "granted_at": g["granted_at"],
                "voided_at": g["voided_at"],
                "voided_by": g["voided_by"],
            }
        )
    movements.sort(key=lambda m: (m["at"], m["grant_id"], _ORDER[m["type"]]))
    currency = org[0].strip()
    return {
        "org_id": org_id,
        "currency": currency,
        "as_of": as_of,
        "balance_cents": balance.get(currency, 0),
        "expired_cents": expired_total.get(currency, 0),
        "grants": out_grants,
        "movements": movements,
    }


_ORDER = {"grant": 0, "application": 1, "void": 2, "expiry": 3}


# ---------------------------------------------------------------- for people
def format_statement(st: dict) -> str:
    """``billing credits list --format table``: balance, grants, then every movement."""
    from billing.platform.tables import money, render

    cur = st["currency"]
    head = (
        f"org {st['org_id']}: balance {money(st['balance_cents'], cur)}"
        f" (expired {money(st['expired_cents'], cur)}) as of {st['as_of']:%Y-%m-%d %H:%M} UTC"
    )
    grants = render(
        ("grant", "amount", "applied", "left", "state", "expires", "reason"),
        [
            (
                f"#{g['grant_id']}",
                money(g["amount_cents"], g["currency"]),
                money(g["applied_cents"], g["currency"]),
                money(
                    g["remaining_cents"] or g["expired_cents"] or g["voided_cents"], g["currency"]
                ),
                g["state"],
                _expires(g["expires_at"]),
                g["reason"],
            )
            for g in st["grants"]
        ],
        right=("amount", "applied", "left"),
        empty="(no grants)",
    )
    moves = render(
        ("when", "movement", "grant", "period", "amount", "by", "note"),
        [
            (
                f"{m['at']:%Y-%m-%d %H:%M}",
                m["type"],
                f"#{m['grant_id']}",
                m["period"] or "",
                money(m["amount_cents"], m["currency"]),
                m["by"],
                m["note"],
            )
            for m in st["movements"]
        ],
        right=("amount",),
        empty="(no movements)",
    )
    return f"{head}\n\n{grants}\n\n{moves}"


def _expires(at: dt.datetime | None) -> str:
    """An expiry as the last day the grant is usable (``--expires``), or ``never``."""
    if at is None:
        return "never"
    return f"through {(at - dt.timedelta(microseconds=1)).astimezone(dt.UTC):%Y-%m-%d}"


def format_change(result: dict) -> str:
    from billing.platform.tables import money

    if "voided_cents" in result:
        return (
            f"voided grant #{result['grant_id']} of {result['org_id']}: "
            f"{money(result['voided_cents'], result['currency'])} unapplied remainder"
        )
    return (
        f"granted #{result['grant_id']}: {money(result['amount_cents'], result['currency'])} "
        f"to {result['org_id']}, {_expires(result['expires_at'])}: {result['reason']}"
    )
