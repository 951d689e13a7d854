"""Headless Chromium for Playwright tests: the system's browser, and the Airflow UI login.

The browser is ``/usr/bin/chromium`` (installed by ``scripts/install-system-deps.sh``;
override with ``BILLING_CHROMIUM``). Outside CI a missing browser skips; in CI
(``CI=true``) it fails.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

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


def missing(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI must run the browser test: scripts/install-system-deps.sh)")
    pytest.skip(reason)


def login(browser, base: str, password: str):
    """A new browser page logged in to the Airflow UI as admin (SimpleAuthManager form)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(20_000)
    page = context.new_page()
    page.goto(f"{base}/", wait_until="domcontentloaded")
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"^(?!.*/auth/login).*$"))
    assert any(c["name"] == "_token" for c in context.cookies())
    return context, page
