"""dbt against the real stack: the Postgres snapshot agrees with billing.pricing to the cent,
bad input fails whole, and the ClickHouse rollups agree with Postgres.

Each hypothesis example is one random catalog (several plans, all three modes, several
currencies) with random usage, built with one full dbt run plus one incremental run for a
batch of late events: few dbt runs, many pricing cases.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections import defaultdict
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.pricing import aggregation as agg
from billing.pricing import catalog as pricing
from billing.pricing import reference

pytestmark = pytest.mark.integration

SNAPSHOT = "billing_snapshot"
DAY1 = dt.date(2025, 2, 3)
DAY2 = dt.date(2025, 2, 4)
PERIODS = (dt.date(2025, 1, 1), dt.date(2025, 2, 1))


# ---------------------------------------------------------------- helpers
@pytest.fixture
def fresh(stack, clean_db):
    from billing.platform import db

    with db.connect(autocommit=True) as cx:
        for month in PERIODS:
            cx.execute("SELECT billing.ensure_usage_partition(%s)", (month,))
    yield


def _insert_orgs(cx, orgs):
    cx.cursor().executemany(
        "INSERT INTO billing.organizations (org_id, name, email, plan, currency, created_at)"
        " VALUES (%s, %s, %s, %s, %s, '2020-01-01')",
        [(o, o, f"{o}@example.test", plan, cur) for o, plan, cur in orgs],
    )


def _insert_events(cx, events, prefix):
    """events: (org, metric, quantity, occurred_at, billable, source, arrival_day[, properties])."""
    from psycopg.types.json import Jsonb

    cx.cursor().executemany(
        "INSERT INTO billing.usage_events (event_id, org_id, metric, quantity, occurred_at,"
        " billable, source, arrival_day, properties, file_id, line_no)"
        " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,0,%s)",
        [
            (f"{prefix}-{i}", *e[:7], Jsonb(e[7]) if len(e) > 7 else None, i)
            for i, e in enumerate(events)
        ],
    )


def _analytics(sql: str) -> list[dict]:
    """Query chDB in a child process: this process must hold no chDB session while dbt runs."""
    out = subprocess.run(
        [sys.executable, "-m", "billing.cli", "sql", sql, "--format", "json"],
        capture_output=True,
        text=True,
        env=os.environ,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout, parse_float=Decimal)


def _snapshot(cx) -> list[tuple]:
    return cx.execute(
        f"SELECT invoice_id, total_cents, snapshot_hash FROM {SNAPSHOT}.fct_invoices ORDER BY 1"
    ).fetchall()


def _expected(catalog, orgs, batches, run_day, run_periods):
    """billing.pricing's answer: C(d) per org/metric/dimension key/day and each invoice's
    total (billing.pricing.reference, from the events as inserted, ids included)."""
    plan_of = {o: catalog.plan(p) for o, p, _ in orgs}
    events = defaultdict(list)
    for prefix, batch in batches:
        for i, (org, metric, qty, occurred, billable, *_rest) in enumerate(batch):
            if billable:
                props = _rest[2] if len(_rest) > 2 else None
                events[org].append(
                    (metric, agg.BillableEvent(f"{prefix}-{i}", occurred, qty, props))
                )
    periods = set(run_periods) | {
        e.day.replace(day=1) for found in events.values() for _, e in found
    }
    charges, totals = {}, {}
    for org, _plan, _cur in orgs:
        for period in periods:
            found = events.get(org, [])
            series = reference.period_charges(catalog, plan_of[org], found, period, run_day)
            for (metric, key), rows in series.items():
                for (day, c), (_, prev) in zip(rows, [(None, 0), *rows], strict=False):
                    charges[(org, metric, key, day)] = (c, c - prev)
            totals[f"inv_{org}_{period:%Y%m}"] = reference.period_total(
                catalog, plan_of[org], found, period, run_day
            )
    return charges, totals


def _diff(got: dict, want: dict) -> dict:
    """{key: (got, want)} where the two differ: an empty dict when they agree."""
    return {
        k: (got.get(k), want.get(k)) for k in got.keys() | want.keys() if got.get(k) != want.get(k)
    }


def _actual(cx):
    charges = {
        (o, m, k, d): (c, dc)
        for o, m, k, d, c, dc in cx.execute(
            f"SELECT org_id, metric, dimension_key, usage_date, cumulative_charge_cents,"
            f" daily_charge_cents FROM {SNAPSHOT}.fct_daily_charges"
        )
    }
    totals = dict(cx.execute(f"SELECT invoice_id, total_cents FROM {SNAPSHOT}.fct_invoices"))
    return charges, totals


# ---------------------------------------------------------------- strategies
_PRICE = st.decimals(min_value=0, max_value=3, places=5).map(str)
_FLAT = st.sampled_from([None, None, "0", "0.005", "7.50", "40"])
_CURRENCIES = st.sampled_from(["usd", "eur", "jpy"])
# One metric per aggregation, so every example mixes them all (docs/PRICING.md "Aggregations").
AGGREGATED = {
    "m_calls": {"unit": "call"},
    "m_events": {"unit": "event", "aggregation": "count"},
    "m_users": {"unit": "user", "aggregation": "unique_count", "property": "user_id"},
    "m_peak": {"unit": "seat", "aggregation": "max"},
    "m_seats": {"unit": "seat", "aggregation": "latest"},
    "m_gb": {"unit": "GB-hour", "aggregation": "time_weighted", "dimensions": ["region"]},
    "m_tokens": {"unit": "token", "dimensions": ["model", "kind"]},
    "m_runs": {
        "unit": "user",
        "aggregation": "unique_count",
        "property": "user_id",
        "dimensions": ["model"],
    },
}
MODELS = ["a", "b"]
KINDS = ["in", "out"]
REGIONS = ["eu", "us"]
METRICS = tuple(AGGREGATED)


@st.composite
def _metric_price(draw):
    mode = draw(st.sampled_from(pricing.MODES))
    # pricing model v2 (docs/PRICING.md): rounding and free units on the package modes, a
    # maximum spend on any mode (whole amounts, so every currency takes them)
    options = {}
    if mode in (pricing.PACKAGE, pricing.TIERED_PACKAGE):
        if rounding := draw(st.sampled_from([None, "up", "down", "down", "down"])):
            options["rounding"] = rounding
        if (free := draw(st.sampled_from([None, None, 0, "12.5", 50]))) is not None:
            options["free_units"] = free
    if max_spend := draw(st.sampled_from([None, None, None, "0", "25", "250"])):
        options["max_spend"] = max_spend
    if mode == pricing.PACKAGE:
        size = draw(st.one_of(st.integers(1, 500), st.decimals("0.5", "50", places=2).map(str)))
        return {"mode": mode, "package_size": size, "package_price": draw(_PRICE), **options}
    bounds = sorted(draw(st.sets(st.integers(1, 3000), min_size=0, max_size=3)))
    if mode == pricing.TIERED_PACKAGE:  # blocks per tier; a tier need not hold whole blocks
        block = st.one_of(st.integers(1, 400), st.decimals("0.5", "40", places=2).map(str))
        tiers = [
            {"up_to": b, "block_size": draw(block), "block_price": draw(_PRICE)}
            for b in [*bounds, None]
        ]
        return {"mode": mode, "tiers": tiers, **options}
    tiers = [{"up_to": b, "unit_price": draw(_PRICE)} for b in bounds]
    tiers.append({"up_to": None, "unit_price": draw(_PRICE)})
    for tier in tiers:  # a flat amount per tier on some (Stripe's tiers[].flat_amount)
        if flat := draw(_FLAT):
            tier["flat_amount"] = flat
    return {"mode": mode, "tiers": tiers, **options}


@st.composite
def _scenario(draw):
    plans = {}
    for i in range(draw(st.integers(2, 4))):
        currency = draw(_CURRENCIES)
        places = pricing.CURRENCIES[currency]
        fee = draw(st.decimals(0, 500, places=places))
        priced = draw(st.lists(st.sampled_from(METRICS), unique=True, max_size=6))
        metrics = {}
        for m in priced:
            dims = AGGREGATED[m].get("dimensions")
            if not dims or draw(st.booleans()):
                metrics[m] = draw(_metric_price())  # one price for every combination
                if not dims and "max_spend" not in metrics[m] and draw(st.booleans()):
                    # a minimum spend: a true-up line once the period is over
                    metrics[m]["min_spend"] = format(draw(st.decimals(0, 60, places=places)), "f")
                continue
            choices = {"model": MODELS, "kind": KINDS, "region": REGIONS}
            combos = draw(
                st.lists(
                    st.tuples(*(st.sampled_from(choices[d]) for d in dims)),
                    unique=True,
                    min_size=1,
                    max_size=2,
                )
            )
            metrics[m] = {
                "default": draw(_metric_price()),
                "values": [
                    {"match": dict(zip(dims, combo, strict=True)), **draw(_metric_price())}
                    for combo in combos
                ],
            }
        plans[f"p{i}"] = {"currency": currency, "base_fee": format(fee, "f"), "metrics": metrics}
        if draw(st.booleans()):  # a minimum commitment over the usage charges
            commitment = draw(st.decimals(0, 200, places=places))
            plans[f"p{i}"]["minimum_commitment"] = format(commitment, "f")
    catalog = pricing.parse_catalog({"metrics": AGGREGATED, "plans": plans}, "hypothesis")
    orgs = []
    for i, name in enumerate(sorted(plans) * 2):
        orgs.append((f"o{i}", name, catalog.plans[name].currency))
    qty = st.one_of(st.integers(0, 1500).map(Decimal), st.decimals(0, 800, places=3))
    # a few fixed moments make ties (latest and time_weighted order them by event_id)
    moment = st.one_of(st.sampled_from([0, 3_600, 43_200]), st.integers(0, 86_399))
    user = st.sampled_from(["u1", "u2", "u3", 7, None])
    dims = {
        "model": st.sampled_from([*MODELS, "c"]),
        "kind": st.sampled_from(KINDS),
        "region": st.sampled_from(REGIONS),
    }
    users = st.one_of(  # mostly every dimension, sometimes some or none of them
        st.fixed_dictionaries({"user_id": user, **dims}),
        st.fixed_dictionaries({"user_id": user, **dims}),
        st.fixed_dictionaries({"user_id": user}, optional=dims),
        st.none(),
        st.just({"other": "x"}),
    )

    def events(n, days, late: bool):
        out = []
        for _ in range(n):
            day = draw(st.sampled_from(days))
            occurred = dt.datetime.combine(day, dt.time(), dt.UTC) + dt.timedelta(
                seconds=draw(moment), microseconds=draw(st.sampled_from([0, 0, 1, 500_000]))
            )
            arrival = DAY2 if late else min(DAY1, day + dt.timedelta(days=draw(st.integers(0, 2))))
            out.append(
                (
                    draw(st.sampled_from(orgs))[0],
                    draw(st.sampled_from(METRICS)),
                    draw(qty),
                    occurred,
                    draw(st.integers(0, 3)) > 0,
                    draw(st.sampled_from(["api", "batch", None])),
                    arrival,
                    draw(users),
                )
            )
        return out

    all_days = [dt.date(2025, 1, 28) + dt.timedelta(days=k) for k in range(7)]
    first = events(draw(st.integers(10, 45)), all_days, late=False)
    late = events(draw(st.integers(1, 10)), all_days[:-1], late=True)
    return catalog, orgs, first, late


# ---------------------------------------------------------------- property test
@settings(
    max_examples=int(os.environ.get("BILLING_TRANSFORM_EXAMPLES", "2")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(_scenario())
def test_snapshot_matches_pricing_to_the_cent(fresh, scenario):
    from billing.platform import db
    from billing.transform import project as transform

    catalog, orgs, first, late = scenario
    with db.connect() as cx:
        cx.execute("TRUNCATE billing.organizations, billing.usage_events CASCADE")
        _insert_orgs(cx, orgs)
        _insert_events(cx, first, "a")
        cx.commit()
    transform.transform_day(
        DAY1, dt.date(2025, 1, 1), targets=["postgres"], full_refresh=True, catalog=catalog
    )
    with db.connect() as cx:
        charges, totals = _actual(cx)
        want_charges, want_totals = _expected(
            catalog, orgs, [("a", first)], DAY1, [DAY1.replace(day=1)]
        )
        assert _diff(charges, want_charges) == {}
        assert _diff(totals, want_totals) == {}
        _insert_events(cx, late, "b")
        cx.commit()
    transform.transform_day(DAY2, targets=["postgres"], catalog=catalog)
    with db.connect() as cx:
        charges, totals = _actual(cx)
        want_charges, want_totals = _expected(
            catalog, orgs, [("a", first), ("b", late)], DAY2, [DAY1.replace(day=1)]
        )
        assert _diff(charges, want_charges) == {}
        assert _diff(totals, want_totals) == {}
        lines = dict(
            cx.execute(
                f"SELECT invoice_id, sum(amount_cents)::bigint FROM {SNAPSHOT}.fct_invoice_lines"
                " GROUP BY 1"
            )
        )
        assert lines == totals


# ---------------------------------------------------------------- examples
def _seed_demo(cx):
    _insert_orgs(
        cx, [("acme", "starter", "usd"), ("euro", "enterprise", "eur"), ("jp", "tokyo", "jpy")]
    )
    _insert_events(
        cx,
        [
            (
                "acme",
                "api_calls",
                Decimal(150_000),
                dt.datetime(2025, 2, 1, 10, tzinfo=dt.UTC),
                True,
                "api",
                DAY1,
            ),
            (
                "acme",
                "storage_gb",
                Decimal("150.5"),
                dt.datetime(2025, 2, 2, 1, tzinfo=dt.UTC),
                True,
                "st",
                DAY1,
            ),
            (
                "euro",
                "emails_sent",
                Decimal(7),
                dt.datetime(2025, 2, 2, 23, 59, tzinfo=dt.UTC),
                True,
                "mail",
                DAY1,
            ),
            (
                "jp",
                "api_calls",
                Decimal(100_001),
                dt.datetime(2025, 2, 3, 3, tzinfo=dt.UTC),
                True,
                "api",
                DAY1,
            ),
            (
                "jp",
                "api_calls",
                Decimal(5),
                dt.datetime(2025, 2, 3, 4, tzinfo=dt.UTC),
                False,
                "api",
                DAY1,
            ),
        ],
        "demo",
    )
    cx.commit()


def test_a_dimensioned_metric_is_a_line_per_combination_priced_listed_or_default(fresh):
    """ai_tokens priced per (model, token_type): a listed combination at its own tiers, any
    other (a missing property included) at the default, each its own line; a latest-value
    metric that falls nets its credit on its line."""
    from billing.invoices.snapshot import get_invoice
    from billing.platform import db
    from billing.transform import project as transform

    catalog = pricing.parse_catalog(
        {
            "metrics": {
                "tok": {"unit": "token", "dimensions": ["model", "token_type"]},
                "seats": {"unit": "seat", "aggregation": "latest"},
            },
            "plans": {
                "p": {
                    "currency": "usd",
                    "base_fee": "10.00",
                    "metrics": {
                        "tok": {
                            "default": {"mode": "graduated", "tiers": [
                                {"up_to": None, "unit_price": "0.01"}]},
                            "values": [{
                                "match": {"model": "large", "token_type": "input"},
                                "mode": "graduated",
                                "tiers": [
                                    {"up_to": 100, "unit_price": "0.10", "flat_amount": "1.00"},
                                    {"up_to": None, "unit_price": "0.05"},
                                ],
                            }],
                        },
                        "seats": {"mode": "graduated", "tiers": [
                            {"up_to": None, "unit_price": "4.00"}]},
                    },
                }
            },
        },
        "test",
    )  # fmt: skip
    at = dt.datetime(2025, 2, 1, 9, tzinfo=dt.UTC)
    large_in = {"model": "large", "token_type": "input"}
    with db.connect() as cx:
        _insert_orgs(cx, [("acme", "p", "usd")])
        _insert_events(
            cx,
            [
                ("acme", "tok", Decimal(150), at, True, "ai", DAY1, large_in),
                ("acme", "tok", Decimal(30), at, True, "ai", DAY1, {"model": "small", "token_type": "input"}),
                ("acme", "tok", Decimal(20), at, True, "ai", DAY1, {"model": "small"}),
                ("acme", "tok", Decimal(5), at, False, "ai", DAY1, large_in),  # not billable
                ("acme", "seats", Decimal(5), at, True, "app", DAY1),
                ("acme", "seats", Decimal(3), at + dt.timedelta(days=1), True, "app", DAY1),
            ],
            "dim",
        )  # fmt: skip
        cx.commit()
    transform.transform_day(DAY1, targets=["postgres"], full_refresh=True, catalog=catalog)
    with db.connect() as cx:
        lines = cx.execute(
            f"""SELECT invoice_line_id, metric, dimension_key, dimensions, quantity, amount_cents,
                       credited_cents, credited_days
                  FROM {SNAPSHOT}.fct_invoice_lines ORDER BY line_number"""
        ).fetchall()
        inv = get_invoice(cx, "inv_acme_202502")
    assert [(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for r in lines] == [
        ("inv_acme_202502.base", None, "", {}, 1, 1000, 0, 0),
        # latest: 5 seats then 3 -> $12.00, with the $8.00 drop credited on one day
        ("inv_acme_202502.usage.seats", "seats", "", {}, 3, 1200, -800, 1),
        # listed: 100 x 0.10 + 1.00 flat + 50 x 0.05 = 13.50
        ('inv_acme_202502.usage.tok.["large", "input"]', "tok", '["large", "input"]',
         {"model": "large", "token_type": "input"}, 150, 1350, 0, 0),
        # the default: 0.01 a token, a missing token_type included
        ('inv_acme_202502.usage.tok.["small", "input"]', "tok", '["small", "input"]',
         {"model": "small", "token_type": "input"}, 30, 30, 0, 0),
        ('inv_acme_202502.usage.tok.["small", null]', "tok", '["small", null]',
         {"model": "small", "token_type": None}, 20, 20, 0, 0),
    ]  # fmt: skip
    assert inv.total_cents == 1000 + 1200 + 1350 + 30 + 20
    assert [x.charge for x in inv.lines] == [
        "base_fee",
        "seats",
        'tok ["large", "input"]',
        'tok ["small", "input"]',
        'tok ["small", null]',
    ]


def test_invoices_read_through_invoices_module_and_cli(fresh):
    from billing import invoices
    from billing.platform import db
    from billing.transform import project as transform

    with db.connect() as cx:
        _seed_demo(cx)
    transform.transform_day(DAY1, dt.date(2025, 1, 1), targets=["postgres"], full_refresh=True)
    with db.connect() as cx:
        got = {i.invoice_id: i for i in invoices.list_invoices(cx, "2025-02")}
        acme = invoices.get_invoice(cx, "inv_acme_202502")
    assert set(got) == {"inv_acme_202502", "inv_euro_202502", "inv_jp_202502"}
    # starter: 2900 base + 50k calls at 0.0002 = $10 + 2 packages of storage = $3
    assert (acme.base_fee_cents, acme.usage_cents, acme.total_cents) == (2900, 1300, 4200)
    assert acme.status == "draft" and len(acme.snapshot_hash) == 32
    assert got["inv_jp_202502"].total_cents == 3000  # 1 call over 100k at ¥0.03 rounds to 0
    assert got["inv_euro_202502"].total_cents == 49901  # 7 x 0.00085 = 0.00595 -> 1 cent
    calls = next(x for x in acme.usage_lines if x.metric == "api_calls")
    assert calls.tiers[1]["amount"] == Decimal("10.0000") and calls.quantity == 150_000
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "billing.cli",
            "invoices",
            "list",
            "--period",
            "2025-02",
            "--org",
            "acme",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    [row] = json.loads(out.stdout)
    assert row["total_cents"] == 4200 and row["status"] == "draft"
    assert {x["metric"]: x["amount_cents"] for x in row["lines"]} == {
        "api_calls": 1000,
        "storage_gb": 300,
    }

    # For people: money with its currency symbol and exponent, aligned columns.
    def cli(*argv: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-m", "billing.cli", *argv], capture_output=True, text=True, check=True
        )
        return done.stdout.splitlines()

    table = cli("invoices", "list", "--period", "2025-02", "--format", "table")
    assert table[0].split() == [
        "invoice_id",
        "org_id",
        "period",
        "status",
        "base",
        "fee",
        "usage",
        "total",
    ]
    assert [r.split()[-3:] for r in table[2:]] == [
        ["$29.00", "$13.00", "$42.00"],
        ["€499.00", "€0.01", "€499.01"],
        ["¥3,000", "¥0", "¥3,000"],
    ]
    assert len({len(r) for r in table}) == 1  # every row as wide as the header: aligned
    shown = cli("invoices", "show", "inv_jp_202502")
    assert shown[0] == "inv_jp_202502  jp  2025-02 (tokyo, JPY)"
    lines = [r.split() for r in shown[5:]]
    assert lines == [["base", "fee", "¥3,000"], ["api_calls", "100001", "¥0"], ["total", "¥3,000"]]


@pytest.mark.parametrize("problem", ["catalog", "unknown_plan", "currency"])
def test_bad_input_fails_clearly_and_writes_nothing(fresh, problem, tmp_path, monkeypatch):
    from billing.platform import db
    from billing.platform.errors import ConfigError
    from billing.transform import project as transform

    with db.connect() as cx:
        _seed_demo(cx)
    transform.transform_day(DAY1, dt.date(2025, 1, 1), targets=["postgres"], full_refresh=True)
    with db.connect() as cx:
        before = _snapshot(cx)
        _insert_events(
            cx,
            [
                (
                    "acme",
                    "api_calls",
                    Decimal(9),
                    dt.datetime(2025, 2, 4, tzinfo=dt.UTC),
                    True,
                    "api",
                    DAY2,
                )
            ],
            "x",
        )
        if problem == "unknown_plan":
            _insert_orgs(cx, [("ghost", "platinum", "usd")])
        if problem == "currency":
            _insert_orgs(cx, [("swiss", "starter", "chf")])
        cx.commit()
    if problem == "catalog":
        bad = tmp_path / "catalog.yaml"
        bad.write_text("metrics: {x: {unit: u}}\nplans: {p: {currency: usd, base_fee: 29}}\n")
        monkeypatch.setenv("BILLING_CATALOG", str(bad))
    expected = {
        "catalog": "money must be a quoted decimal",
        "unknown_plan": "unknown plan 'platinum'",
        "currency": "currency 'chf' does not match plan 'starter'",
    }[problem]
    with pytest.raises(ConfigError, match=expected):
        transform.transform_day(DAY2, targets=["postgres"])
    if problem != "catalog":
        # The dbt gate alone (as run by Cosmos, without the Python pre-check) also stops it.
        name = (
            "org_plan_is_in_catalog" if problem == "unknown_plan" else "org_currency_matches_plan"
        )
        with pytest.raises(transform.TransformError, match=name):
            transform.run_dbt("postgres", "build", vars=transform.run_vars(DAY2))
    with db.connect() as cx:
        assert _snapshot(cx) == before


def test_rollups_match_postgres_and_late_event_reaggregates_only_its_day(fresh):
    from billing.platform import db
    from billing.transform import project as transform

    with db.connect() as cx:
        _seed_demo(cx)
    transform.transform_day(DAY1, dt.date(2025, 1, 1), full_refresh=True)
    with db.connect() as cx:
        # Tamper with an old day behind dbt's back: a correct incremental run leaves it alone.
        cx.execute("UPDATE billing.usage_events SET quantity = 1 WHERE event_id = 'demo-1'")
        _insert_events(
            cx,
            [
                (
                    "acme",
                    "api_calls",
                    Decimal(25),
                    dt.datetime(2025, 2, 1, 23, tzinfo=dt.UTC),
                    True,
                    "api",
                    DAY2,
                ),
                (
                    "jp",
                    "api_calls",
                    Decimal(3),
                    dt.datetime(2025, 2, 4, 2, tzinfo=dt.UTC),
                    True,
                    "api",
                    DAY2,
                ),
            ],
            "late",
        )
        cx.commit()
    transform.transform_day(DAY2)

    daily = {
        (r["org_id"], r["metric"], r["usage_date"]): Decimal(r["billable_quantity"])
        for r in _analytics(
            "SELECT org_id, metric, toString(usage_date) AS usage_date, sum(billable_quantity)"
            " AS billable_quantity FROM analytics.fct_usage_daily GROUP BY 1, 2, 3"
        )
    }
    with db.connect() as cx:
        pg_daily = {
            (o, m, d.isoformat()): q
            for o, m, d, q in cx.execute(
                f"SELECT org_id, metric, usage_date, quantity FROM {SNAPSHOT}.fct_daily_charges"
            )
        }
    assert daily == pg_daily
    assert (
        daily[("acme", "api_calls", "2025-02-01")] == 150_025
    )  # late event, its day re-aggregated
    assert daily[("acme", "storage_gb", "2025-02-02")] == Decimal("150.5")  # untouched day kept
    assert daily[("jp", "api_calls", "2025-02-04")] == 3
    monthly = _analytics(
        "SELECT org_id, metric, sum(billable_quantity) AS q FROM analytics.fct_usage_monthly"
        " WHERE period_start = '2025-02-01' GROUP BY 1, 2 ORDER BY 1, 2"
    )
    assert {(r["org_id"], r["metric"]): Decimal(r["q"]) for r in monthly} == {
        ("acme", "api_calls"): 150_025,
        ("acme", "storage_gb"): Decimal("150.5"),
        ("euro", "emails_sent"): 7,
        ("jp", "api_calls"): 100_004,
    }
    hourly = _analytics(
        "SELECT count() AS n FROM analytics.fct_usage_hourly WHERE usage_date = '2025-02-03'"
    )
    assert hourly == [{"n": 2}]  # jp: 03:00 and 04:00 (billable and not) in separate hours


def test_rollups_carry_dimension_keys_and_charges_equal_to_postgres(fresh):
    """The shipped catalog's growth plan prices ai_tokens per (model, token_type): ClickHouse
    keys the usage rollups byte for byte as Postgres keys fct_daily_charges (an escaped
    value, a number, a missing property), copies every published invoice line to the cent,
    and a late event re-keys its day and re-copies its period's charges."""
    from billing.platform import db
    from billing.transform import project as transform

    def at(day, hour=9):
        return dt.datetime(2025, 2, day, hour, tzinfo=dt.UTC)

    def tokens(org, qty, when, props, billable=True, arrival=DAY1):
        return (org, "ai_tokens", Decimal(qty), when, billable, "ai", arrival, props)

    large_in = {"model": "large", "token_type": "input"}
    odd = {"model": 'acme/llm "v2"\\', "token_type": "input"}  # quote, backslash, slash
    with db.connect() as cx:
        _insert_orgs(cx, [("acme", "growth", "usd"), ("bolt", "starter", "usd")])
        _insert_events(
            cx,
            [
                tokens("acme", 1_500_000, at(1), large_in),
                tokens("acme", 200_000, at(2), {"model": "large", "token_type": "output"}),
                tokens("acme", 333_333, at(2), {"model": "small", "token_type": "input"}),
                tokens("acme", 250_000, at(1), {"model": "small"}),  # no token_type: null
                tokens("acme", 40_000, at(3), {"model": 7.5, "token_type": "output"}),  # 7.50
                tokens("acme", 1_000, at(3), odd),
                tokens("acme", 999, at(3), large_in, billable=False),
                tokens("bolt", 5_000, at(2), large_in),  # starter: free
                ("acme", "active_users", Decimal(1), at(1), True, "app", DAY1, {"user_id": "u1"}),
                ("acme", "active_users", Decimal(1), at(2), True, "app", DAY1, {"user_id": "u2"}),
                ("acme", "api_calls", Decimal(1_000), at(2), True, "api", DAY1),
            ],
            "dims",
        )  # fmt: skip
        # jsonb keeps a number's scale: its ->> text is "7.50" (Jsonb() would send 7.5)
        cx.execute(
            "UPDATE billing.usage_events SET properties = %s::jsonb WHERE event_id = 'dims-4'",
            ('{"model": 7.50, "token_type": "output"}',),
        )
        cx.commit()
    transform.transform_day(DAY1, dt.date(2025, 1, 1), full_refresh=True)
    with db.connect() as cx:
        _insert_events(
            cx,
            [
                tokens("acme", 100, at(1, 23), {"model": "small"}, arrival=DAY2),  # late
                tokens("acme", 10, dt.datetime(2025, 1, 31, 12, tzinfo=dt.UTC), large_in,
                       arrival=DAY2),  # late, into January
            ],
            "late",
        )  # fmt: skip
        cx.commit()
    transform.transform_day(DAY2)

    # Usage: ClickHouse's daily billable quantity per dimension key is Postgres' daily
    # quantity (sum metrics), with the same keys.
    daily = {
        (r["org_id"], r["metric"], r["dimension_key"], r["usage_date"]): Decimal(r["q"])
        for r in _analytics(
            "SELECT org_id, metric, dimension_key, toString(usage_date) AS usage_date,"
            " sum(billable_quantity) AS q FROM analytics.fct_usage_daily"
            " WHERE metric IN ('ai_tokens', 'api_calls') AND billable_event_count > 0"
            " GROUP BY 1, 2, 3, 4"
        )
    }
    with db.connect() as cx:
        pg_daily = {
            (o, m, k, d.isoformat()): q
            for o, m, k, d, q in cx.execute(
                f"SELECT org_id, metric, dimension_key, usage_date, quantity"
                f" FROM {SNAPSHOT}.fct_daily_charges WHERE metric IN ('ai_tokens', 'api_calls')"
            )
        }
        pg_lines = {
            r[0]: r[1:]
            for r in cx.execute(
                f"SELECT invoice_line_id, org_id, period_start::text, line_type,"
                f" coalesce(metric, ''), dimension_key, dimensions, quantity, amount_cents,"
                f" currency FROM {SNAPSHOT}.fct_invoice_lines"
            )
        }
    assert _diff(daily, pg_daily) == {}
    keys = {k for (_o, m, k, _d) in daily if m == "ai_tokens"}
    assert keys == {
        '["large", "input"]',
        '["large", "output"]',
        '["small", "input"]',
        '["small", null]',
        '["7.50", "output"]',
        '["acme/llm \\"v2\\"\\\\", "input"]',
    }
    assert daily[("acme", "ai_tokens", '["small", null]', "2025-02-01")] == 250_100  # late
    assert daily[("acme", "ai_tokens", '["large", "input"]', "2025-01-31")] == 10
    assert daily[("acme", "api_calls", "", "2025-02-02")] == 1_000

    # Charges: every published line, to the cent, with its key and values.
    charges = {
        r["invoice_line_id"]: (
            r["org_id"],
            r["period_start"],
            r["line_type"],
            r["metric"],
            r["dimension_key"],
            r["dimensions"],
            Decimal(r["quantity"]),
            r["amount_cents"],
            r["currency"],
        )
        for r in _analytics(
            "SELECT invoice_line_id, org_id, toString(period_start) AS period_start,"
            " line_type, metric, dimension_key, dimensions, quantity, amount_cents, currency"
            " FROM analytics.fct_charges_monthly"
        )
    }
    assert _diff(charges, pg_lines) == {}
    feb = {
        (o, m, k): (q, c)
        for o, p, _t, m, k, _d, q, c, _cur in charges.values()
        if p == "2025-02-01" and m == "ai_tokens"
    }
    assert feb[("acme", "ai_tokens", '["large", "input"]')] == (1_500_000, 700)  # listed
    assert feb[("acme", "ai_tokens", '["large", "output"]')] == (200_000, 300)
    assert feb[("acme", "ai_tokens", '["small", null]')] == (250_100, 50)  # the default
    assert feb[("bolt", "ai_tokens", '["large", "input"]')] == (5_000, 0)
    jan = [c for c in charges.values() if c[1] == "2025-01-01" and c[3] == "ai_tokens"]
    assert [(c[0], c[4], c[6]) for c in jan] == [("acme", '["large", "input"]', 10)]

    # The guide's one query: usage and charge per org, metric and model in the month.
    rows = _analytics(
        "SELECT u.org_id, u.metric, u.dimensions['model'] AS model,"
        " sum(u.billable_quantity) AS usage, sum(c.amount_cents) AS charge_cents"
        " FROM analytics.fct_usage_monthly AS u"
        " LEFT JOIN analytics.fct_charges_monthly AS c"
        " ON c.org_id = u.org_id AND c.metric = u.metric"
        " AND c.dimension_key = u.dimension_key AND c.period_start = u.period_start"
        " AND c.line_type = 'usage'"
        " WHERE u.period_start = '2025-02-01' AND u.org_id = 'acme' AND u.metric = 'ai_tokens'"
        " GROUP BY 1, 2, 3 ORDER BY 3"
    )
    assert [(r["model"], Decimal(r["usage"]), r["charge_cents"]) for r in rows] == [
        ("7.50", 40_000, 8),
        ('acme/llm "v2"\\', 1_000, 0),
        ("large", 1_700_000, 1_000),
        ("small", 583_433, 117),
    ]


def test_clickhouse_run_writes_no_postgres_password(fresh, stack):
    """The rollups read Postgres through a named collection: after a real full and an
    incremental clickhouse run, no file dbt wrote (compiled SQL, manifest.json,
    run_results.json, logs) nor the chDB folder holds the Postgres password."""
    from billing.platform import connections as conns
    from billing.platform import db, settings
    from billing.transform import project as transform

    password = conns.get(conns.POSTGRES).password
    assert len(password) >= 16
    assert "BILLING_DBT_PG_PASSWORD" not in transform.dbt_env("clickhouse")
    with db.connect() as cx:
        _seed_demo(cx)
    for full_refresh in (True, False):  # the incremental run also reads the dates to redo
        transform.run_dbt(
            "clickhouse",
            "build",
            vars=transform.run_vars(DAY1, dt.date(2025, 1, 1)),
            full_refresh=full_refresh,
        )
    with db.connect() as cx:
        [(expected,)] = cx.execute(
            """SELECT count(DISTINCT (org_id, metric, source, (occurred_at AT TIME ZONE 'UTC')::date))
                 FROM billing.usage_events"""
        ).fetchall()
    days = _analytics("SELECT count() AS n FROM analytics.fct_usage_daily")
    assert days == [{"n": expected}] and expected == 4  # the named collection reached Postgres

    target = transform.target_path("clickhouse")
    assert target.stat().st_mode & 0o777 == 0o700
    roots = [settings.dbt_target_dir(), stack.clickhouse_path]
    files = [f for root in roots for f in root.rglob("*") if f.is_file()]
    assert any(f.name == "run_results.json" for f in files)
    assert any("stg_pg_billing__usage_events" in f.read_text(errors="ignore") for f in files)
    leaking = [str(f) for f in files if password.encode() in f.read_bytes()]
    assert leaking == []


def test_sql_rejects_writes(stack):
    out = subprocess.run(
        [sys.executable, "-m", "billing.cli", "sql", "DROP DATABASE analytics"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "read-only" in out.stderr


def test_cosmos_task_groups_render_from_manifest(stack):
    """What the nightly DAG wires in: both groups, rendered without running dbt."""
    from airflow.sdk import DAG

    from billing.orchestration import CLICKHOUSE_POOL
    from billing.transform import project as transform

    with DAG(
        "render_check", schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    ) as dag:
        snapshot = transform.dbt_task_group("postgres")
        rollups = transform.dbt_task_group("clickhouse")
        snapshot >> rollups
    ids = set(dag.task_ids)

    def task_for(group: str, model: str):
        # Task ids depend on the Cosmos test behaviour (`<m>.run` or `<m>_model_build`).
        [tid] = [
            i
            for i in ids
            if i.startswith(f"{group}.{model}") and "test" not in i[len(group) + len(model) + 1 :]
        ]
        return dag.get_task(tid)

    for model in (
        "int_subscription_segments",
        "fct_daily_charges",
        "fct_invoice_lines",
        "fct_invoices",
    ):
        assert task_for("dbt_snapshot", model)
    hourly = task_for("dbt_rollups", "fct_usage_hourly")
    assert task_for("dbt_rollups", "fct_usage_monthly")
    assert hourly.pool == CLICKHOUSE_POOL
    assert hourly.vars["day"] == "{{ data_interval_start.strftime('%Y-%m-%d') }}"
    assert not any(i.startswith("dbt_snapshot") and "usage_hourly" in i for i in ids)


def test_every_column_is_documented_and_persisted_as_a_comment(fresh):
    """Analysts read column meanings where they query: ClickHouse and Postgres comments,
    written by persist_docs from the dbt yml; every rollup column has one."""
    from billing.platform import db
    from billing.transform import project as transform

    with db.connect() as cx:
        _seed_demo(cx)
    transform.transform_day(DAY1, dt.date(2025, 1, 1), full_refresh=True)
    rollups = _analytics(
        "SELECT table, name, comment FROM system.columns"
        " WHERE database = 'analytics' AND table LIKE 'fct_%' ORDER BY table, position"
    )
    assert {r["table"] for r in rollups} == {
        "fct_usage_hourly",
        "fct_usage_daily",
        "fct_usage_monthly",
        "fct_charges_monthly",
    }
    assert [(r["table"], r["name"]) for r in rollups if not r["comment"].strip()] == []
    manifest = json.loads(transform.manifest_path("clickhouse").read_text())
    for table in ("fct_usage_hourly", "fct_charges_monthly"):
        documented = manifest["nodes"][f"model.billing.{table}"]["columns"]
        got = {r["name"]: r["comment"] for r in rollups if r["table"] == table}
        assert got == {name: c["description"] for name, c in documented.items()}, table

    manifest = json.loads(transform.manifest_path("postgres").read_text())
    with db.connect() as cx:
        for model in ("fct_invoices", "fct_invoice_lines", "fct_daily_charges"):
            documented = manifest["nodes"][f"model.billing.{model}"]["columns"]
            comments = dict(
                cx.execute(
                    """SELECT a.attname, col_description(a.attrelid, a.attnum)
                         FROM pg_attribute a
                        WHERE a.attrelid = format('billing_snapshot.%%I', %s::text)::regclass
                          AND a.attnum > 0 AND NOT a.attisdropped""",
                    (model,),
                ).fetchall()
            )
            assert {n: comments[n] for n in documented} == {
                n: c["description"] for n, c in documented.items()
            }, model
