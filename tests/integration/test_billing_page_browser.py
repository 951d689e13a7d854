"""The Billing page in a real browser: log in to the Airflow UI, Admin → Billing, Reconcile
now, then Admin → Health.

Headless Chromium driven by Playwright (``browser`` in tests/integration/conftest.py). A
screenshot of the page is saved in the test's tmp folder.
"""

from __future__ import annotations

import re

import pytest
from browser_support import login

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_login_open_billing_and_reconcile_now(
    browser, airflow_server, airflow_client, latest_reconciliation, parked_customer, tmp_path
):
    from playwright.sync_api import expect

    # 1. The SimpleAuthManager login form (admin, password from the stack's passwords file).
    context, page = login(browser, airflow_server.base, airflow_server.password)
    try:
        # 2. Admin → Billing in the navigation opens the page in the UI's iframe.
        page.get_by_role("button", name="Admin").click()
        page.get_by_role("menuitem", name="Billing").click()
        page.wait_for_url(re.compile(r"/plugin/billing"))
        frame = page.frame_locator('iframe[title="Billing"]')
        tiles = frame.locator('[data-testid="red-tile"]')
        expect(tiles.first).to_be_visible()
        assert tiles.count() >= 5
        expect(
            frame.locator('[data-dag-id="billing_reconcile"] [data-metric="errors"]')
        ).to_be_visible()
        # A parked write: never "writable" while writes fail.
        status = frame.locator('[data-testid="stripe-status"]')
        expect(status).to_contain_text("1 writes parked since")
        expect(status).not_to_contain_text("writable")
        expect(frame.locator(f'tr[data-key="{parked_customer}"] button.retry')).to_be_enabled()
        expect(frame.locator('[data-testid="reconcile-latest"]')).to_contain_text("2031-07")
        # Escaped data: the org id's markup is shown as text.
        expect(frame.locator('[data-testid="discrepancies"]')).to_contain_text("<b>evil</b>")

        # 3. Reconcile now: the page shows the run it started, with a link to it.
        frame.get_by_role("button", name="Reconcile now").click()
        link = frame.locator('[data-testid="reconcile-run-link"]')
        expect(link).to_have_text(re.compile(r"^billing_page__[0-9a-f-]{36}$"))
        run_id = link.inner_text()
        expect(frame.locator('[data-testid="reconcile-result"]')).to_contain_text("Started run")
        assert link.get_attribute("href").endswith(f"/dags/billing_reconcile/runs/{run_id}")
        expect(frame.locator('[data-testid="reconcile-run-state"]')).to_have_text(
            re.compile(r"queued|running|success|failed")
        )

        # 4. Prepaid credits of one org (a navigation: the CSP allows no form submission).
        org = _org_with_credit("12.34")
        frame.locator('#credits-form input[name="org"]').fill(org)
        frame.get_by_role("button", name="Show credits").click()
        expect(frame.locator('[data-testid="credits-balance"]')).to_contain_text("$12.34")
        expect(frame.locator('[data-testid="credits-movements"]')).to_contain_text("grant")
        # ... and its plans over time, with who recorded them
        expect(frame.locator('[data-testid="subscriptions-intervals"]')).to_contain_text(
            "growth[-infinity, open)"
        )
        expect(frame.locator('[data-testid="subscriptions-changes"]')).to_contain_text("create")

        shot = tmp_path / "billing-page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.exists() and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")

        # 4. Admin → Health (the playbook's RED tiles) opens the tiles on their own.
        page.get_by_role("button", name="Admin").click()
        page.get_by_role("menuitem", name="Health").click()
        page.wait_for_url(re.compile(r"/plugin/billing-health"))
        health = page.frame_locator('iframe[title="Health"]')
        expect(health.locator('[data-testid="red-tile"]').first).to_be_visible()
        assert health.locator('[data-testid="red-tile"]').count() >= 5
        expect(
            health.locator('[data-dag-id="billing_nightly"] [data-metric="duration"]')
        ).to_be_visible()
        assert health.locator('[data-testid="stripe-status"]').count() == 0
    finally:
        context.close()

    # Exactly that one run exists in Airflow, started with the page's key.
    r = airflow_client.get(f"/api/v2/dags/billing_reconcile/dagRuns/{run_id}")
    assert r.status_code == 200, r.text
    key = run_id.removeprefix("billing_page__")
    assert r.json()["conf"]["idempotency_key"] == key


def _org_with_credit(amount: str) -> str:
    import uuid

    from billing import credits
    from billing.platform import db

    org = f"page{uuid.uuid4().hex[:8]}"
    with db.transaction() as cx:
        cx.execute(
            """INSERT INTO billing.organizations (org_id, name, email, plan, currency)
               VALUES (%s, 'Credits page', 'ap@example.test', 'growth', 'usd')""",
            (org,),
        )
        credits.grant(cx, org, amount, "usd", reason="page test", actor="test:page")
    return org
