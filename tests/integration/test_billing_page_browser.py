"""The Billing page in a real browser: log in to the Airflow UI, Admin → Billing, Reconcile
now, then Admin → Health.

Headless Chromium (the system's ``/usr/bin/chromium``, installed by
``scripts/install-system-deps.sh``; override with ``BILLING_CHROMIUM``) driven by Playwright.
Outside CI a missing browser skips; in CI (``CI=true``) it fails. A screenshot of the page
is saved in the test's tmp folder.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str | None:
    explicit = os.environ.get("BILLING_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _missing(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI must run the browser test: scripts/install-system-deps.sh)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        _missing("no Chromium: apt-get install chromium, or set BILLING_CHROMIUM")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (requirements.txt)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


def test_login_open_billing_and_reconcile_now(
    browser, airflow_server, airflow_client, latest_reconciliation, parked_customer, tmp_path
):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(20_000)
    page = context.new_page()
    try:
        # 1. The SimpleAuthManager login form (admin, password from the stack's passwords file).
        page.goto(f"{airflow_server.base}/", wait_until="domcontentloaded")
        page.get_by_label("Username").fill("admin")
        page.get_by_label("Password").fill(airflow_server.password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(re.compile(r"^(?!.*/auth/login).*$"))
        assert any(c["name"] == "_token" for c in context.cookies())

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
