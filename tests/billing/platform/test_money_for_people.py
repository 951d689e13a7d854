"""Money a person reads is in its currency: `billing parked list` shows €985.61 and ¥3,600,
not 98561 next to 3600 (the Billing page: tests/integration/test_billing_page.py)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def parked_items(stack, clean_db):
    from billing.platform import db

    rows = [("eur-org", 98561, "eur"), ("jpy-org", 3600, "jpy")]
    with db.connect(autocommit=True) as cx:
        for org, cents, cur in rows:
            cx.execute(
                """INSERT INTO billing.stripe_outbox (idempotency_key, kind, org_id, period, day,
                       metric, amount_cents, currency, payload, status, attempts,
                       last_error, last_error_class, parked_at)
                   VALUES (%s, 'usage_item', %s, '2026-11-01', '2026-11-03', 'api_calls', %s,
                           %s, '{}', 'parked', 6, 'connection refused', 'connection', now())""",
                (f"billing:usage_item:{org}:2026-11:2026-11-03:api_calls", org, cents, cur),
            )
    yield
    with db.connect(autocommit=True) as cx:
        cx.execute("DELETE FROM billing.stripe_outbox WHERE org_id IN ('eur-org', 'jpy-org')")


def test_cli_parked_list_shows_money_json_keeps_minor_units(parked_items, capsys):
    from billing import cli

    assert cli.main(["parked", "list"]) == 0
    rows = {r.split()[0]: r for r in capsys.readouterr().out.splitlines()[2:-1]}
    assert "€985.61" in rows["billing:usage_item:eur-org:2026-11:2026-11-03:api_calls"]
    assert "¥3,600" in rows["billing:usage_item:jpy-org:2026-11:2026-11-03:api_calls"]
    assert (
        cli.main(["parked", "show", "billing:usage_item:jpy-org:2026-11:2026-11-03:api_calls"]) == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert (shown["outbox"]["amount_cents"], shown["outbox"]["currency"]) == (3600, "jpy")
