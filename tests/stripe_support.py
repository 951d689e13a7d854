"""Shared set-up for the Stripe sync tests: a private snapshot schema with known rows, unique
orgs, a fault proxy in front of the emulator, and a direct SDK client for assertions."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field

import stripe

from billing.platform import connections, db
from billing.stripe_sync import mode, parking

SNAPSHOT_SCHEMA = "stripe_sync_test_snapshot"
PERIOD = dt.date(2026, 11, 1)
PLANS = {"starter": ("usd", 2900), "growth": ("usd", 9900), "enterprise": ("eur", 50000)}


_EMULATOR: dict[str, str] = {}


def emulator_url() -> str:
    """The emulator itself (remembered before a test points the connection at a proxy)."""
    return _EMULATOR.setdefault("url", connections.get(connections.STRIPE).host)


def direct_client() -> stripe.StripeClient:
    """An SDK client straight to the emulator, for assertions (no proxy, no faults)."""
    key = connections.get(connections.STRIPE).password
    return stripe.StripeClient(key, base_addresses={"api": emulator_url()}, max_network_retries=0)


def point_stripe_at(monkeypatch, url: str, key: str | None = None) -> None:
    """Point ``stripe_default`` at ``url`` (a proxy), optionally with another secret key."""
    emulator_url()
    conn = connections.get(connections.STRIPE)
    moved = connections.Conn(
        conn.conn_id, conn.conn_type, url, None, None, key or conn.password, None
    )
    monkeypatch.setenv(connections.env_var(conn.conn_id), moved.to_json())


def emulator_admin(path: str, **params) -> dict:
    """POST a test hook of the emulator (``/_emulator/<path>``), e.g. ``clock/advance``."""
    body = urllib.parse.urlencode({k: str(v) for k, v in params.items()}).encode()
    request = urllib.request.Request(f"{emulator_url()}/_emulator/{path}", data=body)
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def reset_state() -> None:
    """Fresh snapshot schema and an empty Redis side (the billing tables are truncated by clean_db)."""
    with db.connect(autocommit=True) as cx:
        cx.execute(f"DROP SCHEMA IF EXISTS {SNAPSHOT_SCHEMA} CASCADE")
        cx.execute(f"CREATE SCHEMA {SNAPSHOT_SCHEMA}")
        cx.execute(
            f"""CREATE TABLE {SNAPSHOT_SCHEMA}.fct_daily_charges (
                    org_id text, metric text, usage_date date, period_start date, currency text,
                    cumulative_charge_cents bigint, daily_charge_cents bigint,
                    dimension_key text NOT NULL DEFAULT '',
                    charge_label text GENERATED ALWAYS AS (metric || CASE WHEN dimension_key <> '' THEN ' ' || dimension_key ELSE '' END) STORED)"""
        )
        cx.execute(  # the true-up lines the push reads of ended periods (none here)
            f"""CREATE TABLE {SNAPSHOT_SCHEMA}.fct_invoice_lines (
                    org_id text, period_start date, line_type text, metric text,
                    currency text, amount_cents bigint,
                    charge_label text GENERATED ALWAYS AS (line_type || coalesce('.' || metric, '')) STORED)"""
        )
        cx.execute(
            f"""CREATE TABLE {SNAPSHOT_SCHEMA}.fct_invoices (
                    invoice_id text, org_id text, period_start date, plan text, currency text,
                    base_fee_cents bigint, usage_cents bigint, total_cents bigint)"""
        )
    parking.client().delete(parking.PARKED)
    mode.set_mode(False)


@dataclass
class Snapshot:
    """Known snapshot rows: cumulative charge C(d) per org/metric/day, and plans."""

    orgs: dict[str, str] = field(default_factory=dict)  # org_id -> plan
    charges: dict[tuple[str, str], dict[dt.date, int]] = field(default_factory=dict)

    def add_org(self, plan: str) -> str:
        org_id = f"t{uuid.uuid4().hex[:10]}"
        self.orgs[org_id] = plan
        return org_id

    def set(self, org: str, metric: str, day: dt.date, cumulative_cents: int) -> None:
        self.charges.setdefault((org, metric), {})[day] = cumulative_cents

    def c_now(self, org: str, metric: str, day: dt.date) -> int:
        days = [d for d in self.charges.get((org, metric), {}) if d <= day]
        return self.charges[(org, metric)][max(days)] if days else 0

    def expected_total(self, org: str, through: dt.date) -> int:
        base = PLANS[self.orgs[org]][1]
        return base + sum(self.c_now(o, m, through) for (o, m) in self.charges if o == org)

    def save(self) -> None:
        with db.transaction() as cx:
            cx.execute(
                f"TRUNCATE {SNAPSHOT_SCHEMA}.fct_daily_charges, {SNAPSHOT_SCHEMA}.fct_invoices"
            )
            for org, plan in self.orgs.items():
                currency, base = PLANS[plan]
                cx.execute(
                    """INSERT INTO billing.organizations (org_id, name, email, plan, currency)
                       VALUES (%s, %s, %s, %s, %s) ON CONFLICT (org_id) DO NOTHING""",
                    (org, f"Org {org}", f"billing+{org}@example.test", plan, currency),
                )
                last = max(
                    (d for (o, _), days in self.charges.items() if o == org for d in days),
                    default=PERIOD,
                )
                total = self.expected_total(org, last)
                cx.execute(
                    f"""INSERT INTO {SNAPSHOT_SCHEMA}.fct_invoices VALUES
                        (%s, %s, %s, %s, %s, %s, %s, %s)""",
                    (f"inv-{org}", org, PERIOD, plan, currency, base, total - base, total),
                )
            for (org, metric), days in self.charges.items():
                prev = 0
                for day in sorted(days):
                    name, _, key = metric.partition(" ")
                    cx.execute(
                        f"""INSERT INTO {SNAPSHOT_SCHEMA}.fct_daily_charges VALUES
                            (%s, %s, %s, %s, %s, %s, %s, %s)""",
                        (
                            org,
                            name,
                            day,
                            PERIOD,
                            PLANS[self.orgs[org]][0],
                            days[day],
                            days[day] - prev,
                            key,
                        ),
                    )
                    prev = days[day]


def random_snapshot(n_orgs: int, n_days: int, seed: int) -> Snapshot:
    """Orgs on every plan; cumulative charges that mostly grow, with a volume-tier drop."""
    rng = random.Random(seed)
    snap = Snapshot()
    plans = list(PLANS)
    for i in range(n_orgs):
        org = snap.add_org(plans[i % len(plans)])
        # a dimensioned charge (metric + its values' key) is pushed as its own item
        for metric in ("api_calls", "storage_gb", "compute_minutes", 'ai_tokens ["gpt-4o", null]'):
            c = 0
            for d in range(1, n_days + 1):
                if rng.random() < 0.2:
                    continue  # no usage that day: no row
                c += rng.randrange(0, 5000)
                if metric == "api_calls" and d == 3 and c > 2000:
                    c -= 1500  # cheaper volume tier reached: the day's charge is negative
                snap.set(org, metric, PERIOD.replace(day=d), c)
    return snap


def stripe_items(client: stripe.StripeClient, customer_id: str) -> list[dict]:
    items, params = [], {"customer": customer_id, "limit": 100}
    while True:
        page = client.v1.invoice_items.list(params=params)
        items.extend(page["data"])
        if not page["has_more"]:
            return items
        params["starting_after"] = page["data"][-1]["id"]


def customers() -> dict[str, str]:
    with db.connect() as cx:
        return dict(
            cx.execute("SELECT org_id, stripe_customer_id FROM billing.stripe_customers").fetchall()
        )


def outbox_rows() -> list[dict]:
    from psycopg.rows import dict_row

    with db.connect() as cx, cx.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM billing.stripe_outbox ORDER BY outbox_id").fetchall()


def env_for_tests(monkeypatch) -> None:
    monkeypatch.setenv("BILLING_SNAPSHOT_SCHEMA", SNAPSHOT_SCHEMA)
    monkeypatch.setenv("BILLING_STRIPE_MAX_RPS", os.environ.get("TEST_STRIPE_MAX_RPS", "0"))
    monkeypatch.setenv("BILLING_STRIPE_TIMEOUT_SECONDS", "0.5")


def dumps(obj) -> str:
    return json.dumps(obj, default=str, indent=1)
