"""What the Billing API (``billing.web.api``) and the Billing page (``billing.web.page``)
share: the ``Billing`` view's access check and the cached Stripe mode both show.

The API mounts the page; both import this module, never each other the other way round.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import Depends, HTTPException, status

from billing.platform import settings

RESOURCE_NAME = "Billing"


def requires_billing_access() -> Callable:
    """Airflow's authentication plus the auth manager's decision on the Billing view."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.core_api.security import get_user

    # A Depends() default, not an annotation: annotations are strings under
    # ``from __future__ import annotations`` and this import is local. Async, as Airflow's
    # own ``requires_access_*``: no thread-pool hop per request for a CPU-only check.
    async def inner(user=Depends(get_user)) -> None:  # noqa: B008
        allowed = get_auth_manager().is_authorized_custom_view(
            method="GET", resource_name=RESOURCE_NAME, user=user
        )
        if not allowed:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden")

    return inner


_stripe_cache: tuple[float, dict | None] = (0.0, None)


def stripe_status() -> dict | None:
    """Stripe outage mode for the read-only views, from ``billing.stripe_sync`` when present.

    Cached for a few seconds (``settings.stripe_status_ttl_s``): the flag is a Postgres row
    (``billing.stripe_sync.mode``), and neither its latency nor an outage may slow down or
    break invoice reads.
    """
    global _stripe_cache
    now = time.monotonic()
    if _stripe_cache[0] and now - _stripe_cache[0] < settings.stripe_status_ttl_s():
        return _stripe_cache[1]
    try:
        from billing import stripe_sync
    except ImportError:
        stripe_sync = None
    probe = getattr(stripe_sync, "read_only", None)
    if probe is None:
        value = None
    else:
        try:
            info = probe()
            value = {"read_only": info is not None, **(info or {})}
        except Exception as exc:  # database down: report unknown, keep serving
            value = {"read_only": None, "error": type(exc).__name__}
    _stripe_cache = (now, value)
    return value
