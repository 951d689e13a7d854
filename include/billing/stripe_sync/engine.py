"""Draining the outbox into Stripe: in order, per org, with bounded concurrency.

Each org's pending rows are sent one after another (customer first, then items, then its
invoice), different orgs in parallel up to ``Policy.concurrency`` and ``Policy.max_rps``.
A write that exhausts the retry policy is parked (outbox status + Redis); an org whose
customer or invoice is not in Stripe yet keeps its later rows pending ("blocked") for the
next drain. Before re-sending a write that an earlier drain already tried (it may have
reached Stripe: a lost response, a timeout), the write is looked up by the idempotency key
in its metadata and adopted if Stripe already has it, so exactly-once does not depend on
Stripe still holding the key (24 h) or on which API key sent the first attempt. Look-ups use list endpoints (strongly consistent), never
search, which Stripe documents as eventually consistent (up to a minute, longer in an
outage).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from billing import observability as obs
from billing.platform import db
from billing.stripe_sync import mode, outbox, parking
from billing.stripe_sync.client import Failure, Gateway, GiveUp, Policy

log = logging.getLogger(__name__)

DRAIN_LOCK = 7_202_612  # advisory lock: one drain at a time across processes
OUTCOMES = ("sent", "adopted", "parked", "blocked", "queued")
ADD_LINES_BATCH = 50  # lines per POST /v1/invoices/{id}/add_lines


class ForeignPendingItems(Exception):
    """A finalize without its invoice recorded (error class ``foreign_pending_items``, kept
    for the metric's label). Invoices are created with ``pending_invoice_items_behavior=
    exclude`` and take their items explicitly, so later periods' items never block a close."""


def field(obj: Any, key: str, default: Any = None) -> Any:
    """Field of a Stripe object (not a dict in SDK 16) or a dict; ``default`` when absent/null."""
    try:
        value = obj[key]
    except (KeyError, TypeError, IndexError):
        return default
    return default if value is None else value


def _ts(value: dt.datetime | dt.date | None) -> int | None:
    if value is None:
        return None
    if not isinstance(value, dt.datetime):
        value = dt.datetime.combine(value, dt.time(), dt.UTC)
    return int(value.timestamp())


class Engine:
    def __init__(
        self,
        policy: Policy | None = None,
        sleep: Callable[[float], None] | None = None,
        gateway: Gateway | None = None,
        redis_client=None,
    ):
        self.gw = gateway or Gateway(policy, sleep)
        self.policy = self.gw.policy
        self.redis = redis_client or parking.client()
        self._local = threading.local()
        self._conns: list[Any] = []
        self._conns_lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing
    def _cx(self):
        cx = getattr(self._local, "cx", None)
        if cx is None or cx.closed:
            cx = db.connect(autocommit=True)
            self._local.cx = cx
            with self._conns_lock:
                self._conns.append(cx)
        return cx

    def close(self) -> None:
        with self._conns_lock:
            for cx in self._conns:
                cx.close()
            self._conns.clear()
        self._local = threading.local()

    def read_only(self, cx=None) -> bool:
        """Outage mode (durable in Postgres: a Redis flush never switches it off)."""
        return mode.is_on(cx)

    # ------------------------------------------------------------------ drain
    def drain(self, *, ids: Sequence[int] | None = None, orgs: Sequence[str] | None = None) -> dict:
        """Send pending rows (all, or only ``ids`` / only ``orgs``); return outcome counts."""
        with db.connect(autocommit=True) as lock_cx:
            if self.read_only(lock_cx):
                n = self._queued(lock_cx)
                return self._read_only_summary(n)
            lock_cx.execute("SELECT pg_advisory_lock(%s)", (DRAIN_LOCK,))
            try:
                rows = outbox.pending(lock_cx, ids=ids)
                if orgs is not None:
                    rows = [r for r in rows if r["org_id"] in set(orgs)]
                rows = self._without_held(lock_cx, rows)
                groups: OrderedDict[str, list[dict]] = OrderedDict()
                for row in rows:
                    groups.setdefault(row["org_id"], []).append(row)
                totals: Counter = Counter()
                try:
                    workers = min(self.policy.concurrency, max(1, len(groups)))
                    with ThreadPoolExecutor(workers, thread_name_prefix="stripe-drain") as pool:
                        for result in pool.map(self._drain_group, groups.values()):
                            totals.update(result)
                finally:
                    self.close()
                still = self._queued(lock_cx)
            finally:
                lock_cx.execute("SELECT pg_advisory_unlock(%s)", (DRAIN_LOCK,))
        summary = {k: totals.get(k, 0) for k in OUTCOMES}
        summary["still_pending"] = still
        if summary["queued"]:
            summary["status"] = "read_only"
            summary["message"] = f"queued {still} writes (Stripe read-only)"
        else:
            summary["status"] = "parked" if summary["parked"] else "ok"
        return summary

    def _queued(self, cx) -> int:
        return cx.execute(
            "SELECT count(*) FROM billing.stripe_outbox WHERE status = 'pending'"
        ).fetchone()[0]

    def _read_only_summary(self, n: int) -> dict:
        message = f"queued {n} writes (Stripe read-only)"
        log.warning(message)
        obs.STRIPE_WRITES.labels("all", "queued").inc(n)
        return {
            **{k: 0 for k in OUTCOMES},
            "queued": n,
            "still_pending": n,
            "status": "read_only",
            "message": message,
        }

    def _without_held(self, cx, rows: list[dict]) -> list[dict]:
        """Hold an org's usage rows queued after its parked invoice: they belong to the next one."""
        held = dict(
            cx.execute(
                """SELECT org_id, min(outbox_id) FROM billing.stripe_outbox
                WHERE kind = 'invoice' AND status = 'parked' GROUP BY org_id"""
            ).fetchall()
        )
        # An invoice whose credit item is parked waits for it: finalized without it, the
        # customer would pay what the credit covers.
        credit_parked = set(
            cx.execute(
                """SELECT DISTINCT org_id, period FROM billing.stripe_outbox
                    WHERE kind = 'credit' AND status = 'parked'"""
            ).fetchall()
        )
        return [
            r
            for r in rows
            if not (
                r["org_id"] in held
                and r["kind"] in ("usage_item", "base_fee")
                and r["outbox_id"] > held[r["org_id"]]
            )
            and not (
                r["kind"] in ("invoice", "finalize") and (r["org_id"], r["period"]) in credit_parked
            )
        ]

    def _drain_group(self, rows: list[dict]) -> Counter:
        cx = self._cx()
        result: Counter = Counter()
        if self.read_only(cx):  # switched on mid-drain: leave the rest queued
            result["queued"] += len(rows)
            return result
        org = rows[0]["org_id"]
        found = cx.execute(
            "SELECT stripe_customer_id FROM billing.stripe_customers WHERE org_id = %s", (org,)
        ).fetchone()
        customer_id = found[0] if found else None
        failed = False
        for row in rows:
            if row["kind"] != "customer" and customer_id is None:
                outcome = "blocked"
            elif row["kind"] in ("invoice", "finalize") and failed:
                outcome = "blocked"
            else:
                outcome, object_id = self._send(cx, row, customer_id)
                if row["kind"] == "customer" and object_id:
                    customer_id = object_id
                failed = failed or outcome == "parked"
            obs.STRIPE_WRITES.labels(row["kind"], outcome).inc()
            result[outcome] += 1
        return result

    # ------------------------------------------------------------------ one write
    def _send(self, cx, row: dict, customer_id: str | None) -> tuple[str, str | None]:
        oid = row["outbox_id"]

        def on_failure(f: Failure, delay: float | None) -> None:
            outbox.record_failure(cx, oid, f.error_class, f.message, delay is not None)

        outbox.mark_attempting(cx, [oid])  # before any HTTP: the 24 h clock starts here
        try:
            if self._needs_lookup(row):
                existing, _ = self.gw.call(
                    "lookup_" + row["kind"],
                    lambda: self._find_existing(cx, row, customer_id),
                    on_failure,
                )
                if existing:
                    self._done(cx, row, existing, adopted=True)
                    log.info("adopted %s %s for %s", row["kind"], existing, row["idempotency_key"])
                    return "adopted", existing
            obj, _ = self.gw.call(
                "create_" + row["kind"], lambda: self._create(cx, row, customer_id), on_failure
            )
        except GiveUp as give_up:
            f = give_up.failure
            outbox.mark_parked(cx, oid)
            parking.park(
                self.redis,
                {**row, "attempts": row["attempts"] + give_up.attempts},
                f.message,
                f.error_class,
            )
            log.warning(
                "parked %s after %d attempt(s): %s",
                row["idempotency_key"],
                give_up.attempts,
                f.message,
            )
            return "parked", None
        except ForeignPendingItems as exc:
            outbox.record_failure(cx, oid, "foreign_pending_items", str(exc), False)
            outbox.mark_parked(cx, oid)
            parking.park(self.redis, row, str(exc), "foreign_pending_items")
            return "parked", None
        self._done(cx, row, obj)
        return "sent", obj["id"]

    def _done(self, cx, row: dict, obj: Any, *, adopted: bool = False) -> None:
        object_id = obj if isinstance(obj, str) else obj["id"]
        # A credit note changed its invoice's amount due: re-read the invoice under the
        # retry policy, before the transaction (a transient failure must not abort the
        # drain: the note exists, so the row is sent whatever this read gives).
        credited = self._credited_invoice(cx, row) if row["kind"] == "credit_note" else None
        with cx.transaction():
            if row["kind"] == "customer":
                cx.execute(
                    """INSERT INTO billing.stripe_customers (org_id, stripe_customer_id) VALUES (%s, %s)
                       ON CONFLICT (org_id) DO NOTHING""",
                    (row["org_id"], object_id),
                )
            elif row["kind"] in ("invoice", "finalize"):
                invoice = (
                    obj
                    if not isinstance(obj, str)
                    else self.gw.once(
                        "retrieve_invoice", lambda: self.gw.v1.invoices.retrieve(object_id)
                    )
                )
                upsert_invoice(cx, row["org_id"], row["period"], invoice)
            elif row["kind"] == "credit_note" and credited is not None:
                upsert_invoice(cx, row["org_id"], row["period"], credited)
            outbox.mark_sent(
                cx, row["outbox_id"], object_id, adopted=adopted, attempted=not adopted
            )
        if row.get("parked_at") is not None or row["status"] == "parked":
            parking.unpark(self.redis, row["idempotency_key"])

    def _needs_lookup(self, row: dict) -> bool:
        """Look in Stripe before sending: invoices always; other writes when an earlier
        drain already tried them (``first_attempt_at`` as loaded, before this drain stamped
        it), since that attempt may have reached Stripe. Stripe replays a key it still
        holds, but only documents holding it for 24 h, and not whether a rolled API key
        sees it (docs/STRIPE_KEYS_ROTATION.md): the look-up (lists, strongly consistent)
        keeps a retry exactly-once without relying on either."""
        if row["kind"] in ("invoice", "finalize"):
            return True  # once per org per month, and never two invoices
        return row["first_attempt_at"] is not None

    def _create(self, cx, row: dict, customer_id: str | None) -> Any:
        params = dict(row["payload"])
        opts = {"idempotency_key": row["idempotency_key"]}
        v1 = self.gw.v1
        kind = row["kind"]
        if kind == "customer":
            return v1.customers.create(params=params, options=opts)
        if kind in ("usage_item", "base_fee", "credit"):
            return v1.invoice_items.create(params={**params, "customer": customer_id}, options=opts)
        if kind == "invoice":
            # pending_invoice_items_behavior=exclude (the payload): the invoice takes no
            # pending item by itself, so next month's items never land on it.
            return v1.invoices.create(params={**params, "customer": customer_id}, options=opts)
        if kind == "finalize":
            invoice_id = self._invoice_id(cx, row)
            self._attach_items(row, customer_id, invoice_id)
            return v1.invoices.finalize_invoice(invoice_id, params=params, options=opts)
        if kind == "credit_note":
            return self._credit_note(cx, row, params, opts)
        raise ValueError(f"unknown outbox kind {kind!r}")

    def _credit_note(self, cx, row: dict, params: dict, opts: dict) -> Any:
        """A correction's credit note against the period's finalized invoice (resolved now):
        pre-payment on an open invoice; on a paid one Stripe wants the split, credited to
        the customer's balance (billing.stripe_sync.corrections)."""
        invoice_id = self._invoice_id(cx, row)
        invoice = self.gw.once("retrieve_invoice", lambda: self.gw.v1.invoices.retrieve(invoice_id))
        params = {**params, "invoice": invoice_id}
        if invoice["status"] == "paid":
            params["credit_amount"] = -int(row["amount_cents"])
        return self.gw.v1.credit_notes.create(params=params, options=opts)

    def _credited_invoice(self, cx, row: dict) -> Any:
        """The invoice a sent credit note lowered, as Stripe has it now; None when Stripe
        keeps failing (logged: stripe_sync_invoices refreshes the row later)."""
        invoice_id = self._invoice_id(cx, row)
        try:
            invoice, _ = self.gw.call(
                "retrieve_invoice", lambda: self.gw.v1.invoices.retrieve(invoice_id)
            )
        except GiveUp as give_up:
            log.warning(
                "credit note %s sent; invoice %s not re-read (%s): the invoice sync refreshes it",
                row["idempotency_key"],
                invoice_id,
                give_up.failure.message,
            )
            return None
        return invoice

    def _invoice_id(self, cx, row: dict) -> str:
        found = cx.execute(
            "SELECT stripe_invoice_id FROM billing.stripe_invoices WHERE org_id = %s AND period = %s",
            (row["org_id"], row["period"]),
        ).fetchone()
        if not found:
            raise ForeignPendingItems(
                f"no Stripe invoice recorded for {row['org_id']} {row['period']:%Y-%m}"
            )
        return found[0]

    def _attach_items(self, row: dict, customer_id: str, invoice_id: str) -> None:
        """Attach the customer's pending items of this period or earlier to its draft invoice.

        Earlier periods' items are late corrections pushed after their own invoice (the
        lateness window); later periods' items stay pending for their own close. Stripe's
        list is the truth (strongly consistent), so a retry after a partial attach only
        adds what is still pending: idempotent without a key.
        """
        period = row["period"].strftime("%Y-%m")
        invoice = self.gw.once("retrieve_invoice", lambda: self.gw.v1.invoices.retrieve(invoice_id))
        if invoice["status"] != "draft":
            return
        ids = [
            ii["id"]
            for ii in self._iter_list(
                lambda p: self.gw.v1.invoice_items.list(params=p),
                {"customer": customer_id, "pending": True},
            )
            if field(field(ii, "metadata", {}), "period", "9999-99") <= period
            and field(ii, "currency") == invoice["currency"]
        ]
        for start in range(0, len(ids), ADD_LINES_BATCH):
            batch = ids[start : start + ADD_LINES_BATCH]
            self.gw.once(
                "add_lines",
                lambda b=batch: self.gw.v1.invoices.add_lines(
                    invoice_id, params={"lines": [{"invoice_item": i} for i in b]}
                ),
            )

    def _iter_list(self, fetch: Callable[[dict], Any], params: dict) -> Iterator[Any]:
        """Cursor-paginate a list endpoint, each page through the rate limiter."""
        params = {**params, "limit": 100}
        while True:
            page = self.gw.once("list", lambda p=dict(params): fetch(p))
            data = list(page["data"])
            yield from data
            if not page["has_more"] or not data:
                return
            params["starting_after"] = data[-1]["id"]

    def _find_existing(self, cx, row: dict, customer_id: str | None) -> str | None:
        """The Stripe id of an object already carrying this row's idempotency key, if any."""
        key, kind = row["idempotency_key"], row["kind"]
        since = row["first_attempt_at"] or row["created_at"]
        created = {"gte": _ts(since - dt.timedelta(hours=1))}
        if kind == "customer":
            # Not customers.search: Stripe's search is eventually consistent ("don't use
            # search for read-after-write flows"); the list is current. Our own earlier
            # attempt created it at or after its first attempt, with the payload's email.
            params: dict[str, Any] = {"created": created}
            if row["payload"].get("email"):
                params["email"] = row["payload"]["email"]
            for c in self._iter_list(lambda p: self.gw.v1.customers.list(params=p), params):
                if field(field(c, "metadata", {}), "org_id") == row["org_id"]:
                    return c["id"]
            return None
        if kind in ("usage_item", "base_fee", "credit"):
            for ii in self._iter_list(
                lambda p: self.gw.v1.invoice_items.list(params=p),
                {"customer": customer_id, "created": created},
            ):
                if field(field(ii, "metadata", {}), "idempotency_key") == key:
                    return ii["id"]
            return None
        if kind == "invoice":
            for inv in self._iter_list(
                lambda p: self.gw.v1.invoices.list(params=p),
                {"customer": customer_id, "created": created},
            ):
                if field(field(inv, "metadata", {}), "idempotency_key") == key:
                    return inv["id"]
            return None
        if kind == "finalize":
            inv = self.gw.v1.invoices.retrieve(self._invoice_id(cx, row))
            return inv["id"] if inv["status"] != "draft" else None
        if kind == "credit_note":
            for cn in self._iter_list(
                lambda p: self.gw.v1.credit_notes.list(params=p),
                {"invoice": self._invoice_id(cx, row)},
            ):
                if field(field(cn, "metadata", {}), "idempotency_key") == key:
                    return cn["id"]
            return None
        raise ValueError(kind)


def upsert_invoice(cx, org_id: str, period: dt.date, inv: Any) -> None:
    """Record a Stripe invoice's status and amounts (dunning reads this table)."""
    finalized = field(field(inv, "status_transitions", {}), "finalized_at")
    cx.execute(
        """INSERT INTO billing.stripe_invoices
               (org_id, period, stripe_invoice_id, status, currency, amount_due_cents,
                amount_paid_cents, amount_remaining_cents, due_at, finalized_at, synced_at)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, to_timestamp(%s), to_timestamp(%s), now())
           ON CONFLICT (org_id, period) DO UPDATE SET
               stripe_invoice_id = EXCLUDED.stripe_invoice_id, status = EXCLUDED.status,
               currency = EXCLUDED.currency, amount_due_cents = EXCLUDED.amount_due_cents,
               amount_paid_cents = EXCLUDED.amount_paid_cents,
               amount_remaining_cents = EXCLUDED.amount_remaining_cents,
               due_at = EXCLUDED.due_at,
               finalized_at = coalesce(EXCLUDED.finalized_at, billing.stripe_invoices.finalized_at),
               synced_at = now()""",
        (
            org_id,
            period,
            inv["id"],
            inv["status"],
            field(inv, "currency"),
            field(inv, "amount_due"),
            field(inv, "amount_paid"),
            field(inv, "amount_remaining"),
            field(inv, "due_date"),
            finalized,
        ),
    )
