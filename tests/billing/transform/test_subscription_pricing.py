"""Subscriptions over time on the real stack (dbt on Postgres): plan changes, starts and
cancellations mid-period and a catalog price change, each invoice to the cent, and the
Python reference (billing.pricing.reference) agreeing with dbt on random subscription
histories (docs/SUBSCRIPTIONS.md).

March 2025 has 31 days. Catalog v1: starter $29/month, api_calls graduated (first 1,000
free, then $0.01); pro $99/month, api_calls $0.005 each. Proration: round_half_up(fee x
days / 31) per segment; tiers restart in each segment.
"""

from __future__ import annotations

import datetime as dt
import os
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.pricing import aggregation as agg
from billing.pricing import catalog as pricing
from billing.pricing import reference

pytestmark = pytest.mark.integration

SNAPSHOT = "billing_snapshot"
MARCH = dt.date(2025, 3, 1)
FEB = dt.date(2025, 2, 1)

V1 = {
    "metrics": {
        "api_calls": {"unit": "call"},
        "seats": {"unit": "seat", "aggregation": "time_weighted"},
    },
    "plans": {
        "starter": {
            "currency": "usd",
            "base_fee": "29",
            "metrics": {
                "api_calls": {
                    "mode": "graduated",
                    "tiers": [
                        {"up_to": 1000, "unit_price": "0"},
                        {"up_to": None, "unit_price": "0.01"},
                    ],
                }
            },
        },
        "pro": {
            "currency": "usd",
            "base_fee": "99",
            "minimum_commitment": "120",
            "metrics": {
                "api_calls": {
                    "mode": "graduated",
                    "tiers": [{"up_to": None, "unit_price": "0.005"}],
                },
                "seats": {"mode": "graduated", "tiers": [{"up_to": None, "unit_price": "0.01"}]},
            },
        },
    },
}


def _v2(effective_from: str | None) -> dict:
    """v1 with starter at $39/month and $0.02 per call past the free 1,000."""
    doc = {**V1, "plans": {**V1["plans"]}}
    doc["plans"]["starter"] = {
        "currency": "usd",
        "base_fee": "39",
        "metrics": {
            "api_calls": {
                "mode": "graduated",
                "tiers": [
                    {"up_to": 1000, "unit_price": "0"},
                    {"up_to": None, "unit_price": "0.02"},
                ],
            }
        },
    }
    if effective_from:
        doc["effective_from"] = effective_from
    return doc


@pytest.fixture
def fresh(stack, clean_db):
    from billing.platform import db

    with db.connect(autocommit=True) as cx:
        for month in (dt.date(2025, 1, 1), FEB, MARCH, dt.date(2025, 4, 1)):
            cx.execute("SELECT billing.ensure_usage_partition(%s)", (month,))
    yield


def _orgs(cx, orgs: dict[str, list[tuple[str, str | None, str | None]]]) -> None:
    """orgs: org -> its subscriptions (plan, starts, ends), replacing the first one."""
    for org, subs in orgs.items():
        cx.execute(
            "INSERT INTO billing.organizations (org_id, name, email, plan, currency, created_at)"
            " VALUES (%s, %s, %s, %s, 'usd', '2020-01-01')",
            (org, org, f"{org}@example.test", subs[0][0]),
        )
        cx.execute("DELETE FROM billing.subscriptions WHERE org_id = %s", (org,))
        for plan, starts, ends in subs:
            cx.execute(
                "INSERT INTO billing.subscriptions (org_id, plan, starts_at, ends_at, created_by)"
                " VALUES (%s, %s, %s, %s, 'test')",
                (org, plan, starts or "-infinity", ends),
            )


def _events(cx, events, prefix="e"):
    """events: (org, metric, quantity, occurred_at)."""
    cx.cursor().executemany(
        "INSERT INTO billing.usage_events (event_id, org_id, metric, quantity, occurred_at,"
        " billable, source, arrival_day, properties, file_id, line_no)"
        " VALUES (%s, %s, %s, %s, %s, true, 'api', %s, NULL, 0, %s)",
        [
            (f"{prefix}-{i}", org, metric, qty, at, at.date(), i)
            for i, (org, metric, qty, at) in enumerate(events)
        ],
    )


def _at(day: int, month: dt.date = MARCH, hour: int = 12) -> dt.datetime:
    return dt.datetime(month.year, month.month, day, hour, tzinfo=dt.UTC)


def _lines(cx, org: str, period: dt.date) -> dict[str, tuple[str, int]]:
    """invoice line id -> (charge label, amount in minor units)."""
    return {
        line_id: (label, cents)
        for line_id, label, cents in cx.execute(
            f"SELECT invoice_line_id, charge_label, amount_cents FROM {SNAPSHOT}.fct_invoice_lines"
            " WHERE org_id = %s AND period_start = %s ORDER BY line_number",
            (org, period),
        )
    }


def _total(cx, org: str, period: dt.date) -> tuple[int, str, str]:
    return cx.execute(
        f"SELECT total_cents, plan, snapshot_hash FROM {SNAPSHOT}.fct_invoices"
        " WHERE org_id = %s AND period_start = %s",
        (org, period),
    ).fetchone()


def test_upgrade_downgrade_start_and_cancel_mid_month_to_the_cent(fresh, tmp_path):
    from billing.platform import db
    from billing.transform import project as transform

    catalog = pricing.parse_catalog(V1, "test")
    with db.connect() as cx:
        _orgs(
            cx,
            {
                "up": [("starter", None, "2025-03-15"), ("pro", "2025-03-15", None)],
                "down": [("pro", None, "2025-03-15"), ("starter", "2025-03-15", None)],
                "short": [("starter", "2025-03-10", "2025-03-20")],
            },
        )
        events = []
        for org in ("up", "down"):
            events += [(org, "api_calls", 1500, _at(5)), (org, "api_calls", 2000, _at(20))]
        events += [
            ("short", "api_calls", 300, _at(5)),  # before its start: not billed
            ("short", "api_calls", 1200, _at(12)),
            ("short", "api_calls", 5000, _at(25)),  # after its cancellation: not billed
        ]
        _events(cx, events)
        cx.commit()
    transform.transform_day(
        dt.date(2025, 3, 31), MARCH, targets=["postgres"], full_refresh=True, catalog=catalog
    )
    with db.connect() as cx:
        # upgrade on the 15th: starter for 14 days, pro for 17
        assert _lines(cx, "up", MARCH) == {
            "inv_up_202503.base": ("base_fee", 1310),  # 2900 x 14/31 = 1309.68
            "inv_up_202503.usage.api_calls": ("api_calls", 500),  # 1000 free + 500 x $0.01
            "inv_up_202503.base@2025-03-15": ("base_fee from 2025-03-15", 5429),  # 9900 x 17/31
            # tiers restart: 2000 x $0.005
            "inv_up_202503.usage.api_calls@2025-03-15": ("api_calls from 2025-03-15", 1000),
            # pro seats, priced but unused in the segment
            "inv_up_202503.usage.seats@2025-03-15": ("seats from 2025-03-15", 0),
            # pro's $120 commitment prorated: 12000 x 17/31 = 6580.65 -> 6581, less 1000 used
            "inv_up_202503.minimum_commitment@2025-03-15": (
                "minimum_commitment from 2025-03-15",
                5581,
            ),
        }
        assert _total(cx, "up", MARCH)[:2] == (1310 + 500 + 5429 + 1000 + 5581, "pro")
        # downgrade on the 15th: pro for 14 days, starter for 17 (its free 1,000 again)
        assert _lines(cx, "down", MARCH) == {
            "inv_down_202503.base": ("base_fee", 4471),  # 9900 x 14/31 = 4470.97
            "inv_down_202503.usage.api_calls": ("api_calls", 750),  # 1500 x $0.005
            "inv_down_202503.usage.seats": ("seats", 0),
            # 12000 x 14/31 = 5419.35 -> 5419, less 750
            "inv_down_202503.minimum_commitment": ("minimum_commitment", 4669),
            "inv_down_202503.base@2025-03-15": ("base_fee from 2025-03-15", 1590),  # 2900 x 17/31
            "inv_down_202503.usage.api_calls@2025-03-15": ("api_calls from 2025-03-15", 1000),
        }
        assert _total(cx, "down", MARCH)[:2] == (4471 + 750 + 4669 + 1590 + 1000, "starter")
        # start on the 10th, cancel on the 20th: 10 days of starter, usage inside them only
        assert _lines(cx, "short", MARCH) == {
            "inv_short_202503.base@2025-03-10": ("base_fee from 2025-03-10", 935),  # 2900 x 10/31
            "inv_short_202503.usage.api_calls@2025-03-10": ("api_calls from 2025-03-10", 200),
        }
        assert _total(cx, "short", MARCH)[0] == 1135
        # its usage outside the 10th-19th has no charge row
        assert cx.execute(
            f"SELECT count(*) FROM {SNAPSHOT}.fct_daily_charges WHERE org_id = 'short'"
            " AND usage_date NOT BETWEEN '2025-03-10' AND '2025-03-19'"
        ).fetchone() == (0,)
    # the PDF names each segment's plan and days, with a base fee row per segment
    from pdf_support import pdf_text

    from billing.invoices import store

    with db.connect() as cx:
        _etag, pdf = store.render_current(cx, "inv_up_202503")
    text = " ".join(pdf_text(pdf, tmp_path).split())
    # (pdftotext -layout wraps the long item names: "Base fee (starter, 01 Mar–14 ... Mar)")
    assert "Base fee (starter, 01 Mar–14 14/31 days $13.10 Mar)" in text
    assert "Base fee (pro, 15 Mar–31 17/31 days $54.29 Mar)" in text
    assert "api_calls (pro, 15 Mar–31 Mar) 2,000 1 – ∞: 2,000 × 0.005 = 10.00 $10.00" in text
    assert "Total (USD) $138.20" in text


def test_catalog_price_change_mid_month_leaves_the_closed_month_untouched(fresh):
    from billing.platform import db
    from billing.platform.errors import ConfigError
    from billing.pricing import catalog_sync
    from billing.transform import project as transform

    v1 = pricing.parse_catalog(V1, "v1")
    with db.connect() as cx:
        _orgs(cx, {"acme": [("starter", None, None)]})
        _events(
            cx,
            [
                ("acme", "api_calls", 1500, _at(10, FEB)),
                ("acme", "api_calls", 1500, _at(5)),
                ("acme", "api_calls", 2000, _at(20)),
            ],
        )
        cx.commit()
    transform.transform_day(
        dt.date(2025, 3, 3), FEB, targets=["postgres"], full_refresh=True, catalog=v1
    )
    with db.connect() as cx:
        february = _total(cx, "acme", FEB)
        assert february[0] == 2900 + 500
        # February closes (the month close records it once its invoices are final)
        cx.execute(
            "INSERT INTO billing.period_closes (period, closed_on_day, missing_days, invoices)"
            " VALUES (%s, '2025-03-03', '{}', 1)",
            (FEB,),
        )
        cx.commit()
        # a price change dated inside the closed month is refused, nothing written
        with pytest.raises(ConfigError, match="falls in a closed period"):
            catalog_sync.sync(cx, pricing.parse_catalog(_v2("2025-02-20"), "v2"))
        cx.rollback()
        assert len(catalog_sync.activations(cx)) == 1
    v2 = pricing.parse_catalog(_v2("2025-03-15"), "v2")
    # even a full rebuild of every period prices February with v1 (the version in force then)
    transform.transform_day(
        dt.date(2025, 3, 31), FEB, targets=["postgres"], full_refresh=True, catalog=v2
    )
    with db.connect() as cx:
        assert _total(cx, "acme", FEB) == february
        assert _lines(cx, "acme", MARCH) == {
            "inv_acme_202503.base": ("base_fee", 1310),  # v1: 2900 x 14/31
            "inv_acme_202503.usage.api_calls": ("api_calls", 500),
            "inv_acme_202503.base@2025-03-15": ("base_fee from 2025-03-15", 2139),  # 3900 x 17/31
            # v2 from the 15th: tiers restart, 1000 x $0.02
            "inv_acme_202503.usage.api_calls@2025-03-15": ("api_calls from 2025-03-15", 2000),
        }
        versions = dict(
            cx.execute(
                f"SELECT segment_start, catalog_version FROM {SNAPSHOT}.fct_invoice_lines"
                " WHERE org_id = 'acme' AND period_start = %s AND line_type = 'base_fee'",
                (MARCH,),
            ).fetchall()
        )
        assert versions == {
            MARCH: pricing.catalog_version(v1),
            dt.date(2025, 3, 15): pricing.catalog_version(v2),
        }
        # a catalog synced without a date takes effect after the last closed period
        v3 = pricing.parse_catalog(
            {**V1, "plans": {**V1["plans"], "extra": V1["plans"]["starter"]}}, "v3"
        )
        catalog_sync.sync(cx, v3)
        cx.commit()
        assert catalog_sync.activations(cx)[-1][:2] == (
            pricing.catalog_version(v3),
            dt.date(2025, 3, 1),
        )


# ---------------------------------------------------------------- property test
PLANS = ("starter", "pro")


@st.composite
def _history(draw):
    """Random subscriptions of a few orgs in March (gaps, starts, cancellations, changes)
    and events across the month, some time-weighted seats."""
    orgs = {}
    for i in range(draw(st.integers(2, 4))):
        cuts = sorted(draw(st.sets(st.integers(2, 31), max_size=3)))
        bounds = [None, *[f"2025-03-{d:02d}" for d in cuts], None]
        subs = []
        for k in range(len(bounds) - 1):
            if k and draw(st.integers(0, 3)) == 0:
                continue  # a gap: cancelled, then started again later
            subs.append((draw(st.sampled_from(PLANS)), bounds[k], bounds[k + 1]))
        if not subs:
            subs = [(draw(st.sampled_from(PLANS)), None, None)]
        orgs[f"o{i}"] = subs
    events = []
    for _ in range(draw(st.integers(5, 30))):
        day = draw(st.integers(1, 31))
        at = dt.datetime(2025, 3, day, tzinfo=dt.UTC) + dt.timedelta(
            seconds=draw(st.integers(0, 86_399))
        )
        metric = draw(st.sampled_from(["api_calls", "api_calls", "seats"]))
        qty = draw(st.integers(0, 1500)) if metric == "api_calls" else draw(st.integers(0, 9))
        events.append((draw(st.sampled_from(sorted(orgs))), metric, qty, at))
    change = draw(st.sampled_from([None, None, "2025-03-08", "2025-03-21"]))
    return orgs, events, change


def _day(value: str | None) -> dt.date | None:
    return dt.date.fromisoformat(value) if value else None


@settings(
    max_examples=int(os.environ.get("BILLING_TRANSFORM_EXAMPLES", "2")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(_history())
def test_segments_match_the_reference_to_the_cent(fresh, history):
    from billing.platform import db
    from billing.pricing import catalog_sync
    from billing.transform import project as transform

    orgs, events, change = history
    v1 = pricing.parse_catalog(V1, "v1")
    activations = [(v1, None)]
    with db.connect() as cx:
        cx.execute(
            "TRUNCATE billing.organizations, billing.subscriptions, billing.usage_events,"
            " billing.catalog_versions CASCADE"
        )
        _orgs(cx, orgs)
        _events(cx, events)
        catalog_sync.sync(cx, v1)
        cx.commit()
    catalog = v1
    if change:  # a price change from that day: v2 in force
        catalog = pricing.parse_catalog(_v2(change), "v2")
        activations.append((catalog, _day(change)))
    run_day = dt.date(2025, 3, 31)
    transform.transform_day(
        run_day, MARCH, targets=["postgres"], full_refresh=True, catalog=catalog
    )
    by_org: dict[str, list] = {o: [] for o in orgs}
    for i, (org, metric, qty, at) in enumerate(events):
        by_org[org].append((metric, agg.BillableEvent(f"e-{i}", at, Decimal(qty))))
    with db.connect() as cx:
        for org, subs in orgs.items():
            segs = reference.segments(
                [(p, _day(a), _day(b)) for p, a, b in subs], activations, MARCH
            )
            want = reference.invoice_lines(segs, by_org[org], run_day)
            got = {
                label: cents
                for label, cents in cx.execute(
                    f"SELECT charge_label, sum(amount_cents)::bigint FROM {SNAPSHOT}.fct_invoice_lines"
                    " WHERE org_id = %s AND period_start = %s GROUP BY 1 HAVING sum(amount_cents) <> 0",
                    (org, MARCH),
                )
            }
            # the snapshot's base fee lines, by segment like the reference's
            assert got == want, (org, subs, change)
            total = _total(cx, org, MARCH)
            assert (total[0] if total else 0) == sum(want.values())


def _stripe_lines(org: str, period: str = "2025-03") -> dict[str, int]:
    """The org's Stripe invoice items of ``period`` summed per charge label (the base fee
    item as base_fee)."""
    from stripe_support import direct_client, stripe_items

    from billing.platform import db

    with db.connect() as cx:
        (customer,) = cx.execute(
            "SELECT stripe_customer_id FROM billing.stripe_customers WHERE org_id = %s", (org,)
        ).fetchone()
    out: dict[str, int] = {}
    for ii in stripe_items(direct_client(), customer):
        meta = ii["metadata"].to_dict()
        if meta["period"] != period:
            continue
        label = "base_fee" if meta["kind"] == "base_fee" else meta["metric"]
        out[label] = out.get(label, 0) + ii["amount"]
    return {k: v for k, v in out.items() if v}


def test_a_segments_true_up_is_pushed_once(fresh, monkeypatch):
    """The prorated commitment of a segment (label 'minimum_commitment from 2025-03-15') is
    pushed by the run of the period's last day and never again by later runs."""
    import uuid

    from billing import stripe_sync
    from billing.platform import db
    from billing.stripe_sync import Engine
    from billing.transform import project as transform

    monkeypatch.setenv("BILLING_STRIPE_MAX_RPS", "0")
    org = f"tu{uuid.uuid4().hex[:8]}"
    catalog = pricing.parse_catalog(V1, "test")
    with db.connect() as cx:
        _orgs(cx, {org: [("starter", None, "2025-03-15"), ("pro", "2025-03-15", None)]})
        _events(cx, [(org, "api_calls", 1500, _at(5)), (org, "api_calls", 2000, _at(20))])
        cx.commit()
    eng = Engine(sleep=lambda _s: None)
    transform.transform_day(
        dt.date(2025, 3, 31), MARCH, targets=["postgres"], full_refresh=True, catalog=catalog
    )
    stripe_sync.push_day(dt.date(2025, 3, 31), engine=eng)
    transform.transform_day(dt.date(2025, 4, 1), catalog=catalog, targets=["postgres"])
    stripe_sync.push_day(dt.date(2025, 4, 1), engine=eng)
    assert _stripe_lines(org) == {  # March to the cent: 13820, as the snapshot
        "base_fee": 1310 + 5429,
        "api_calls": 500,
        "api_calls from 2025-03-15": 1000,
        "minimum_commitment from 2025-03-15": 5581,
    }


def test_an_upgrade_undone_after_its_items_were_pushed_is_taken_back(fresh, monkeypatch):
    """Pushed on the 16th with an upgrade from the 15th, then the upgrade is undone: the
    next run takes back the 'from 2025-03-15' items and the prorated base fee, and Stripe
    holds exactly the snapshot again."""
    import uuid

    from billing import stripe_sync, subscriptions
    from billing.platform import db
    from billing.stripe_sync import Engine
    from billing.transform import project as transform

    monkeypatch.setenv("BILLING_STRIPE_MAX_RPS", "0")
    org = f"flip{uuid.uuid4().hex[:8]}"
    catalog = pricing.parse_catalog(V1, "test")
    with db.connect() as cx:
        _orgs(cx, {org: [("starter", None, "2025-03-15"), ("pro", "2025-03-15", None)]})
        _events(cx, [(org, "api_calls", 1500, _at(5)), (org, "api_calls", 2000, _at(16))])
        cx.commit()
    eng = Engine(sleep=lambda _s: None)
    transform.transform_day(
        dt.date(2025, 3, 16), MARCH, targets=["postgres"], full_refresh=True, catalog=catalog
    )
    stripe_sync.push_day(dt.date(2025, 3, 16), engine=eng)

    # base 1310 + 5429 = 6739; starter 500; pro 2000 x $0.005
    assert _stripe_lines(org) == {
        "base_fee": 6739,
        "api_calls": 500,
        "api_calls from 2025-03-15": 1000,
    }

    with db.transaction() as cx:
        subscriptions.change_plan(cx, org, "starter", dt.date(2025, 3, 15), "cli:test", "cli")
    transform.transform_day(dt.date(2025, 3, 17), catalog=catalog, targets=["postgres"])
    stripe_sync.push_day(dt.date(2025, 3, 17), engine=eng)
    # starter all month: 2900 base, 3500 calls of which 1000 free = $25.00
    assert _stripe_lines(org) == {"base_fee": 2900, "api_calls": 2500}
    with db.connect() as cx:
        assert _total(cx, org, MARCH)[0] == 2900 + 2500
