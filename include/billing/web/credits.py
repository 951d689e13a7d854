"""Prepaid credits on the Billing page and in the API: one org's balance and movements.

``GET /billing/orgs/{org_id}/credits`` (JSON, minor units) and the page's credits panel
(``/billing/ui?org=ID``) read :func:`billing.credits.statement`; both are read-only.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated

from fastapi import FastAPI, HTTPException, status
from fastapi import Path as PathParam

from billing import credits
from billing.orgs import ORG_ID_PATTERN
from billing.platform import db
from billing.platform.tables import money


def statement(org_id: str, as_of: dt.datetime | None = None) -> dict | None:
    """The org's credit statement (None: no such org). The page is a view, not a task: it
    shows expiries as of now unless told otherwise."""
    as_of = as_of or dt.datetime.now(dt.UTC)
    try:
        with db.connect() as cx:
            return credits.statement(cx, org_id, as_of)
    except credits.CreditError:
        return None


def panel(org_id: str | None) -> dict | None:
    """The page's credits panel: the statement with amounts as people read them."""
    if not org_id:
        return None
    if not re.match(ORG_ID_PATTERN, org_id):
        return {"org_id": org_id, "error": "not an org id"}
    st = statement(org_id)
    if st is None:
        return {"org_id": org_id, "error": "no such org"}
    cur = st["currency"]
    return {
        "org_id": org_id,
        "error": None,
        "balance": money(st["balance_cents"], cur),
        "expired": money(st["expired_cents"], cur),
        "grants": [
            {
                **g,
                "amount": money(g["amount_cents"], g["currency"]),
                "applied": money(g["applied_cents"], g["currency"]),
                "expires": credits._expires(g["expires_at"]),
            }
            for g in st["grants"]
        ],
        "movements": [
            {
                **m,
                "when": f"{m['at']:%Y-%m-%d %H:%M}",
                "amount": money(m["amount_cents"], m["currency"]),
            }
            for m in st["movements"]
        ],
    }


def install(app: FastAPI) -> None:
    @app.get(
        "/orgs/{org_id}/credits",
        summary="An org's prepaid credits: balance, grants and every movement (minor units)",
        responses={404: {}},
    )
    def org_credits(
        org_id: Annotated[str, PathParam(pattern=ORG_ID_PATTERN, max_length=64)],
    ) -> dict:
        st = statement(org_id)
        if st is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such org")
        return st
