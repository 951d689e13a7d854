"""Stripe emulator for the local stack: localstripe plus the Stripe behaviour we rely on.

Run it as::

    python -m billing_dev.stack.stripe_emulator --host 127.0.0.1 --port 8420 --state-dir DIR

It serves localstripe's own routes (customers, payment methods, subscriptions, ...) and adds,
in front of them, what localstripe lacks or gets wrong for this project:

* ``Idempotency-Key`` on POST requests, scoped to the account and mode as in Stripe (the
  emulator is one test-mode account: every ``sk_test_``/``rk_test_`` key is one of its keys,
  so a rolled key sees the old key's records): a replay with the same parameters returns the
  saved status and body with ``Idempotent-Replayed: true``; reuse with other parameters (or
  another endpoint) is a 400 ``idempotency_error``; a request whose key is still being
  executed by another request is a 409 ``idempotency_key_in_use`` (nothing saved, retry
  later). Records live 24 hours (emulator clock) and are persisted with the objects.
* One-off invoices built from a customer's pending invoice items (``POST /v1/invoices``
  without a subscription), with ``finalize``, ``pay``, ``void`` and ``mark_uncollectible``
  following Stripe's status machine (draft -> open -> paid | void | uncollectible,
  uncollectible -> paid | void).
* Invoice items with ``quantity``/``unit_amount_decimal``/``period``/``metadata``, listed with
  ``customer``, ``invoice`` and ``pending`` filters and cursor pagination.
* ``GET /v1/customers/search`` and ``GET /v1/invoices/search`` (Stripe's search query
  language: ``field:'v'``, ``metadata['k']:'v'``, ``~``, ``>``/``<``, ``-`` negation, ``null``,
  clauses joined with ``AND`` or ``OR``), **eventually consistent** like Stripe's ("don't use
  search for read-after-write flows ... data is searchable in under 1 minute"): a new
  customer or invoice becomes searchable ``--search-lag-seconds`` (default 60, the
  documented bound) after its creation. List and retrieve endpoints are always current.
* ``GET /v1/customers`` with Stripe's filters (``email``, ``created``) and cursors, newest
  first.
* Credit notes (``POST /v1/credit_notes``, ``GET /v1/credit_notes[/preview|/{id}]``,
  ``POST /v1/credit_notes/{id}/void``) on finalized one-off invoices only: pre-payment on an
  open invoice (at most its ``amount_remaining``; reduces ``amount_due`` and adds to
  ``pre_payment_credit_notes_amount``, a fully credited invoice turns paid), post-payment on
  a paid one (``credit_amount + refund_amount + out_of_band_amount`` must equal the total, at
  most ``amount_paid`` minus earlier post-payment notes). Balances and refunds are not moved.
* Test hooks under ``/_emulator/`` (no key, loopback only): ``POST clock/advance``
  (``seconds``: moves the emulator clock that ages idempotency records and the search
  index), ``POST search/flush`` (index everything now), ``POST search/lag`` (``seconds``),
  and ``POST holds`` / ``GET holds/wait`` / ``POST holds/release`` (``idempotency_key``: hold
  the next request with that key before it executes, wait until one is held, let it go),
  so tests see "not yet indexed" or "in flight" deterministically, without sleeping.
* Stripe-shaped JSON errors everywhere (404 ``Unrecognized request URL``, 401, 500
  ``api_error``), a ``Request-Id`` on every response and one stderr log line per request
  (method, path, status; never the query string or the key).
* State in ``--state-dir`` (not localstripe's fixed ``/tmp/localstripe.pickle``), rewritten
  atomically (temp file, fsync, ``os.replace``, directory fsync) after every mutating request
  and loaded at start, so ``kill -9`` never leaves a torn file. A lock file keeps a second
  emulator off the same state directory.

Known limits (deliberate, documented): customer credit balances are not applied to one-off
invoices (``starting_balance`` is 0), ``auto_advance`` is recorded but no clock advances
drafts, taxes only come from explicit tax rates; search lags only for new objects (updates
are searchable at once), and a restart indexes everything; the clock moves only what the
emulator itself ages (object ``created`` times stay real).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import fcntl
import hashlib
import importlib
import json
import logging
import os
import pickle
import re
import secrets
import signal
import string
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from localstripe import resources as ls
from localstripe import server as ls_server
from localstripe.errors import UserError

log = logging.getLogger("billing.stripe_emulator")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8420
STATE_FILE = "state.pickle"
LOCK_FILE = "emulator.lock"
STATE_FORMAT = 1
IDEMPOTENCY_TTL_SECONDS = 24 * 3600
# Stripe: "Under normal operating conditions, data is searchable in under 1 minute."
DEFAULT_SEARCH_LAG_SECONDS = 60.0
SEARCH_LAG_ENV = "BILLING_STRIPE_EMULATOR_SEARCH_LAG_SECONDS"
SEARCHABLE = ("customer:", "invoice:")  # store key prefixes of the searchable resources
# The emulator is one Stripe account; all its keys are test-mode keys.
ACCOUNT_ID = "acct_1BillingEmulator0"
MODE = "test"
MAX_IDEMPOTENCY_KEY_LENGTH = 255
DEFAULT_CURRENCY = "usd"
DEFAULT_DAYS_UNTIL_DUE = 30
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "", "*"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class EmulatorError(Exception):
    """Start-up problem (bad arguments, state dir in use, unreadable state)."""


# --------------------------------------------------------------------------------------
# Errors and JSON
# --------------------------------------------------------------------------------------


class StripeAPIError(Exception):
    """An error answered as Stripe does: ``{"error": {"type", "message", ...}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error: dict[str, Any] = {"type": type, "message": message}
        if code is not None:
            self.error["code"] = code
            self.error["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
        if param is not None:
            self.error["param"] = param
        if extra:
            self.error.update(extra)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return web.Response(text=body, status=status, content_type="application/json", headers=headers)


def _error_json(error: dict[str, Any], status: int) -> web.Response:
    return _json({"error": error}, status=status)


def _missing(param: str) -> StripeAPIError:
    return StripeAPIError(
        400, f"Missing required param: {param}.", code="parameter_missing", param=param
    )


def _invalid(param: str, message: str, code: str = "parameter_invalid") -> StripeAPIError:
    return StripeAPIError(400, message, code=code, param=param)


def _no_such(kind: str, object_id: Any, param: str = "id") -> StripeAPIError:
    return StripeAPIError(
        404, f"No such {kind}: '{object_id}'", code="resource_missing", param=param
    )


def _unrecognized(request: web.Request) -> StripeAPIError:
    return StripeAPIError(
        404,
        f"Unrecognized request URL ({request.method}: {request.path}). Please see "
        "https://stripe.com/docs or we can help at https://support.stripe.com/.",
    )


def _error_response(exc: BaseException, request: web.Request) -> web.Response:
    """Turn any exception raised while serving ``request`` into a Stripe-shaped answer."""
    if isinstance(exc, StripeAPIError):
        return _error_json(dict(exc.error), exc.status)
    if isinstance(exc, UserError):
        # localstripe's errors are always typed invalid_request_error; fix the type the way
        # Stripe types them (402 -> card_error, 5xx -> api_error).
        error = dict(exc.body.get("error") or {})
        status = int(exc.code)
        error.setdefault("message", "Bad request")
        if status == 402:
            error["type"] = "card_error"
        elif status >= 500:
            error["type"] = "api_error"
        else:
            error["type"] = "invalid_request_error"
        if status == 404 and error.get("message") == "Not Found":
            error.setdefault("code", "resource_missing")
            object_id = request.match_info.get("id")
            if object_id:
                error["message"] = f"No such object: '{object_id}'"
                error.setdefault("param", "id")
        return _error_json(error, status)
    if isinstance(exc, web.HTTPNotFound | web.HTTPMethodNotAllowed):
        return _error_json(dict(_unrecognized(request).error), 404)
    if isinstance(exc, web.HTTPException) and 400 <= exc.status < 500:
        return _error_json({"type": "invalid_request_error", "message": exc.reason}, exc.status)
    log.error("internal error on %s %s", request.method, request.path, exc_info=exc)
    return _error_json(
        {
            "type": "api_error",
            "message": "An unexpected error occurred in the Stripe emulator; see its log.",
        },
        500,
    )


# --------------------------------------------------------------------------------------
# Parameter helpers
# --------------------------------------------------------------------------------------


async def _post_params(request: web.Request) -> dict[str, Any]:
    data = await ls_server.get_post_data(request)
    params = dict(data) if data else {}
    if request.query:
        params.update(ls_server.unflatten_data(request.query))
    return params


def _query_params(request: web.Request) -> dict[str, Any]:
    return dict(ls_server.unflatten_data(request.query)) if request.query else {}


def _reject_unknown(params: dict[str, Any], allowed: Iterable[str]) -> None:
    allowed = set(allowed)
    for name in params:
        if name not in allowed:
            raise StripeAPIError(
                400, f"Received unknown parameter: {name}", code="parameter_unknown", param=name
            )


def _pop_expand(params: dict[str, Any]) -> list[str]:
    expand = params.pop("expand", None)
    if expand is None or expand == "":
        return []
    if isinstance(expand, str):
        expand = [expand]
    if not isinstance(expand, list) or not all(isinstance(e, str) for e in expand):
        raise _invalid("expand", "Invalid array: expand must be a list of strings.")
    return expand


def _as_int(value: Any, param: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool):
        raise _invalid(param, f"Invalid integer: {value}", "parameter_invalid_integer")
    if isinstance(value, int):
        result = value
    else:
        try:
            result = int(str(value).strip())
        except ValueError:
            raise _invalid(
                param, f"Invalid integer: {value}", "parameter_invalid_integer"
            ) from None
    if minimum is not None and result < minimum:
        raise _invalid(param, f"This value must be greater than or equal to {minimum}.")
    return result


def _as_bool(value: Any, param: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _invalid(param, f"Invalid boolean: {value}")


def _as_str(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise _invalid(param, f"Invalid string: {value!r}", "parameter_invalid_string")
    return value


def _as_decimal(value: Any, param: str) -> Decimal:
    try:
        result = Decimal(str(value).strip())
    except InvalidOperation:
        raise _invalid(param, f"Invalid decimal: {value}") from None
    if not result.is_finite():
        raise _invalid(param, f"Invalid decimal: {value}")
    return result


def _as_currency(value: Any, param: str = "currency") -> str:
    currency = _as_str(value, param).strip().lower()
    if not re.fullmatch(r"[a-z]{3}", currency):
        raise _invalid(param, f"Invalid currency: {value}. Stripe currencies are ISO 4217 codes.")
    return currency


def _new_metadata(value: Any, param: str = "metadata") -> dict[str, str]:
    """Metadata on create: a dict of strings; empty values are simply not stored."""
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise _invalid(param, "Invalid metadata: must be a hash of key/value pairs.")
    result: dict[str, str] = {}
    for key, val in value.items():
        if "[" in key or "]" in key:
            raise _invalid(f"{param}[{key}]", "Metadata keys can't contain square brackets.")
        if val is None or val == "":
            continue
        result[str(key)] = val if isinstance(val, str) else json.dumps(val)
    return result


def _merge_metadata(current: dict[str, str] | None, value: Any) -> dict[str, str]:
    """Metadata on update: merge; an empty value unsets a key, ``metadata=''`` unsets all."""
    merged = dict(current or {})
    if value == "":
        return {}
    if not isinstance(value, dict):
        raise _invalid("metadata", "Invalid metadata: must be a hash of key/value pairs.")
    for key, val in value.items():
        if val is None or val == "":
            merged.pop(str(key), None)
        else:
            merged[str(key)] = val if isinstance(val, str) else json.dumps(val)
    return merged


def _set_metadata(obj: Any, metadata: dict[str, str]) -> None:
    # localstripe shares one metadata dict between an invoice item and its line item: update
    # in place so both keep seeing the same values.
    if isinstance(getattr(obj, "metadata", None), dict):
        obj.metadata.clear()
        obj.metadata.update(metadata)
    else:
        obj.metadata = metadata


def _created_filter(value: Any, param: str = "created") -> Callable[[int], bool]:
    if isinstance(value, dict):
        bounds = {}
        for op in ("gt", "gte", "lt", "lte"):
            if op in value:
                bounds[op] = _as_int(value[op], f"{param}[{op}]")
        unknown = set(value) - set(bounds)
        if unknown:
            raise _invalid(param, f"Received unknown parameter: {param}[{sorted(unknown)[0]}]")

        def check(ts: int) -> bool:
            return (
                ("gt" not in bounds or ts > bounds["gt"])
                and ("gte" not in bounds or ts >= bounds["gte"])
                and ("lt" not in bounds or ts < bounds["lt"])
                and ("lte" not in bounds or ts <= bounds["lte"])
            )

        return check
    exact = _as_int(value, param)
    return lambda ts: ts == exact


# --------------------------------------------------------------------------------------
# Store access
# --------------------------------------------------------------------------------------


def _objects(cls: type, *, newest_first: bool = True) -> list[Any]:
    """All stored objects of a class, in creation order (the store is insertion-ordered)."""
    prefix = cls.object + ":"
    items = [obj for key, obj in list(ls.store.items()) if key.startswith(prefix)]
    return items[::-1] if newest_first else items


def _retrieve(cls: type, object_id: Any, kind: str, param: str = "id") -> Any:
    if not isinstance(object_id, str) or not object_id:
        raise _no_such(kind, object_id, param)
    obj = ls.store.get(f"{cls.object}:{object_id}")
    if obj is None:
        raise _no_such(kind, object_id, param)
    return obj


def _random_id(prefix: str, n: int = 24) -> str:
    alphabet = string.ascii_letters + string.digits
    return prefix + "".join(secrets.choice(alphabet) for _ in range(n))


def _event(kind: str, obj: Any) -> None:
    """Record an event (and deliver it to webhooks registered through localstripe)."""
    ls.schedule_webhook(ls.Event(kind, obj))


def _export_list(items: list[Any], params: dict[str, Any], url: str) -> dict[str, Any]:
    """Stripe cursor pagination over ``items`` (already ordered)."""
    expand = [e[len("data.") :] for e in _pop_expand(params) if e.startswith("data.")]
    limit = _as_int(params.pop("limit", 10), "limit")
    if not 1 <= limit <= 100:
        raise _invalid("limit", "Limit must be between 1 and 100.")
    starting_after = params.pop("starting_after", None)
    ending_before = params.pop("ending_before", None)
    if starting_after and ending_before:
        raise StripeAPIError(
            400, "You may only specify one of these parameters: ending_before, starting_after."
        )
    ids = [obj.id for obj in items]
    if starting_after:
        if starting_after not in ids:
            raise _no_such("object", starting_after, "starting_after")
        start = ids.index(starting_after) + 1
        page = items[start : start + limit]
        has_more = len(items) > start + limit
    elif ending_before:
        if ending_before not in ids:
            raise _no_such("object", ending_before, "ending_before")
        end = ids.index(ending_before)
        start = max(0, end - limit)
        page = items[start:end]
        has_more = start > 0
    else:
        page = items[:limit]
        has_more = len(items) > limit
    return {
        "object": "list",
        "data": [obj._export(expand=expand) for obj in page],
        "has_more": has_more,
        "url": url,
    }


# --------------------------------------------------------------------------------------
# One-off invoices
# --------------------------------------------------------------------------------------


def _ensure_invoice_numbering(customer: Any) -> None:
    if not getattr(customer, "invoice_prefix", None):
        customer.invoice_prefix = secrets.token_hex(4).upper()
    if not getattr(customer, "next_invoice_sequence", None):
        customer.next_invoice_sequence = 1


def _line_for_item(invoice: Any, item_id: str) -> Any | None:
    for line in invoice.lines._list:
        if getattr(line, "invoice_item", None) == item_id:
            return line
    return None


class EmuInvoice(ls.Invoice):
    """A one-off invoice (no subscription) built from pending invoice items.

    localstripe's ``Invoice`` derives its status from private flags and a PaymentIntent and
    has no ``uncollectible`` state; here the status is explicit and the totals follow Stripe:
    ``total = subtotal + tax`` (may be negative), ``amount_due = max(0, total)``.
    All methods are underscored: localstripe exports every public attribute.
    """

    def __init__(
        self,
        customer: Any,
        *,
        currency: str,
        collection_method: str,
        due_date: int | None,
        auto_advance: bool,
        description: str | None,
        footer: str | None,
        metadata: dict[str, str],
        default_tax_rates: list[Any],
        default_payment_method: str | None,
    ) -> None:
        ls.StripeObject.__init__(self)
        now = self.created
        self.customer = customer.id
        self.customer_email = customer.email
        self.customer_name = customer.name
        self.subscription = None
        self.currency = currency
        self.collection_method = collection_method
        self.due_date = due_date
        self.auto_advance = auto_advance
        self.automatically_finalizes_at = now + 3600 if auto_advance else None
        self.billing_reason = "manual"
        self.description = description
        self.footer = footer
        self.metadata = metadata
        self.number = None
        self.date = now
        self.effective_at = None
        self.period_start = now
        self.period_end = now
        self.tax_percent = None
        self.default_tax_rates = default_tax_rates
        self.default_payment_method = default_payment_method
        self.payment_intent = None
        self.attempt_count = 0
        self.attempted = False
        self.paid_out_of_band = False
        self.starting_balance = 0
        self.ending_balance = None
        self.amount_shipping = 0
        self.application_fee_amount = None
        self.discount = None
        self.discounts = []
        self.hosted_invoice_url = None
        self.invoice_pdf = None
        self.receipt_number = None
        self.statement_descriptor = None
        self.last_finalization_error = None
        self.webhooks_delivered_at = None
        self.status_transitions = {
            "finalized_at": None,
            "marked_uncollectible_at": None,
            "paid_at": None,
            "voided_at": None,
        }
        self.lines = ls.List("/v1/invoices/" + self.id + "/lines")
        self._status = "draft"

    # ----- derived fields (exported as properties) -----
    @property
    def status(self) -> str:
        return self._status

    @property
    def total(self) -> int:
        return self.subtotal + self.tax

    @property
    def total_excluding_tax(self) -> int:
        return self.subtotal

    @property
    def subtotal_excluding_tax(self) -> int:
        return self.subtotal

    @property
    def amount_due(self) -> int:
        # Pre-payment credit notes reduce what is due (Stripe keeps ``total`` unchanged).
        return max(0, self.total + self.starting_balance - self.pre_payment_credit_notes_amount)

    @property
    def pre_payment_credit_notes_amount(self) -> int:
        return getattr(self, "_pre_payment_credit", 0)

    @property
    def post_payment_credit_notes_amount(self) -> int:
        return getattr(self, "_post_payment_credit", 0)

    @property
    def amount_paid(self) -> int:
        return self.amount_due if self._status == "paid" else 0

    @property
    def amount_remaining(self) -> int:
        return self.amount_due - self.amount_paid

    @property
    def paid(self) -> bool:
        return self._status == "paid"

    @property
    def next_payment_attempt(self) -> int | None:
        finalized_at = self.status_transitions.get("finalized_at")
        if (
            self._status == "open"
            and self.collection_method == "charge_automatically"
            and self.auto_advance
            and finalized_at
        ):
            return finalized_at + 3600
        return None

    # ----- lines -----
    def _attach_item(self, item: Any) -> None:
        item.invoice = self.id
        self.lines._list.append(ls.InvoiceLineItem(item))

    def _detach_item(self, item: Any) -> None:
        line = _line_for_item(self, item.id)
        if line is not None:
            self.lines._list.remove(line)
            ls.store.pop(f"{line.object}:{line.id}", None)
        item.invoice = None

    def _sync_item(self, item: Any) -> None:
        line = _line_for_item(self, item.id)
        if line is None:
            return
        line.amount = item.amount
        line.currency = item.currency
        line.description = item.description
        line.period = item.period
        line.quantity = item.quantity
        line.metadata = item.metadata
        line.tax_rates = item.tax_rates

    # ----- transitions -----
    def _finalize_now(self, auto_advance: bool | None = None) -> None:
        customer = ls.Customer._api_retrieve(self.customer)
        _ensure_invoice_numbering(customer)
        now = int(time.time())
        if self.number is None:
            self.number = f"{customer.invoice_prefix}-{customer.next_invoice_sequence:04d}"
            customer.next_invoice_sequence += 1
        if auto_advance is not None:
            self.auto_advance = auto_advance
        self.automatically_finalizes_at = None
        self.customer_email = customer.email
        self.customer_name = customer.name
        self._status = "open"
        self.status_transitions["finalized_at"] = now
        self.effective_at = now
        self.ending_balance = 0
        self.webhooks_delivered_at = now
        self.hosted_invoice_url = f"https://invoice.stripe.com/i/emulator/{self.id}"
        self.invoice_pdf = f"https://pay.stripe.com/invoice/emulator/{self.id}/pdf"
        _event("invoice.finalized", self)
        if self.amount_due == 0:
            # Stripe marks invoices with nothing to collect as paid on finalization.
            self._mark_paid()

    def _mark_paid(self, *, out_of_band: bool = False) -> None:
        self._status = "paid"
        self.paid_out_of_band = out_of_band
        self.status_transitions["paid_at"] = int(time.time())
        _event("invoice.paid", self)
        if not out_of_band and self.amount_due > 0:
            _event("invoice.payment_succeeded", self)

    def _on_payment_success(self) -> None:
        # Called by localstripe's PaymentIntent once its charge succeeded.
        if self._status in ("open", "uncollectible"):
            self._mark_paid()
        _persist_soon()

    def _on_payment_failure_now(self) -> None:
        _event("invoice.payment_failed", self)

    def _on_payment_failure_later(self) -> None:
        _event("invoice.payment_failed", self)
        _persist_soon()


def _pending_items(customer_id: str, currency: str | None = None) -> list[Any]:
    return [
        item
        for item in _objects(ls.InvoiceItem, newest_first=False)
        if item.customer == customer_id
        and item.invoice is None
        and (currency is None or item.currency == currency)
    ]


def _retrieve_invoice(object_id: str) -> Any:
    return _retrieve(ls.Invoice, object_id, "invoice")


def _transition_error(invoice: Any, action: str, allowed: Iterable[str]) -> StripeAPIError:
    allowed_text = " or ".join(f"'{s}'" for s in allowed)
    return StripeAPIError(
        400,
        f"You can only {action} an invoice whose status is {allowed_text}; "
        f"invoice {invoice.id} is '{invoice.status}'.",
    )


INVOICE_CREATE_PARAMS = {
    "auto_advance",
    "collection_method",
    "currency",
    "customer",
    "days_until_due",
    "default_payment_method",
    "default_tax_rates",
    "description",
    "due_date",
    "footer",
    "metadata",
    "pending_invoice_items_behavior",
    "subscription",
}

INVOICE_DRAFT_UPDATE_PARAMS = {
    "auto_advance",
    "collection_method",
    "days_until_due",
    "default_payment_method",
    "default_tax_rates",
    "description",
    "due_date",
    "footer",
    "metadata",
}
INVOICE_FINALIZED_UPDATE_PARAMS = {"auto_advance", "description", "footer", "metadata"}


def _collection_settings(
    params: dict[str, Any], created: int, current_method: str | None = None
) -> tuple[str, int | None]:
    method = params.get("collection_method", current_method or "charge_automatically")
    if method not in ("charge_automatically", "send_invoice"):
        raise _invalid(
            "collection_method",
            "Invalid collection_method: must be one of charge_automatically or send_invoice",
        )
    days = params.get("days_until_due")
    due = params.get("due_date")
    if method == "charge_automatically":
        for name in ("days_until_due", "due_date"):
            if params.get(name) not in (None, ""):
                raise _invalid(
                    name,
                    f"Invoices with collection_method=charge_automatically can't have a {name}; "
                    "use collection_method=send_invoice.",
                )
        return method, None
    if days not in (None, "") and due not in (None, ""):
        raise StripeAPIError(
            400, "You may only specify one of these parameters: days_until_due, due_date."
        )
    if due not in (None, ""):
        due_date = _as_int(due, "due_date")
        if due_date < created:
            raise _invalid("due_date", "The due_date must be in the future.")
        return method, due_date
    days_until_due = (
        DEFAULT_DAYS_UNTIL_DUE if days in (None, "") else _as_int(days, "days_until_due", minimum=0)
    )
    return method, created + days_until_due * 86400


def _tax_rates(value: Any, param: str) -> list[Any]:
    if value in (None, ""):
        return []
    if not isinstance(value, list):
        raise _invalid(param, f"Invalid array: {param}")
    return [_retrieve(ls.TaxRate, tr, "tax_rate", param) for tr in value]


async def create_invoice(request: web.Request) -> web.Response:
    params = await _post_params(request)
    if params.get("subscription"):
        # Subscription invoices stay localstripe's business.
        expand = _pop_expand(params)
        return _json(ls.Invoice._api_create(**params)._export(expand=expand))
    expand = _pop_expand(params)
    _reject_unknown(params, INVOICE_CREATE_PARAMS)
    params.pop("subscription", None)
    if not params.get("customer"):
        raise _missing("customer")
    customer = _retrieve(ls.Customer, params["customer"], "customer", "customer")
    # Since API version 2022-08-01 the default is ``exclude`` (``include_and_require`` is
    # gone): a new invoice takes no pending item unless asked to, and items then join it
    # explicitly (``invoice=`` on create, or ``add_lines``).
    behavior = params.get("pending_invoice_items_behavior", "exclude")
    if behavior not in ("include", "exclude"):
        raise _invalid(
            "pending_invoice_items_behavior",
            "Invalid pending_invoice_items_behavior: must be one of include or exclude",
        )
    pending = _pending_items(customer.id)
    if params.get("currency"):
        currency = _as_currency(params["currency"])
    else:
        currency = pending[0].currency if pending else DEFAULT_CURRENCY
    now = int(time.time())
    collection_method, due_date = _collection_settings(params, now)
    auto_advance = _as_bool(params.get("auto_advance", False), "auto_advance")
    description = params.get("description") or None
    footer = params.get("footer") or None
    default_pm = params.get("default_payment_method") or None
    if default_pm is not None:
        ls.PaymentMethod._api_retrieve(default_pm)
    invoice = EmuInvoice(
        customer,
        currency=currency,
        collection_method=collection_method,
        due_date=due_date,
        auto_advance=auto_advance,
        description=description and _as_str(description, "description"),
        footer=footer and _as_str(footer, "footer"),
        metadata=_new_metadata(params.get("metadata")),
        default_tax_rates=_tax_rates(params.get("default_tax_rates"), "default_tax_rates"),
        default_payment_method=default_pm,
    )
    if behavior == "include":
        for item in pending:
            if item.currency == currency:
                invoice._attach_item(item)
    _event("invoice.created", invoice)
    return _json(invoice._export(expand=expand))


ADD_LINE_PARAMS = {"invoice_item", "metadata", "description"}


async def add_invoice_lines(request: web.Request) -> web.Response:
    """``POST /v1/invoices/{id}/add_lines``: attach existing pending invoice items to a draft.

    As strict as Stripe: the invoice must be a draft; every item must exist, belong to the
    invoice's customer, be pending (on no invoice) and match the invoice's currency. The
    request is all or nothing (every line is checked before any is attached). Only lines
    naming an ``invoice_item`` are supported (new one-off lines are created with
    ``POST /v1/invoiceitems`` and ``invoice=``).
    """
    invoice = _retrieve_invoice(request.match_info["id"])
    params = await _post_params(request)
    expand = _pop_expand(params)
    _reject_unknown(params, {"lines", "invoice_metadata"})
    lines = params.get("lines")
    if isinstance(lines, dict):
        lines = [lines]
    if not lines or not isinstance(lines, list):
        raise _missing("lines")
    if not isinstance(invoice, EmuInvoice) or invoice.status != "draft":
        raise StripeAPIError(
            400,
            f"You can only add lines to draft invoices; invoice {invoice.id} is '{invoice.status}'.",
            code="invoice_not_editable",
        )
    items = []
    for i, line in enumerate(lines):
        if not isinstance(line, dict):
            raise _invalid(f"lines[{i}]", f"Invalid object: lines[{i}]")
        _reject_unknown(line, ADD_LINE_PARAMS)
        if not line.get("invoice_item"):
            raise _missing(f"lines[{i}][invoice_item]")
        item = _retrieve(
            ls.InvoiceItem, line["invoice_item"], "invoiceitem", f"lines[{i}][invoice_item]"
        )
        if item.customer != invoice.customer:
            raise _invalid(
                f"lines[{i}][invoice_item]",
                f"Invoice item {item.id} belongs to another customer than invoice {invoice.id}.",
            )
        if item.invoice is not None:
            raise _invalid(
                f"lines[{i}][invoice_item]",
                f"Invoice item {item.id} is already on invoice {item.invoice}.",
            )
        if item.currency != invoice.currency:
            raise _invalid(
                f"lines[{i}][invoice_item]",
                f"The invoice item currency ({item.currency}) must match the invoice "
                f"currency ({invoice.currency}).",
            )
        if item in items:
            raise _invalid(f"lines[{i}][invoice_item]", f"Invoice item {item.id} given twice.")
        items.append(item)
    for item, line in zip(items, lines, strict=True):
        if line.get("description"):
            item.description = _as_str(line["description"], "description")
        if line.get("metadata") is not None:
            _set_metadata(item, _merge_metadata(item.metadata, line["metadata"]))
        invoice._attach_item(item)
    if params.get("invoice_metadata") is not None:
        invoice.metadata = _merge_metadata(invoice.metadata, params["invoice_metadata"])
    _event("invoice.updated", invoice)
    return _json(invoice._export(expand=expand))


async def list_invoices(request: web.Request) -> web.Response:
    params = _query_params(request)
    filters: list[Callable[[Any], bool]] = []
    if "customer" in params:
        customer_id = params.pop("customer")
        _retrieve(ls.Customer, customer_id, "customer", "customer")
        filters.append(lambda inv: inv.customer == customer_id)
    if "subscription" in params:
        subscription_id = params.pop("subscription")
        filters.append(lambda inv: inv.subscription == subscription_id)
    if "status" in params:
        status = params.pop("status")
        if status not in ("draft", "open", "paid", "uncollectible", "void"):
            raise _invalid(
                "status",
                "Invalid status: must be one of draft, open, paid, uncollectible, or void",
            )
        filters.append(lambda inv: inv.status == status)
    if "collection_method" in params:
        method = params.pop("collection_method")
        filters.append(lambda inv: getattr(inv, "collection_method", None) == method)
    if "created" in params:
        created_ok = _created_filter(params.pop("created"))
        filters.append(lambda inv: created_ok(inv.created))
    if "due_date" in params:
        due_ok = _created_filter(params.pop("due_date"), "due_date")
        filters.append(
            lambda inv: getattr(inv, "due_date", None) is not None and due_ok(inv.due_date)
        )
    _reject_unknown(params, {"limit", "starting_after", "ending_before", "expand"})
    invoices = [
        inv
        for inv in _objects(ls.Invoice)
        if inv.id and not inv.id.startswith("upcoming_") and all(f(inv) for f in filters)
    ]
    return _json(_export_list(invoices, params, "/v1/invoices"))


async def update_invoice(request: web.Request) -> web.Response:
    invoice = _retrieve_invoice(request.match_info["id"])
    params = await _post_params(request)
    if not isinstance(invoice, EmuInvoice):
        expand = _pop_expand(params)
        if not params:
            raise StripeAPIError(400, "Bad request")
        return _json(ls.Invoice._api_update(invoice.id, **params)._export(expand=expand))
    expand = _pop_expand(params)
    draft = invoice.status == "draft"
    allowed = INVOICE_DRAFT_UPDATE_PARAMS if draft else INVOICE_FINALIZED_UPDATE_PARAMS
    for name in params:
        if name in INVOICE_DRAFT_UPDATE_PARAMS and name not in allowed:
            raise StripeAPIError(
                400,
                f"You can't update {name} on an invoice that is no longer a draft "
                f"(invoice {invoice.id} is '{invoice.status}').",
                code="invoice_not_editable",
                param=name,
            )
    _reject_unknown(params, allowed)
    if "metadata" in params:
        invoice.metadata = _merge_metadata(invoice.metadata, params["metadata"])
    if "description" in params:
        invoice.description = params["description"] or None
    if "footer" in params:
        invoice.footer = params["footer"] or None
    if "auto_advance" in params:
        invoice.auto_advance = _as_bool(params["auto_advance"], "auto_advance")
        if draft:
            invoice.automatically_finalizes_at = (
                invoice.created + 3600 if invoice.auto_advance else None
            )
    if draft:
        if {"collection_method", "days_until_due", "due_date"} & set(params):
            invoice.collection_method, invoice.due_date = _collection_settings(
                params, invoice.created, invoice.collection_method
            )
        if "default_tax_rates" in params:
            invoice.default_tax_rates = _tax_rates(params["default_tax_rates"], "default_tax_rates")
        if "default_payment_method" in params:
            pm = params["default_payment_method"] or None
            if pm is not None:
                ls.PaymentMethod._api_retrieve(pm)
            invoice.default_payment_method = pm
    _event("invoice.updated", invoice)
    return _json(invoice._export(expand=expand))


async def delete_invoice(request: web.Request) -> web.Response:
    invoice = _retrieve_invoice(request.match_info["id"])
    if not isinstance(invoice, EmuInvoice):
        return _json(ls.Invoice._api_delete(invoice.id)._export())
    if invoice.status != "draft":
        raise StripeAPIError(
            400,
            f"You can only delete draft invoices; invoice {invoice.id} is '{invoice.status}'. "
            "Void it instead.",
            code="invoice_not_editable",
        )
    # The invoice's items go back to pending, so they can be invoiced again.
    for line in list(invoice.lines._list):
        item = ls.store.get(f"invoiceitem:{getattr(line, 'invoice_item', '')}")
        if item is not None:
            invoice._detach_item(item)
    _event("invoice.deleted", invoice)
    del ls.store[f"invoice:{invoice.id}"]
    return _json({"id": invoice.id, "object": "invoice", "deleted": True})


async def finalize_invoice(request: web.Request) -> web.Response:
    invoice = _retrieve_invoice(request.match_info["id"])
    params = await _post_params(request)
    expand = _pop_expand(params)
    _reject_unknown(params, {"auto_advance"})
    auto_advance = (
        _as_bool(params["auto_advance"], "auto_advance") if "auto_advance" in params else None
    )
    if invoice.status != "draft":
        raise StripeAPIError(
            400,
            "This invoice is already finalized, you can't re-finalize a non-draft invoice.",
        )
    if isinstance(invoice, EmuInvoice):
        invoice._finalize_now(auto_advance)
    else:
        invoice._finalize()
    return _json(invoice._export(expand=expand))


NO_PAYMENT_METHOD = (
    "This customer has no attached payment source or default payment method. Please consider "
    "adding a default payment method, or pay the invoice with paid_out_of_band=true."
)


async def pay_invoice(request: web.Request) -> web.Response:
    invoice = _retrieve_invoice(request.match_info["id"])
    params = await _post_params(request)
    if not isinstance(invoice, EmuInvoice):
        _pop_expand(params)
        return _json(ls.Invoice._api_pay_invoice(invoice.id)._export())
    expand = _pop_expand(params)
    _reject_unknown(
        params,
        {"paid_out_of_band", "payment_method", "source", "forgive", "off_session", "mandate"},
    )
    if invoice.status == "paid":
        raise StripeAPIError(400, "Invoice is already paid")
    if invoice.status == "void":
        raise _transition_error(invoice, "pay", ("draft", "open", "uncollectible"))
    out_of_band = _as_bool(params.get("paid_out_of_band", False), "paid_out_of_band")
    if invoice.status == "draft":
        invoice._finalize_now()  # Stripe finalizes a draft before paying it
        if invoice.status == "paid":
            return _json(invoice._export(expand=expand))
    if out_of_band or invoice.amount_due == 0:
        invoice._mark_paid(out_of_band=out_of_band)
        return _json(invoice._export(expand=expand))

    customer = ls.Customer._api_retrieve(invoice.customer)
    pm_id = params.get("payment_method") or params.get("source") or invoice.default_payment_method
    if pm_id:
        param = "source" if params.get("source") else "payment_method"
        try:
            payment_method = ls.PaymentMethod._api_retrieve(pm_id)
        except UserError:
            raise _no_such("payment_method", pm_id, param) from None
        if getattr(payment_method, "customer", None) not in (None, invoice.customer):
            raise _invalid(
                param,
                f"The payment method {pm_id} does not belong to customer {invoice.customer}.",
            )
    else:
        payment_method = customer._get_default_payment_method_or_source()
    if payment_method is None:
        raise StripeAPIError(400, NO_PAYMENT_METHOD, code="resource_missing")

    intent = ls.PaymentIntent(
        amount=invoice.amount_due,
        currency=invoice.currency,
        customer=invoice.customer,
        payment_method=payment_method.id,
    )
    intent.invoice = invoice.id
    invoice.payment_intent = intent.id
    invoice.attempted = True
    invoice.attempt_count += 1
    failed: list[bool] = []

    def on_failure_now() -> None:
        failed.append(True)
        invoice._on_payment_failure_now()

    intent._confirm(on_failure_now=on_failure_now)
    if failed:
        charge = intent.latest_charge
        raise StripeAPIError(
            402,
            charge.failure_message or "Your card was declined.",
            type="card_error",
            code=charge.failure_code or "card_declined",
            extra={"charge": charge.id, "decline_code": "generic_decline"},
        )
    if intent.status == "requires_action":
        raise StripeAPIError(
            402,
            "This payment requires additional user action before it can be completed.",
            type="card_error",
            code="invoice_payment_intent_requires_action",
            extra={"payment_intent": intent._export()},
        )
    return _json(invoice._export(expand=expand))


async def void_invoice(request: web.Request) -> web.Response:
    invoice = _retrieve_invoice(request.match_info["id"])
    params = await _post_params(request)
    expand = _pop_expand(params)
    if not isinstance(invoice, EmuInvoice):
        return _json(ls.Invoice._api_void_invoice(invoice.id)._export(expand=expand))
    _reject_unknown(params, set())
    if invoice.status not in ("open", "uncollectible"):
        raise _transition_error(invoice, "void", ("open", "uncollectible"))
    if invoice.payment_intent:
        intent = ls.PaymentIntent._api_retrieve(invoice.payment_intent)
        if intent.status in ("requires_payment_method", "requires_confirmation", "requires_action"):
            intent._canceled = True
            intent.next_action = None
    invoice._status = "void"
    invoice.status_transitions["voided_at"] = int(time.time())
    _event("invoice.voided", invoice)
    return _json(invoice._export(expand=expand))


async def mark_uncollectible(request: web.Request) -> web.Response:
    invoice = _retrieve_invoice(request.match_info["id"])
    params = await _post_params(request)
    expand = _pop_expand(params)
    _reject_unknown(params, set())
    if not isinstance(invoice, EmuInvoice) or invoice.status != "open":
        raise _transition_error(invoice, "mark as uncollectible", ("open",))
    invoice._status = "uncollectible"
    invoice.status_transitions["marked_uncollectible_at"] = int(time.time())
    _event("invoice.marked_uncollectible", invoice)
    return _json(invoice._export(expand=expand))


async def list_invoice_lines(request: web.Request) -> web.Response:
    invoice = _retrieve_invoice(request.match_info["id"])
    params = _query_params(request)
    _reject_unknown(params, {"limit", "starting_after", "ending_before", "expand"})
    return _json(
        _export_list(list(invoice.lines._list), params, f"/v1/invoices/{invoice.id}/lines")
    )


# --------------------------------------------------------------------------------------
# Invoice items
# --------------------------------------------------------------------------------------

INVOICE_ITEM_CREATE_PARAMS = {
    "amount",
    "currency",
    "customer",
    "description",
    "discountable",
    "invoice",
    "metadata",
    "period",
    "price_data",
    "quantity",
    "subscription",
    "tax_rates",
    "unit_amount",
    "unit_amount_decimal",
}
INVOICE_ITEM_UPDATE_PARAMS = {
    "amount",
    "description",
    "discountable",
    "metadata",
    "period",
    "quantity",
    "tax_rates",
    "unit_amount",
    "unit_amount_decimal",
}


def _rounded(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _unit_amount(params: dict[str, Any]) -> Decimal | None:
    price_data = params.get("price_data")
    sources = [
        ("unit_amount_decimal", params.get("unit_amount_decimal")),
        ("unit_amount", params.get("unit_amount")),
    ]
    if isinstance(price_data, dict):
        sources += [
            ("price_data[unit_amount_decimal]", price_data.get("unit_amount_decimal")),
            ("price_data[unit_amount]", price_data.get("unit_amount")),
        ]
    given = [(name, value) for name, value in sources if value not in (None, "")]
    if len(given) > 1:
        names = ", ".join(name for name, _ in given)
        raise StripeAPIError(400, f"You may only specify one of these parameters: {names}.")
    if not given:
        return None
    name, value = given[0]
    if name.endswith("unit_amount"):
        return Decimal(_as_int(value, name))
    return _as_decimal(value, name)


def _period(value: Any) -> tuple[int, int]:
    if not isinstance(value, dict) or "start" not in value or "end" not in value:
        raise _invalid("period", "period must have both start and end.")
    start = _as_int(value["start"], "period[start]")
    end = _as_int(value["end"], "period[end]")
    if end < start:
        raise _invalid("period[end]", "period[end] must be greater than or equal to period[start].")
    return start, end


def _editable_invoice_of(item: Any) -> Any | None:
    """The draft invoice an item sits on (None when pending); error if no longer editable."""
    if item.invoice is None:
        return None
    invoice = ls.store.get(f"invoice:{item.invoice}")
    if invoice is None:
        return None
    if invoice.status != "draft":
        raise StripeAPIError(
            400,
            f"Invoice item {item.id} is on invoice {invoice.id}, which is '{invoice.status}' "
            "and can no longer be edited.",
            code="invoice_not_editable",
        )
    return invoice


async def create_invoice_item(request: web.Request) -> web.Response:
    params = await _post_params(request)
    expand = _pop_expand(params)
    _reject_unknown(params, INVOICE_ITEM_CREATE_PARAMS)
    if not params.get("customer"):
        raise _missing("customer")
    customer = _retrieve(ls.Customer, params["customer"], "customer", "customer")
    price_data = params.get("price_data")
    if price_data is not None and not isinstance(price_data, dict):
        raise _invalid("price_data", "Invalid price_data: must be a hash.")

    quantity = _as_int(params.get("quantity", 1), "quantity", minimum=0)
    amount, unit = _item_amount(params, quantity)
    currency = _item_currency(params, price_data, customer)
    invoice = _item_invoice(params, customer, currency) if params.get("invoice") else None

    kwargs: dict[str, Any] = {
        "customer": customer.id,
        "amount": amount,
        "currency": currency,
        "description": params.get("description") or None,
        "metadata": _new_metadata(params.get("metadata")),
        "tax_rates": [tr.id for tr in _tax_rates(params.get("tax_rates"), "tax_rates")],
    }
    if params.get("subscription"):
        kwargs["subscription"] = params["subscription"]
    if params.get("period") is not None:
        kwargs["period_start"], kwargs["period_end"] = _period(params["period"])
    item = ls.InvoiceItem(**kwargs)
    item.quantity = quantity
    item.unit_amount = int(unit) if unit == unit.to_integral_value() else None
    item.unit_amount_decimal = format(unit.normalize(), "f")
    item.discountable = (
        _as_bool(params["discountable"], "discountable")
        if "discountable" in params
        else amount >= 0
    )
    if invoice is not None:
        invoice._attach_item(item)
    _event("invoiceitem.created", item)
    return _json(item._export(expand=expand))


def _item_amount(params: dict, quantity: int) -> tuple[int, Decimal]:
    """(amount, unit amount) of a new invoice item: an amount, or a unit amount x quantity."""
    unit = _unit_amount(params)
    if params.get("amount") not in (None, ""):
        if unit is not None:
            raise StripeAPIError(
                400, "You may only specify one of these parameters: amount, unit_amount_decimal."
            )
        if "quantity" in params and quantity != 1:
            raise StripeAPIError(
                400, "You may only specify one of these parameters: amount, quantity."
            )
        amount = _as_int(params["amount"], "amount")
        return amount, Decimal(amount)
    if unit is not None:
        return _rounded(unit * quantity), unit
    raise _missing("amount")


def _item_currency(params: dict, price_data, customer) -> str:
    if params.get("currency"):
        return _as_currency(params["currency"])
    if isinstance(price_data, dict) and price_data.get("currency"):
        return _as_currency(price_data["currency"], "price_data[currency]")
    pending = _pending_items(customer.id)
    return pending[0].currency if pending else DEFAULT_CURRENCY


def _item_invoice(params: dict, customer, currency: str):
    """The draft invoice a new item goes on (same customer, same currency)."""
    invoice = _retrieve(ls.Invoice, params["invoice"], "invoice", "invoice")
    if not isinstance(invoice, EmuInvoice) or invoice.status != "draft":
        raise _invalid(
            "invoice",
            f"You can only add invoice items to draft invoices; invoice {invoice.id} is '{invoice.status}'.",
        )
    if invoice.customer != customer.id:
        raise _invalid("invoice", f"Invoice {invoice.id} belongs to another customer.")
    if invoice.currency != currency:
        raise _invalid(
            "currency",
            f"The invoice item currency ({currency}) must match the invoice currency ({invoice.currency}).",
        )
    return invoice


async def list_invoice_items(request: web.Request) -> web.Response:
    params = _query_params(request)
    filters: list[Callable[[Any], bool]] = []
    if "customer" in params:
        customer_id = params.pop("customer")
        _retrieve(ls.Customer, customer_id, "customer", "customer")
        filters.append(lambda ii: ii.customer == customer_id)
    if "invoice" in params:
        invoice_id = params.pop("invoice")
        filters.append(lambda ii: ii.invoice == invoice_id)
    if "pending" in params:
        pending = _as_bool(params.pop("pending"), "pending")
        filters.append(lambda ii: (ii.invoice is None) == pending)
    if "created" in params:
        created_ok = _created_filter(params.pop("created"))
        filters.append(lambda ii: created_ok(ii.created))
    _reject_unknown(params, {"limit", "starting_after", "ending_before", "expand"})
    items = [ii for ii in _objects(ls.InvoiceItem) if all(f(ii) for f in filters)]
    return _json(_export_list(items, params, "/v1/invoiceitems"))


async def update_invoice_item(request: web.Request) -> web.Response:
    item = _retrieve(ls.InvoiceItem, request.match_info["id"], "invoiceitem")
    params = await _post_params(request)
    expand = _pop_expand(params)
    _reject_unknown(params, INVOICE_ITEM_UPDATE_PARAMS)
    invoice = _editable_invoice_of(item)
    current_unit = Decimal(getattr(item, "unit_amount_decimal", None) or item.amount)
    if params.get("amount") not in (None, ""):
        if _unit_amount(params) is not None or "quantity" in params:
            raise StripeAPIError(
                400,
                "You may only specify one of these parameters: amount, quantity, unit_amount_decimal.",
            )
        item.amount = _as_int(params["amount"], "amount")
        item.quantity = 1
        item.unit_amount, item.unit_amount_decimal = item.amount, str(item.amount)
    elif "quantity" in params or _unit_amount(params) is not None:
        unit = _unit_amount(params)
        unit = current_unit if unit is None else unit
        quantity = _as_int(params.get("quantity", item.quantity), "quantity", minimum=0)
        item.quantity = quantity
        item.amount = _rounded(unit * quantity)
        item.unit_amount = int(unit) if unit == unit.to_integral_value() else None
        item.unit_amount_decimal = format(unit.normalize(), "f")
    if "description" in params:
        item.description = params["description"] or None
    if "discountable" in params:
        item.discountable = _as_bool(params["discountable"], "discountable")
    if "metadata" in params:
        _set_metadata(item, _merge_metadata(item.metadata, params["metadata"]))
    if "period" in params:
        start, end = _period(params["period"])
        item.period = {"start": start, "end": end}
    if "tax_rates" in params:
        item.tax_rates = _tax_rates(params["tax_rates"], "tax_rates")
    if isinstance(invoice, EmuInvoice):
        invoice._sync_item(item)
    _event("invoiceitem.updated", item)
    return _json(item._export(expand=expand))


async def delete_invoice_item(request: web.Request) -> web.Response:
    item = _retrieve(ls.InvoiceItem, request.match_info["id"], "invoiceitem")
    invoice = _editable_invoice_of(item)
    if isinstance(invoice, EmuInvoice):
        invoice._detach_item(item)
    _event("invoiceitem.deleted", item)
    del ls.store[f"invoiceitem:{item.id}"]
    return _json({"id": item.id, "object": "invoiceitem", "deleted": True})


# --------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Clause:
    negated: bool
    field: str
    metadata_key: str | None
    op: str
    value: str | None  # None means ``null``
    quoted: bool


_CLAUSE_RE = re.compile(
    r"""(?P<neg>-)?
        (?P<field>[A-Za-z_][A-Za-z0-9_]*)
        (?:\[(?P<mq>['"])(?P<mkey>(?:(?!(?P=mq)).)*)(?P=mq)\])?
        \s*(?P<op>:|~|>=|<=|>|<)\s*
        (?P<value>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s'"]+)""",
    re.VERBOSE,
)
_JOIN_RE = re.compile(r"\s+(?:(AND|OR)\s+)?")
_MAX_CLAUSES = 10

# kind: token (exact, case-sensitive), string (exact or ~substring, case-insensitive),
# numeric (:, >, <, >=, <=).
CUSTOMER_SEARCH_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "created": ("numeric", lambda o: o.created),
    "email": ("string", lambda o: o.email),
    "name": ("string", lambda o: o.name),
    "phone": ("string", lambda o: o.phone),
}
INVOICE_SEARCH_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "created": ("numeric", lambda o: o.created),
    "currency": ("token", lambda o: o.currency),
    "customer": ("token", lambda o: o.customer),
    "number": ("string", lambda o: getattr(o, "number", None)),
    "receipt_number": ("string", lambda o: getattr(o, "receipt_number", None)),
    "status": ("token", lambda o: o.status),
    "subscription": ("token", lambda o: o.subscription),
    "total": ("numeric", lambda o: o.total),
}


def _query_error(message: str) -> StripeAPIError:
    return StripeAPIError(400, message, code="parameter_invalid", param="query")


def _parse_query(query: str) -> tuple[list[_Clause], str]:
    text = query.strip()
    if not text:
        raise _query_error("The query can't be empty.")
    clauses: list[_Clause] = []
    joiner: str | None = None
    pos = 0
    while True:
        match = _CLAUSE_RE.match(text, pos)
        if not match:
            raise _query_error(
                f"We were unable to parse your search query at position {pos}: {text[pos : pos + 30]!r}. "
                "Try using the format metadata['key']:'value' or field:'value'."
            )
        raw = match.group("value")
        quoted = raw[0] in "'\""
        if quoted:
            value: str | None = re.sub(r"\\(.)", r"\1", raw[1:-1])
        else:
            value = None if raw == "null" else raw
        clauses.append(
            _Clause(
                negated=bool(match.group("neg")),
                field=match.group("field"),
                metadata_key=match.group("mkey"),
                op=match.group("op"),
                value=value,
                quoted=quoted,
            )
        )
        pos = match.end()
        if pos >= len(text):
            break
        join = _JOIN_RE.match(text, pos)
        if not join or join.end() == pos:
            raise _query_error(f"We were unable to parse your search query at position {pos}.")
        word = join.group(1) or "AND"
        if joiner is not None and word != joiner:
            raise _query_error("A search query can't combine AND and OR; use one of them.")
        joiner = word
        pos = join.end()
    if len(clauses) > _MAX_CLAUSES:
        raise _query_error(f"A search query can have at most {_MAX_CLAUSES} clauses.")
    return clauses, joiner or "AND"


def _clause_matcher(
    clause: _Clause, fields: dict[str, tuple[str, Callable[[Any], Any]]], resource: str
) -> Callable[[Any], bool]:
    kind, getter = _clause_field(clause, fields, resource)
    allowed_ops = {"token": {":"}, "string": {":", "~"}, "numeric": {":", ">", "<", ">=", "<="}}
    if clause.op not in allowed_ops[kind]:
        raise _query_error(f"The operator '{clause.op}' can't be used on field '{clause.field}'.")
    if clause.value is None:

        def test(obj: Any) -> bool:
            return getter(obj) in (None, "")
    elif kind == "numeric":
        test = _numeric_test(clause, getter)
    else:
        test = _string_test(clause, kind, getter)
    if clause.negated:
        return lambda obj: not test(obj)
    return test


def _clause_field(
    clause: _Clause, fields: dict[str, tuple[str, Callable[[Any], Any]]], resource: str
) -> tuple[str, Callable[[Any], Any]]:
    """The searched field's kind (token, string, numeric) and how to read it from an object."""
    if clause.field == "metadata":
        if clause.metadata_key is None:
            raise _query_error("Search on metadata needs a key: metadata['key']:'value'.")
        key = clause.metadata_key

        def getter(obj: Any) -> Any:
            return (getattr(obj, "metadata", None) or {}).get(key)

        return "token", getter
    if clause.field not in fields or clause.metadata_key is not None:
        raise _query_error(
            f"Field '{clause.field}' is an unsupported search field for resource {resource}. "
            f"See https://stripe.com/docs/search#query-fields-for-{resource} for a list of "
            "supported fields."
        )
    return fields[clause.field]


def _numeric_test(clause: _Clause, getter: Callable[[Any], Any]) -> Callable[[Any], bool]:
    expected = clause.value
    try:
        number = float(expected)
    except ValueError:
        raise _query_error(f"'{expected}' is not a number (field '{clause.field}').") from None
    compare = {
        ":": lambda a: a == number,
        ">": lambda a: a > number,
        "<": lambda a: a < number,
        ">=": lambda a: a >= number,
        "<=": lambda a: a <= number,
    }[clause.op]

    def test(obj: Any) -> bool:
        actual = getter(obj)
        return actual is not None and compare(actual)

    return test


def _string_test(clause: _Clause, kind: str, getter: Callable[[Any], Any]) -> Callable[[Any], bool]:
    expected = clause.value
    if not clause.quoted:
        raise _query_error(f"String values must be quoted: {clause.field}{clause.op}'{expected}'.")
    if clause.op == "~" and len(expected) < 3:
        raise _query_error("Substring search (~) needs at least 3 characters.")
    lowered = expected.lower()

    def test(obj: Any) -> bool:
        actual = getter(obj)
        if actual is None:
            return False
        if kind == "token":
            return str(actual) == expected
        if clause.op == "~":
            return lowered in str(actual).lower()
        return str(actual).lower() == lowered

    return test


def _encode_page(offset: int) -> str:
    raw = json.dumps({"offset": offset}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page(token: Any) -> int:
    try:
        padded = str(token) + "=" * (-len(str(token)) % 4)
        offset = json.loads(base64.urlsafe_b64decode(padded.encode()))["offset"]
        if not isinstance(offset, int) or offset < 0:
            raise ValueError
        return offset
    except (ValueError, KeyError, TypeError, binascii.Error, json.JSONDecodeError):
        raise _invalid("page", f"Invalid page: {token}") from None


def _search(
    request: web.Request,
    cls: type,
    fields: dict[str, tuple[str, Callable[[Any], Any]]],
    resource: str,
) -> web.Response:
    params = _query_params(request)
    expand = _pop_expand(params)
    _reject_unknown(params, {"query", "limit", "page"})
    if "query" not in params:
        raise _missing("query")
    clauses, joiner = _parse_query(_as_str(params["query"], "query"))
    matchers = [_clause_matcher(c, fields, resource) for c in clauses]
    combine = all if joiner == "AND" else any
    limit = _as_int(params.get("limit", 10), "limit")
    if not 1 <= limit <= 100:
        raise _invalid("limit", "Limit must be between 1 and 100.")
    offset = _decode_page(params["page"]) if params.get("page") else 0
    not_yet = request.app[STATE_KEY].unindexed()
    found = [
        obj
        for obj in _objects(cls)
        if obj.id
        and not obj.id.startswith("upcoming_")
        and f"{cls.object}:{obj.id}" not in not_yet
        and combine(m(obj) for m in matchers)
    ]
    page = found[offset : offset + limit]
    has_more = len(found) > offset + limit
    item_expand = [e[len("data.") :] for e in expand if e.startswith("data.")]
    body: dict[str, Any] = {
        "object": "search_result",
        "url": f"/v1/{resource}/search",
        "data": [obj._export(expand=item_expand) for obj in page],
        "has_more": has_more,
        "next_page": _encode_page(offset + limit) if has_more else None,
    }
    if "total_count" in expand:
        body["total_count"] = len(found)
    return _json(body)


async def search_customers(request: web.Request) -> web.Response:
    return _search(request, ls.Customer, CUSTOMER_SEARCH_FIELDS, "customers")


async def search_invoices(request: web.Request) -> web.Response:
    return _search(request, ls.Invoice, INVOICE_SEARCH_FIELDS, "invoices")


async def list_customers(request: web.Request) -> web.Response:
    """Stripe's customer list: ``email`` (exact, case-sensitive), ``created``, newest first."""
    params = _query_params(request)
    filters: list[Callable[[Any], bool]] = []
    if "email" in params:
        email = _as_str(params.pop("email"), "email")
        filters.append(lambda c: c.email == email)
    if "created" in params:
        created_ok = _created_filter(params.pop("created"))
        filters.append(lambda c: created_ok(c.created))
    _reject_unknown(params, {"limit", "starting_after", "ending_before", "expand"})
    found = [c for c in _objects(ls.Customer) if c.id and all(f(c) for f in filters)]
    return _json(_export_list(found, params, "/v1/customers"))


# --------------------------------------------------------------------------------------
# Credit notes
# --------------------------------------------------------------------------------------

CREDIT_NOTE_PARAMS = {
    "amount",
    "credit_amount",
    "effective_at",
    "email_type",
    "invoice",
    "lines",
    "memo",
    "metadata",
    "out_of_band_amount",
    "reason",
    "refund_amount",
}
CREDIT_NOTE_REASONS = ("duplicate", "fraudulent", "order_change", "product_unsatisfactory")
CREDIT_NOTE_LINE_PARAMS = {
    "amount",
    "description",
    "invoice_line_item",
    "quantity",
    "type",
    "unit_amount",
    "unit_amount_decimal",
}
POST_PAYMENT_PARAMS = ("credit_amount", "refund_amount", "out_of_band_amount")


class EmuCreditNote(ls.StripeObject):
    """A credit note against a finalized one-off invoice (``cn_``): pre-payment on an open
    invoice (reduces its ``amount_due``), post-payment on a paid one (split into credit,
    refund and out-of-band amounts). Customer balances and refunds are recorded, not moved."""

    object = "credit_note"
    _id_prefix = "cn_"

    def __init__(self, fields: dict[str, Any]) -> None:
        ls.StripeObject.__init__(self)
        for key, value in fields.items():
            setattr(self, key, value)
        self.lines["url"] = f"/v1/credit_notes/{self.id}/lines"
        for line in self.lines["data"]:
            line["id"] = _random_id("cnli_")
            line["credit_note"] = self.id  # not a Stripe field; harmless, keeps lines traceable


def _credit_note_lines(params: dict[str, Any], invoice: Any) -> list[dict[str, Any]]:
    lines = params.get("lines")
    if isinstance(lines, dict):
        lines = [lines]
    if lines in (None, ""):
        return []
    if not isinstance(lines, list):
        raise _invalid("lines", "Invalid array: lines")
    result = []
    for i, line in enumerate(lines):
        name = f"lines[{i}]"
        if not isinstance(line, dict):
            raise _invalid(name, f"Invalid object: {name}")
        _reject_unknown(line, CREDIT_NOTE_LINE_PARAMS)
        kind = line.get("type")
        if kind in (None, ""):
            raise _missing(f"{name}[type]")
        quantity = _as_int(line.get("quantity", 1), f"{name}[quantity]", minimum=1)
        if kind == "custom_line_item":
            if not line.get("description"):
                raise _missing(f"{name}[description]")
            unit = _unit_amount(line)
            if unit is None:
                raise _missing(f"{name}[unit_amount]")
            if unit < 0:
                raise _invalid(f"{name}[unit_amount]", "unit_amount must be at least 0.")
            amount = _rounded(unit * quantity)
            result.append(
                {
                    "object": "credit_note_line_item",
                    "type": "custom_line_item",
                    "amount": amount,
                    "description": _as_str(line["description"], f"{name}[description]"),
                    "quantity": quantity,
                    "unit_amount": int(unit) if unit == unit.to_integral_value() else None,
                    "unit_amount_decimal": format(unit.normalize(), "f"),
                    "invoice_line_item": None,
                    "livemode": False,
                }
            )
        elif kind == "invoice_line_item":
            line_id = line.get("invoice_line_item")
            if not line_id:
                raise _missing(f"{name}[invoice_line_item]")
            inv_line = next((x for x in invoice.lines._list if x.id == line_id), None)
            if inv_line is None:
                raise _invalid(
                    f"{name}[invoice_line_item]",
                    f"Invoice line item {line_id} is not on invoice {invoice.id}.",
                )
            amount = (
                _as_int(line["amount"], f"{name}[amount]", minimum=0)
                if line.get("amount") not in (None, "")
                else inv_line.amount
            )
            if amount > inv_line.amount:
                raise _invalid(
                    f"{name}[amount]",
                    f"The amount ({amount}) exceeds the line's amount ({inv_line.amount}).",
                )
            result.append(
                {
                    "object": "credit_note_line_item",
                    "type": "invoice_line_item",
                    "amount": amount,
                    "description": line.get("description") or inv_line.description,
                    "quantity": quantity,
                    "unit_amount": None,
                    "unit_amount_decimal": None,
                    "invoice_line_item": line_id,
                    "livemode": False,
                }
            )
        else:
            raise _invalid(
                f"{name}[type]",
                f"Invalid {name}[type]: must be one of invoice_line_item or custom_line_item",
            )
    return result


def _credit_note_fields(params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Validate a create/preview request as Stripe does; return the invoice and the note's
    fields (nothing is changed)."""
    _reject_unknown(params, CREDIT_NOTE_PARAMS)
    if not params.get("invoice"):
        raise _missing("invoice")
    invoice = _retrieve(ls.Invoice, params["invoice"], "invoice", "invoice")
    if not isinstance(invoice, EmuInvoice) or invoice.status not in ("open", "paid"):
        raise StripeAPIError(
            400,
            f"Invoice {invoice.id} is '{invoice.status}': credit notes can only be issued "
            "for finalized invoices whose status is 'open' or 'paid'.",
            code="invoice_not_editable" if invoice.status == "draft" else None,
            param="invoice",
        )
    reason = params.get("reason") or None
    if reason is not None and reason not in CREDIT_NOTE_REASONS:
        raise _invalid("reason", f"Invalid reason: must be one of {', '.join(CREDIT_NOTE_REASONS)}")
    lines = _credit_note_lines(params, invoice)
    amount = (
        _as_int(params["amount"], "amount", minimum=0)
        if params.get("amount") not in (None, "")
        else None
    )
    if not lines and amount is None:
        raise StripeAPIError(400, "You must pass either `amount` or `lines`.", param="amount")
    total = sum(line["amount"] for line in lines) if lines else amount
    if lines and amount is not None and amount != total:
        raise _invalid(
            "amount",
            f"The amount ({amount}) must equal the sum of the credit note lines ({total}).",
        )
    if total <= 0:
        raise _invalid("amount", "The credit note total must be greater than 0.")
    splits = {
        name: _as_int(params[name], name, minimum=0)
        for name in POST_PAYMENT_PARAMS
        if params.get(name) not in (None, "")
    }
    if invoice.status == "open":
        kind = "pre_payment"
        limit = invoice.amount_remaining
        if any(splits.values()):
            name = next(n for n, v in splits.items() if v)
            raise _invalid(
                name,
                f"{name} applies to paid invoices only; invoice {invoice.id} is 'open' "
                "(the credit note reduces its amount due).",
            )
    else:
        kind = "post_payment"
        limit = invoice.amount_paid - invoice.post_payment_credit_notes_amount
        if sum(splits.values()) != total:
            raise _invalid(
                "credit_amount",
                f"The sum of credit_amount, refund_amount and out_of_band_amount "
                f"({sum(splits.values())}) must equal the credit note total ({total}).",
            )
    if total > limit:
        raise _invalid(
            "amount" if not lines else "lines",
            f"The credit note total ({total}) is greater than the amount that can still be "
            f"credited on invoice {invoice.id} ({limit}).",
        )
    if not lines:
        lines = [
            {
                "object": "credit_note_line_item",
                "type": "custom_line_item",
                "amount": total,
                "description": "Credit",
                "quantity": 1,
                "unit_amount": total,
                "unit_amount_decimal": str(total),
                "invoice_line_item": None,
                "livemode": False,
            }
        ]
    now = int(time.time())
    effective_at = (
        _as_int(params["effective_at"], "effective_at")
        if params.get("effective_at") not in (None, "")
        else now
    )
    fields = {
        "amount": total,
        "amount_shipping": 0,
        "currency": invoice.currency,
        "customer": invoice.customer,
        "customer_balance_transaction": None,
        "discount_amount": 0,
        "discount_amounts": [],
        "effective_at": effective_at,
        "invoice": invoice.id,
        "lines": {"object": "list", "data": lines, "has_more": False, "url": None},
        "memo": params.get("memo") or None,
        "metadata": _new_metadata(params.get("metadata")),
        "out_of_band_amount": splits.get("out_of_band_amount") or None,
        "pre_payment_amount": total if kind == "pre_payment" else 0,
        "post_payment_amount": total if kind == "post_payment" else 0,
        "reason": reason,
        "refund": None,
        "_refund_amount": splits.get("refund_amount", 0),  # not Stripe fields: kept private
        "_credit_amount": splits.get("credit_amount", 0),
        "shipping_cost": None,
        "status": "issued",
        "subtotal": total,
        "subtotal_excluding_tax": total,
        "tax_amounts": [],
        "total": total,
        "total_excluding_tax": total,
        "type": kind,
        "voided_at": None,
    }
    return invoice, fields


async def create_credit_note(request: web.Request) -> web.Response:
    params = await _post_params(request)
    expand = _pop_expand(params)
    invoice, fields = _credit_note_fields(params)
    count = sum(1 for cn in _objects(EmuCreditNote) if cn.invoice == invoice.id)
    fields["number"] = f"{invoice.number}-CN-{count + 1:02d}"
    fields["pdf"] = None
    note = EmuCreditNote(fields)
    note.pdf = f"https://pay.stripe.com/credit_notes/emulator/{note.id}/pdf"
    if note.type == "pre_payment":
        invoice._pre_payment_credit = invoice.pre_payment_credit_notes_amount + note.total
        if invoice.amount_remaining == 0:
            invoice._mark_paid()  # Stripe marks a fully credited invoice paid
    else:
        invoice._post_payment_credit = invoice.post_payment_credit_notes_amount + note.total
    _event("credit_note.created", note)
    _event("invoice.updated", invoice)
    return _json(note._export(expand=expand))


async def preview_credit_note(request: web.Request) -> web.Response:
    params = _query_params(request)
    _pop_expand(params)
    invoice, fields = _credit_note_fields(params)
    fields = {k: v for k, v in fields.items() if not k.startswith("_")}
    fields.update(
        id=_random_id("cnpreview_"),
        object="credit_note",
        created=int(time.time()),
        livemode=False,
        number=None,
        pdf=None,
    )
    return _json(fields)


async def retrieve_credit_note(request: web.Request) -> web.Response:
    params = _query_params(request)
    expand = _pop_expand(params)
    _reject_unknown(params, set())
    note = _retrieve(EmuCreditNote, request.match_info["id"], "credit_note")
    return _json(note._export(expand=expand))


async def list_credit_notes(request: web.Request) -> web.Response:
    params = _query_params(request)
    filters: list[Callable[[Any], bool]] = []
    if "invoice" in params:
        invoice_id = params.pop("invoice")
        filters.append(lambda cn: cn.invoice == invoice_id)
    if "customer" in params:
        customer_id = params.pop("customer")
        filters.append(lambda cn: cn.customer == customer_id)
    if "created" in params:
        created_ok = _created_filter(params.pop("created"))
        filters.append(lambda cn: created_ok(cn.created))
    _reject_unknown(params, {"limit", "starting_after", "ending_before", "expand"})
    notes = [cn for cn in _objects(EmuCreditNote) if all(f(cn) for f in filters)]
    return _json(_export_list(notes, params, "/v1/credit_notes"))


async def void_credit_note(request: web.Request) -> web.Response:
    note = _retrieve(EmuCreditNote, request.match_info["id"], "credit_note")
    params = await _post_params(request)
    expand = _pop_expand(params)
    _reject_unknown(params, set())
    if note.status != "issued":
        raise StripeAPIError(400, f"Credit note {note.id} is already void.")
    invoice = _retrieve_invoice(note.invoice)
    if note.type == "pre_payment":
        if invoice.status != "open":
            raise StripeAPIError(
                400,
                f"You can only void a pre-payment credit note while its invoice is 'open'; "
                f"invoice {invoice.id} is '{invoice.status}'.",
            )
        invoice._pre_payment_credit = invoice.pre_payment_credit_notes_amount - note.total
    else:
        if note._refund_amount:
            raise StripeAPIError(400, f"Credit note {note.id} has a refund and can't be voided.")
        invoice._post_payment_credit = invoice.post_payment_credit_notes_amount - note.total
    note.status = "void"
    note.voided_at = int(time.time())
    _event("credit_note.voided", note)
    return _json(note._export(expand=expand))


# --------------------------------------------------------------------------------------
# Emulator-only routes
# --------------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return _json(
        {
            "status": "ok",
            "objects": len(ls.store),
            "idempotency_records": len(state.idempotency),
            "in_flight": len(state.in_flight),
            "search_lag_seconds": state.search_lag,
            "search_unindexed": len(state.unindexed()),
            "clock_offset_seconds": state.clock_offset,
        }
    )


async def _admin_params(request: web.Request) -> dict[str, Any]:
    data = await request.post() if request.method == "POST" else {}
    return {**request.query, **data}


def _seconds(params: dict[str, Any]) -> float:
    try:
        value = float(params["seconds"])
    except (KeyError, ValueError):
        raise _invalid("seconds", "seconds must be a number") from None
    if not 0 <= value < 10 * 365 * 86400:
        raise _invalid("seconds", "seconds must be >= 0 (and under ten years)")
    return value


def _hold_key(params: dict[str, Any]) -> str:
    key = params.get("idempotency_key")
    if not key:
        raise _missing("idempotency_key")
    return str(key)


async def advance_clock(request: web.Request) -> web.Response:
    """Move the emulator clock forward: idempotency records age, pending search entries index."""
    state = request.app[STATE_KEY]
    state.clock_offset += _seconds(await _admin_params(request))
    state.dirty = True
    state.save()
    return _json({"clock_offset_seconds": state.clock_offset, "now": state.now()})


async def flush_search(request: web.Request) -> web.Response:
    """Index every object now (what Stripe's search shows after its lag has passed)."""
    state = request.app[STATE_KEY]
    n = len(state.unindexed())
    state.search_pending.clear()
    return _json({"indexed": n})


async def set_search_lag(request: web.Request) -> web.Response:
    """Lag for objects created from now on (already pending ones keep their time)."""
    state = request.app[STATE_KEY]
    state.search_lag = _seconds(await _admin_params(request))
    return _json({"search_lag_seconds": state.search_lag})


async def add_hold(request: web.Request) -> web.Response:
    """Hold the next request with this idempotency key after it is accepted (in flight),
    before it executes, until ``holds/release``."""
    state = request.app[STATE_KEY]
    key = _hold_key(await _admin_params(request))
    state.holds.setdefault(key, _Hold(asyncio.Event(), asyncio.Event()))
    return _json({"idempotency_key": key, "held": False})


async def wait_hold(request: web.Request) -> web.Response:
    """Block until a request with this key is held (``timeout`` seconds, default 10)."""
    state = request.app[STATE_KEY]
    params = await _admin_params(request)
    key = _hold_key(params)
    hold = state.holds.get(key)
    if hold is None:
        raise _no_such("hold", key, "idempotency_key")
    try:
        timeout = float(params.get("timeout", 10))
        await asyncio.wait_for(hold.held.wait(), timeout)
    except TimeoutError:
        return _error_json({"type": "api_error", "message": f"nothing held for {key}"}, 408)
    return _json({"idempotency_key": key, "held": True})


async def release_hold(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    key = _hold_key(await _admin_params(request))
    hold = state.holds.pop(key, None)
    if hold is None:
        raise _no_such("hold", key, "idempotency_key")
    hold.release.set()
    return _json({"idempotency_key": key, "released": hold.held.is_set()})


async def flush_data(request: web.Request) -> web.Response:
    """localstripe's ``DELETE /_config/data``, also forgetting idempotency records."""
    ls.store.clear()
    request.app[STATE_KEY].idempotency.clear()
    request.app[STATE_KEY].search_pending.clear()
    return web.Response(status=200)


ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/_emulator/health", health),
    ("POST", "/_emulator/clock/advance", advance_clock),
    ("POST", "/_emulator/search/flush", flush_search),
    ("POST", "/_emulator/search/lag", set_search_lag),
    ("POST", "/_emulator/holds", add_hold),
    ("GET", "/_emulator/holds/wait", wait_hold),
    ("POST", "/_emulator/holds/release", release_hold),
    ("DELETE", "/_config/data", flush_data),
    ("GET", "/v1/customers", list_customers),
    ("GET", "/v1/customers/search", search_customers),
    ("GET", "/v1/invoices/search", search_invoices),
    ("POST", "/v1/invoices", create_invoice),
    ("GET", "/v1/invoices", list_invoices),
    ("POST", "/v1/invoices/{id}/finalize", finalize_invoice),
    ("POST", "/v1/invoices/{id}/add_lines", add_invoice_lines),
    ("POST", "/v1/invoices/{id}/pay", pay_invoice),
    ("POST", "/v1/invoices/{id}/void", void_invoice),
    ("POST", "/v1/invoices/{id}/mark_uncollectible", mark_uncollectible),
    ("GET", "/v1/invoices/{id}/lines", list_invoice_lines),
    ("POST", "/v1/invoices/{id}", update_invoice),
    ("DELETE", "/v1/invoices/{id}", delete_invoice),
    ("POST", "/v1/invoiceitems", create_invoice_item),
    ("GET", "/v1/invoiceitems", list_invoice_items),
    ("POST", "/v1/invoiceitems/{id}", update_invoice_item),
    ("DELETE", "/v1/invoiceitems/{id}", delete_invoice_item),
    ("POST", "/v1/credit_notes", create_credit_note),
    ("GET", "/v1/credit_notes", list_credit_notes),
    ("GET", "/v1/credit_notes/preview", preview_credit_note),
    ("GET", "/v1/credit_notes/{id}", retrieve_credit_note),
    ("POST", "/v1/credit_notes/{id}/void", void_credit_note),
]


# --------------------------------------------------------------------------------------
# State: persistence and idempotency records
# --------------------------------------------------------------------------------------


@dataclass
class _Hold:
    held: asyncio.Event  # set when a request with the key reached the hold point
    release: asyncio.Event  # set by holds/release


class EmulatorState:
    """localstripe's object store plus idempotency records, persisted as one atomic file.

    Also the emulator clock (real time plus ``clock_offset``, persisted), requests in flight
    per idempotency scope, test holds, and when each new searchable object gets indexed.
    """

    def __init__(self, state_dir: Path, search_lag: float = DEFAULT_SEARCH_LAG_SECONDS) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE
        self.idempotency: dict[str, dict[str, Any]] = {}
        self.lock = asyncio.Lock()
        self.in_request = False
        self.dirty = False
        self._save_scheduled = False
        self.clock_offset = 0.0
        self.search_lag = search_lag
        self.search_pending: dict[str, float] = {}  # store key -> emulator time it is indexed
        self.in_flight: set[str] = set()
        self.holds: dict[str, _Hold] = {}

    def now(self) -> float:
        return time.time() + self.clock_offset

    def created(self, store_key: str) -> None:
        """A new object entered the store: searchable only after the lag."""
        if self.search_lag > 0 and store_key.startswith(SEARCHABLE):
            self.search_pending[store_key] = self.now() + self.search_lag

    def unindexed(self) -> set[str]:
        """Store keys of objects not searchable yet (entries past their time are dropped)."""
        if self.search_pending:
            now = self.now()
            for key in [k for k, at in self.search_pending.items() if at <= now]:
                del self.search_pending[key]
        return set(self.search_pending)

    async def hold_point(self, idem_key: str) -> None:
        hold = self.holds.get(idem_key)
        if hold is not None and not hold.held.is_set():
            hold.held.set()
            await hold.release.wait()

    def load(self) -> None:
        ls.store.clear()
        self.idempotency.clear()
        if not self.path.exists():
            return
        try:
            with self.path.open("rb") as fh:
                data = pickle.load(fh)
        except Exception as exc:
            raise EmulatorError(
                f"cannot read emulator state {self.path}: {exc!r}; move it away to start empty"
            ) from exc
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise EmulatorError(
                f"{self.path} is not a Stripe emulator state file (format {STATE_FORMAT})"
            )
        ls.store.update(data["store"])  # dict.update: bypasses Store.__setitem__ (all indexed)
        self.idempotency.update(data["idempotency"])
        self.clock_offset = float(data.get("clock_offset", 0.0))
        self.prune()

    def prune(self) -> None:
        horizon = self.now() - IDEMPOTENCY_TTL_SECONDS
        for key in [k for k, rec in self.idempotency.items() if rec["created"] < horizon]:
            del self.idempotency[key]

    def save(self) -> None:
        payload = pickle.dumps(
            {
                "format": STATE_FORMAT,
                "saved_at": time.time(),
                "store": dict(ls.store),
                "idempotency": self.idempotency,
                "clock_offset": self.clock_offset,
            },
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def store_mutated(self) -> None:
        """Hook for localstripe's Store writes; saves changes made outside requests."""
        if self.in_request:
            self.dirty = True
            return
        if self._save_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._save_scheduled = True
        loop.call_soon(self._deferred_save)

    def _deferred_save(self) -> None:
        if self.lock.locked():
            # A request is running: it saves when it finishes if it mutates; retry anyway.
            asyncio.get_running_loop().call_later(0.05, self._deferred_save)
            return
        self._save_scheduled = False
        try:
            self.save()
        except OSError:
            log.exception("could not save emulator state")


STATE_KEY = web.AppKey("stripe_emulator_state", EmulatorState)
_ACTIVE_STATE: EmulatorState | None = None


def _persist_soon() -> None:
    if _ACTIVE_STATE is not None:
        _ACTIVE_STATE.store_mutated()


def _store_dump_hook(_store: Any) -> None:
    _persist_soon()


def _no_disk_load(_store: Any) -> None:
    return None


_PATCHED = False


def _install_patches() -> None:
    """Point localstripe away from /tmp/localstripe.pickle and give customers invoice numbering."""
    global _PATCHED
    if _PATCHED:
        return
    _PATCHED = True
    ls.Store.dump_to_disk = _store_dump_hook
    ls.Store.try_load_from_disk = _no_disk_load
    original_setitem = ls.Store.__setitem__

    def store_setitem(self: Any, key: str, value: Any) -> None:
        new = key not in self
        original_setitem(self, key, value)
        if new and _ACTIVE_STATE is not None:
            _ACTIVE_STATE.created(key)

    ls.Store.__setitem__ = store_setitem

    original_create = ls.Customer._api_create.__func__

    def customer_create(cls: type, **data: Any) -> Any:
        customer = original_create(cls, **data)
        _ensure_invoice_numbering(customer)
        return customer

    ls.Customer._api_create = classmethod(customer_create)


# --------------------------------------------------------------------------------------
# Middlewares
# --------------------------------------------------------------------------------------

_PUBLIC_PREFIXES = ("/js.stripe.com/", "/_config/", "/_emulator/")
_PUBLISHABLE_KEY_ROUTES = (
    r"^/v1/tokens$",
    r"^/v1/sources$",
    r"^/v1/payment_intents/\w+/_authenticate\b",
    r"^/v1/setup_intents/\w+/confirm$",
    r"^/v1/setup_intents/\w+/cancel$",
)
_TEST_KEY_RE = re.compile(r"(sk|rk)_test_[A-Za-z0-9_]+")
NO_KEY_MESSAGE = (
    "You did not provide an API key. You need to provide your API key in the Authorization "
    "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See "
    "https://stripe.com/docs/api#authentication for details, or we can help at "
    "https://support.stripe.com/."
)


def _redact(key: str) -> str:
    return key[:8] + "*" * max(0, len(key) - 12) + key[-4:] if len(key) > 12 else "****"


def _api_key(request: web.Request) -> tuple[str | None, str]:
    header = request.headers.get("Authorization", "").strip()
    if not header:
        return None, NO_KEY_MESSAGE
    scheme, _, credentials = header.partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        key = credentials
    elif scheme.lower() == "basic":
        try:
            key = base64.b64decode(credentials, validate=True).decode().split(":", 1)[0]
        except (binascii.Error, UnicodeDecodeError):
            return None, "Invalid Basic authorization header."
    else:
        return None, NO_KEY_MESSAGE
    if _TEST_KEY_RE.fullmatch(key):
        return key, ""
    if key.startswith(("sk_live_", "rk_live_")):
        return None, "The Stripe emulator only accepts test mode keys (sk_test_...)."
    return None, f"Invalid API Key provided: {_redact(key)}"


@web.middleware
async def _outer_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, Stripe-shaped errors for anything that escapes, one log line."""
    started = time.monotonic()
    request["request_id"] = _random_id("req_", 14)
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        response = _error_response(exc, request)
    response.headers["Request-Id"] = request["request_id"]
    log.info(
        "%s %s %d %.1fms%s",
        request.method,
        request.path,
        response.status,
        (time.monotonic() - started) * 1000,
        " idempotent-replay" if response.headers.get("Idempotent-Replayed") else "",
    )
    return response


@web.middleware
async def _auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(_PUBLIC_PREFIXES):
        request["api_key"] = None
        return await handler(request)
    key, problem = _api_key(request)
    if key is None:
        if request.method == "POST" and any(
            re.match(p, request.path) for p in _PUBLISHABLE_KEY_ROUTES
        ):
            data = await ls_server.get_post_data(request, remove_auth=False) or {}
            publishable = data.get("key")
            if isinstance(publishable, str) and publishable.startswith("pk_"):
                request["api_key"] = publishable
                return await handler(request)
        raise StripeAPIError(401, problem)
    request["api_key"] = key
    return await handler(request)


async def _request_fingerprint(request: web.Request) -> str:
    body = await request.read()
    if request.content_type == "application/json" and body.strip():
        try:
            canonical: Any = json.loads(body)
        except json.JSONDecodeError:
            canonical = body.decode("utf-8", "replace")
    else:
        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        canonical = sorted(pairs, key=lambda kv: kv[0])  # stable: repeated keys keep order
    query = sorted(request.query.items(), key=lambda kv: kv[0])
    blob = json.dumps({"body": canonical, "query": query}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _should_record(status: int) -> bool:
    # Stripe saves a result once the endpoint started executing, failures included, but not
    # for requests rejected by validation: we keep successes, card errors and server errors.
    return status < 400 or status == 402 or status >= 500


def _idempotency_scope(request: web.Request) -> str:
    """Stripe scopes idempotency keys to the account (and mode), not to the API key: every
    key the emulator accepts is a key of its one test-mode account."""
    return f"{ACCOUNT_ID}:{MODE}"


def _replay(
    state: EmulatorState, request: web.Request, record_key: str, idem_key: str, fingerprint: str
) -> web.Response | None:
    """The saved response for this key (or the 400 for a mismatched reuse); None if none."""
    record = state.idempotency.get(record_key)
    if record is not None and record["created"] < state.now() - IDEMPOTENCY_TTL_SECONDS:
        del state.idempotency[record_key]
        record = None
    if record is None:
        return None
    endpoint = f"{request.method} {request.path}"
    if record["endpoint"] != endpoint:
        raise StripeAPIError(
            400,
            "Keys for idempotent requests can only be used for the same endpoint "
            f"they were first used for ('{record['endpoint'].split(' ', 1)[1]}' vs "
            f"'{request.path}'). Try using a key other than '{idem_key}' if you "
            "meant to execute a different request.",
            type="idempotency_error",
        )
    if record["fingerprint"] != fingerprint:
        raise StripeAPIError(
            400,
            "Keys for idempotent requests can only be used with the same parameters "
            f"they were first used with. Try using a key other than '{idem_key}' if "
            "you meant to execute a different request.",
            type="idempotency_error",
        )
    return web.Response(
        body=record["body"],
        status=record["status"],
        content_type="application/json",
        headers={
            "Idempotent-Replayed": "true",
            "Idempotency-Key": idem_key,
            "Original-Request": record["request_id"],
        },
    )


@web.middleware
async def _state_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Serialize requests, apply idempotency, persist after every mutating request.

    Test hooks (``/_emulator/``) bypass the lock, so a held request never blocks them. An
    idempotent request is *in flight* from the moment it is accepted until its response is
    saved: a second request with the same key meanwhile gets Stripe's 409
    ``idempotency_key_in_use`` and nothing is saved for it.
    """
    if request.path.startswith("/_emulator/"):
        return await handler(request)
    state = request.app[STATE_KEY]
    idem_key = request.headers.get("Idempotency-Key") if request.method == "POST" else None
    if idem_key is None:
        async with state.lock:
            return await _execute(state, request, handler)
    if not idem_key or len(idem_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise _invalid(
            "Idempotency-Key",
            f"Idempotency keys must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters long.",
        )
    record_key = f"{_idempotency_scope(request)}:{idem_key}"
    fingerprint = await _request_fingerprint(request)
    # No await between these checks and marking the key in flight: atomic on the loop.
    replayed = _replay(state, request, record_key, idem_key, fingerprint)
    if replayed is not None:
        return replayed
    if record_key in state.in_flight:
        raise StripeAPIError(
            409,
            "There is currently another in-progress request using this Idempotent Key "
            "(that probably means you submitted twice, and the other request is still "
            f"going through): {idem_key}. Please try again later.",
            code="idempotency_key_in_use",
        )
    state.in_flight.add(record_key)
    try:
        await state.hold_point(idem_key)
        async with state.lock:
            return await _execute(state, request, handler, (record_key, idem_key, fingerprint))
    finally:
        state.in_flight.discard(record_key)


async def _execute(
    state: EmulatorState,
    request: web.Request,
    handler: Handler,
    idempotent: tuple[str, str, str] | None = None,
) -> web.StreamResponse:
    """Run the handler under the state lock; save the idempotent result; persist."""
    mutating = request.method in ("POST", "DELETE", "PUT", "PATCH")
    state.in_request = True
    state.dirty = False
    try:
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            response = _error_response(exc, request)
        if idempotent is not None and isinstance(response, web.Response):
            record_key, idem_key, fingerprint = idempotent
            response.headers["Idempotency-Key"] = idem_key
            if _should_record(response.status):
                state.prune()
                state.idempotency[record_key] = {
                    "endpoint": f"{request.method} {request.path}",
                    "fingerprint": fingerprint,
                    "status": response.status,
                    "body": response.body,
                    "request_id": request["request_id"],
                    "created": state.now(),
                }
        if mutating or state.dirty:
            state.save()
        return response
    finally:
        state.in_request = False


# --------------------------------------------------------------------------------------
# Application and server
# --------------------------------------------------------------------------------------


def build_app(state: EmulatorState) -> web.Application:
    """localstripe's routes behind our middlewares, with our routes matched first."""
    global _ACTIVE_STATE
    _install_patches()
    _ACTIVE_STATE = state
    app = web.Application(
        middlewares=[_outer_middleware, _auth_middleware, _state_middleware],
        client_max_size=4 * 1024 * 1024,
    )
    app[STATE_KEY] = state
    # aiohttp matches routes in registration order. Keep localstripe's order (its fixed paths
    # such as /v1/invoices/upcoming come before /v1/invoices/{id}), swapping in our handlers
    # where we override one, and put our new routes (search, finalize, ...) first.
    theirs = [
        (route.method, route.resource.canonical, route.handler)
        for route in ls_server.app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    ]
    ours = {(method, path): handler for method, path, handler in ROUTES}
    their_keys = {(method, path) for method, path, _ in theirs}
    for method, path, handler in ROUTES:
        if (method, path) not in their_keys:
            app.router.add_route(method, path, handler)
    for method, path, handler in theirs:
        app.router.add_route(method, path, ours.get((method, path), handler))
    app.on_response_prepare.append(ls_server.add_cors_headers)

    async def save_on_cleanup(_app: web.Application) -> None:
        try:
            state.save()
        except OSError:
            log.exception("could not save emulator state on shutdown")

    app.on_cleanup.append(save_on_cleanup)
    return app


def _lock_state_dir(state_dir: Path) -> int:
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise EmulatorError(f"{state_dir} is in use by another Stripe emulator") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


async def _serve_async(app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, host, port, shutdown_timeout=5.0)
        await site.start()
        addresses = ", ".join(f"http://{a[0]}:{a[1]}" for a in runner.addresses)
        log.info("stripe emulator listening on %s", addresses)
        await stop.wait()
        log.info("stripe emulator shutting down")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def _configure_logging(level: str = "INFO") -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            stream=sys.stderr,
            level=getattr(logging, level.upper(), logging.INFO),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )


def serve(
    host: str,
    port: int,
    state_dir: Path,
    *,
    allow_all_interfaces: bool = False,
    search_lag: float = DEFAULT_SEARCH_LAG_SECONDS,
) -> None:
    """Run the emulator until SIGTERM/SIGINT (blocking). State is loaded from and saved to
    ``state_dir``; binding to all interfaces needs ``allow_all_interfaces``; new objects
    become searchable ``search_lag`` seconds after creation."""
    _configure_logging()
    if host.strip() in WILDCARD_HOSTS and not allow_all_interfaces:
        raise EmulatorError(
            f"refusing to bind the Stripe emulator to all interfaces ({host!r}); "
            "use 127.0.0.1 (it accepts any test key)"
        )
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_fd = _lock_state_dir(state_dir)
    try:
        state = EmulatorState(state_dir, search_lag)
        state.load()
        log.info(
            "state %s: %d objects, %d idempotency records, search lag %gs",
            state.path,
            len(ls.store),
            len(state.idempotency),
            state.search_lag,
        )
        app = build_app(state)
        asyncio.run(_serve_async(app, host, port))
    finally:
        os.close(lock_fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m billing_dev.stack.stripe_emulator",
        description="Stripe emulator (localstripe + idempotency, one-off invoices, search).",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (default 8420)")
    parser.add_argument(
        "--state-dir", type=Path, required=True, help="directory holding the persisted state"
    )
    parser.add_argument(
        "--allow-all-interfaces",
        action="store_true",
        help="permit binding to 0.0.0.0/:: (the emulator accepts any test key)",
    )
    parser.add_argument(
        "--search-lag-seconds",
        type=float,
        default=None,
        help=f"seconds before a new customer/invoice is searchable (default ${SEARCH_LAG_ENV} "
        f"or {DEFAULT_SEARCH_LAG_SECONDS:g}, Stripe's documented bound; 0 = at once)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    lag = args.search_lag_seconds
    if lag is None:
        raw = os.environ.get(SEARCH_LAG_ENV, "")
        try:
            lag = float(raw) if raw else DEFAULT_SEARCH_LAG_SECONDS
        except ValueError:
            log.error("%s=%r is not a number", SEARCH_LAG_ENV, raw)
            return 2
    if lag < 0:
        log.error("the search lag must not be negative (%g)", lag)
        return 2
    try:
        serve(
            args.host,
            args.port,
            args.state_dir,
            allow_all_interfaces=args.allow_all_interfaces,
            search_lag=lag,
        )
    except EmulatorError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("cannot start the Stripe emulator: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    # Run the package module, not this ``__main__`` copy, so that pickled state refers to
    # ``billing_dev.stack.stripe_emulator.EmuInvoice`` however the emulator was started.
    sys.exit(importlib.import_module("billing_dev.stack.stripe_emulator").main())
