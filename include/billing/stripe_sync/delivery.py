"""Did everything reach Stripe? One answer for the nightly sentinel and the Billing page.

A push that parks writes (Stripe unreachable, a refused write) or queues them (outage mode)
does not fail ``stripe_push``: nothing is lost, the outbox keeps every write. But such a
day is **degraded**, not green. The outbox (``billing.stripe_outbox``) is the truth:

* :func:`open_writes` reads what is still open (parked and pending rows, the newest error);
* :func:`verdict` (pure) says whether the day is delivered, and the one-line reason if not;
  ``billing_nightly``'s last task ``stripe_all_delivered`` skips itself with that line, so
  the run stays successful (``airflow dags test``, ``billing run-day`` and ``billing
  simulate`` exit 0) and the grid shows a skipped, pink sentinel;
* :func:`status` (pure) is the Billing page's Stripe line: read-only, unreachable (parked
  or failing writes with their last error), queued, or writable.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

# billing_nightly's sentinel task; the Billing page counts a run whose sentinel was
# skipped as degraded (billing.web.page.red_tiles).
SENTINEL_TASK_ID = "stripe_all_delivered"
# Error classes (billing.stripe_sync.client.classify) that mean "Stripe did not answer".
UNREACHABLE = frozenset({"connection", "timeout", "server", "rate_limit"})


def open_writes(cx) -> dict[str, Any]:
    """Parked and pending outbox rows, since when, and the newest error among them."""
    parked, pending, parked_since, pending_since = cx.execute(
        """SELECT count(*) FILTER (WHERE status = 'parked'),
                  count(*) FILTER (WHERE status = 'pending'),
                  min(parked_at) FILTER (WHERE status = 'parked'),
                  min(created_at) FILTER (WHERE status = 'pending')
             FROM billing.stripe_outbox WHERE status IN ('parked', 'pending')"""
    ).fetchone()
    last = cx.execute(
        """SELECT last_error_class, last_error, updated_at FROM billing.stripe_outbox
            WHERE status IN ('parked', 'pending') AND last_error_class IS NOT NULL
            ORDER BY updated_at DESC, outbox_id DESC LIMIT 1"""
    ).fetchone()
    return {
        "parked": parked,
        "queued": pending,
        "parked_since": parked_since,
        "queued_since": pending_since,
        "last_error_class": last[0] if last else None,
        "last_error": last[1] if last else None,
        "last_error_at": last[2] if last else None,
    }


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat(timespec="seconds")


def verdict(open_: dict[str, Any], read_only: dict | None = None) -> dict[str, Any]:
    """``delivered`` when nothing is parked or queued; else the sentinel's one-line reason."""
    parked, queued = open_["parked"], open_["queued"]
    delivered = parked == 0 and queued == 0
    if delivered:
        message = "delivered: nothing parked or queued"
    else:
        message = f"degraded: {parked} parked, {queued} queued (billing parked list)"
        if read_only is not None:
            message += f"; Stripe read-only since {read_only['since']}"
        elif open_.get("last_error_class"):
            message += f"; last error {open_['last_error_class']}"
    return {"delivered": delivered, "parked": parked, "queued": queued, "message": message}


def status(open_: dict[str, Any], read_only: dict | None) -> dict[str, str]:
    """The Billing page's Stripe status: ``state`` (read_only, unreachable, failing, queued,
    writable) and its ``text``. Never "pushes go out normally" while writes are failing."""
    parked, queued = open_["parked"], open_["queued"]
    cls, at = open_.get("last_error_class"), _iso(open_.get("last_error_at"))
    error = f" (last error {cls} at {at}: {open_.get('last_error') or ''}".rstrip(": ") + ")"
    if read_only is not None:
        text = f"since {read_only['since']}"
        if read_only.get("reason"):
            text += f" — {read_only['reason']}"
        return {"state": "read_only", "text": f"{text} · {queued} writes queued"}
    if parked or (queued and cls):
        state = "unreachable" if cls in UNREACHABLE else "failing"
        since = _iso(open_["parked_since"] if parked else open_["queued_since"])
        what = f"{parked} writes parked" if parked else f"{queued} writes retrying"
        return {"state": state, "text": f"{what} since {since}{error if cls else ''}"}
    if queued:
        return {"state": "queued", "text": f"{queued} writes queued for the next push"}
    return {"state": "writable", "text": "pushes go out normally"}


def check(cx=None) -> dict[str, Any]:
    """The verdict for the outbox as it is now (the sentinel task calls this)."""
    from billing.platform import db
    from billing.stripe_sync import mode

    if cx is None:
        with db.connect(autocommit=True) as own:
            return check(own)
    return verdict(open_writes(cx), mode.info(cx))


def sentinel() -> dict[str, Any]:
    """``billing_nightly.stripe_all_delivered``: the verdict when delivered, else skip.

    A skip, not a failure: nothing is lost (the outbox keeps every write, the retry DAG and
    the next night send it), so the run must not fail or retry; but the grid shows the
    skipped sentinel, the Billing page counts the run as degraded and
    ``BillingStripeParkedPushes`` alerts on the parked depth (docs/runbooks/stripe-outage.md).
    """
    from airflow.sdk.exceptions import AirflowSkipException

    result = check()
    if not result["delivered"]:
        raise AirflowSkipException(result["message"])
    return result
