"""Stripe sync end to end: real Postgres, Redis and the Stripe emulator, behind a fault proxy.

No mocks on the main path: the SDK talks HTTP to the emulator through ``tests/faultproxy.py``.
Backoff sleeps are recorded instead of slept (the schedule is asserted from the record).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter

import pytest
from faultproxy import FaultProxy
from stripe_support import (
    PERIOD,
    customers,
    direct_client,
    emulator_admin,
    emulator_url,
    env_for_tests,
    outbox_rows,
    point_stripe_at,
    random_snapshot,
    reset_state,
    stripe_items,
)

from billing import stripe_sync
from billing.stripe_sync import Engine, parking

pytestmark = pytest.mark.integration

DAYS = [PERIOD.replace(day=d) for d in range(1, 5)]


@pytest.fixture
def env(stack, clean_db, monkeypatch):
    env_for_tests(monkeypatch)
    reset_state()
    yield monkeypatch


@pytest.fixture
def proxy(env):
    p = FaultProxy(emulator_url(), seed=7).start()
    point_stripe_at(env, p.url)
    yield p
    p.stop()


def _engine(delays: list[float]) -> Engine:
    return Engine(sleep=delays.append)


def _assert_stripe_matches(snap, through: dt.date) -> None:
    client = direct_client()
    cus = customers()
    sent = {
        r["idempotency_key"]: r for r in outbox_rows() if r["kind"] in ("usage_item", "base_fee")
    }
    assert all(r["status"] == "sent" for r in sent.values())
    for org in snap.orgs:
        items = stripe_items(client, cus[org])
        keys = Counter(ii["metadata"]["idempotency_key"] for ii in items)
        assert all(n == 1 for n in keys.values()), f"duplicate charge for {org}: {keys}"
        assert set(keys) == {k for k, r in sent.items() if r["org_id"] == org}
        assert sum(ii["amount"] for ii in items) == snap.expected_total(org, through), org
        assert {ii["id"] for ii in items} == {
            r["stripe_object_id"] for r in sent.values() if r["org_id"] == org
        }


def test_faults_exactly_once_and_totals(proxy):
    snap = random_snapshot(n_orgs=6, n_days=4, seed=3)
    snap.save()

    def faults(on: bool) -> None:
        proxy.rates = (
            {"500": 0.08, "429": 0.05, "409": 0.04, "reset": 0.05, "timeout": 0.02, "lost": 0.1}
            if on
            else {}
        )
        proxy.sticky_rate = 0.06 if on else 0.0

    faults(on=True)
    proxy.forced = ["timeout", "lost", "reset", "500", "429", "409"]
    aliases = {org: f"org{i}" for i, org in enumerate(snap.orgs)}

    def stable(text: str) -> str:  # random org ids -> stable names: same faults every run
        for org, alias in aliases.items():
            text = text.replace(org, alias)
        return text

    proxy.normalize = stable
    delays: list[float] = []
    eng = _engine(delays)
    summaries = [
        stripe_sync.push_day(DAYS[0], engine=eng),
        stripe_sync.push_day(DAYS[1], engine=eng),
    ]
    # Late events for day 1 arrive with day 3: C_now(day 1..4) all move up; past items stay.
    late_org = next(iter(snap.orgs))
    for day in DAYS:
        snap.set(late_org, "storage_gb", day, snap.c_now(late_org, "storage_gb", day) + 777)
    snap.save()
    summaries += [stripe_sync.push_day(d, engine=eng) for d in DAYS[2:]]
    assert all(s["status"] in ("ok", "parked") for s in summaries)
    parked_before = stripe_sync.list_parked()
    assert parked_before, "the seed should park some writes"
    assert all(
        r["status"] == "parked"
        for r in outbox_rows()
        if r["idempotency_key"] in {p["idempotency_key"] for p in parked_before}
    )
    assert set(proxy.injected) >= {"500", "429", "409", "reset", "timeout", "lost", "sticky"}, (
        proxy.injected
    )

    # The outage is over: on-call's retry must then send every parked write. (Under the
    # random faults a write can park again: each finalize attempt is four requests, and
    # all six attempts of one failed in CI. Retrying is then on-call's job again, which a
    # deterministic test cannot wait for.)
    faults(on=False)
    result = stripe_sync.retry_parked(all=True, engine=eng)
    assert result["parked"] == 0, result
    assert stripe_sync.list_parked() == []
    assert {r["status"] for r in outbox_rows()} == {"sent"}
    amounts = [r["amount_cents"] for r in outbox_rows() if r["kind"] == "usage_item"]
    assert 0 not in amounts and min(amounts) < 0  # zero never pushed; volume drop pushed negative
    _assert_stripe_matches(snap, DAYS[-1])
    # The late org's day-4 item absorbed the late events; its day-1 item is unchanged.
    late_items = {
        r["day"]: r["amount_cents"]
        for r in outbox_rows()
        if r["org_id"] == late_org and r["metric"] == "storage_gb"
    }
    assert sum(late_items.values()) == snap.c_now(late_org, "storage_gb", DAYS[-1])

    # Re-running the same days pushes nothing new and sends nothing.
    forwarded = proxy.forwarded
    for day in DAYS:
        again = stripe_sync.push_day(day, engine=eng)
        assert again["planned"] == 0 and again["sent"] == 0, again
    assert proxy.forwarded == forwarded

    # Month end under faults again: one finalized invoice per org whose amount is the
    # snapshot total, once on-call retried what parked (faults off, as above).
    faults(on=True)
    closed = stripe_sync.close_period(PERIOD, engine=eng)
    faults(on=False)
    if closed["parked"]:
        assert stripe_sync.retry_parked(all=True, engine=eng)["parked"] == 0
    client = direct_client()
    with_invoice = stripe_sync.close_period(PERIOD, engine=eng)["invoices"]
    assert set(with_invoice) == set(snap.orgs)
    for org, invoice_id in with_invoice.items():
        inv = client.v1.invoices.retrieve(invoice_id)
        assert inv["status"] == "open"
        assert inv["amount_due"] == snap.expected_total(org, DAYS[-1])
        assert len(client.v1.invoices.list(params={"customer": customers()[org]})["data"]) == 1
    counters = stripe_sync.counters()
    assert counters["retries"] > 0 and counters["errors_by_class"]


def test_backoff_schedule_is_exact_then_parks(proxy, env):
    env.setenv("BILLING_STRIPE_CONCURRENCY", "1")
    snap = random_snapshot(n_orgs=1, n_days=1, seed=1)
    snap.save()
    proxy.sticky_rate = 1.0  # every write answers 503
    delays: list[float] = []
    summary = stripe_sync.push_day(DAYS[0], engine=_engine(delays))
    assert delays == [1, 2, 4, 8, 16]
    assert summary["parked"] == 1 and summary["blocked"] >= 1  # customer parked, items wait
    (row,) = [r for r in outbox_rows() if r["kind"] == "customer"]
    assert (row["status"], row["attempts"], row["retries"]) == ("parked", 6, 5)
    assert row["error_counts"] == {"server": 6}
    parked = stripe_sync.show_parked(row["idempotency_key"])
    assert (
        parked["redis"]["error_class"] == "server"
        and "sticky fault" in parked["redis"]["last_error"]
    )
    assert parked["redis"]["payload"]["metadata"]["org_id"] == row["org_id"]


def test_parked_push_survives_a_redis_loss(proxy, env, capsys):
    """The outbox is the truth for parked writes: after Redis loses everything (FLUSHALL on
    the real server) the CLI list, the Billing page and the metric still show the parked
    push, the Redis copy is written back, and a retry sends it to Stripe exactly once."""
    from prometheus_client import CollectorRegistry

    from billing import cli
    from billing.observability import export as metrics_export
    from billing.web import page as billing_page

    env.setenv("BILLING_STRIPE_CONCURRENCY", "1")
    snap = random_snapshot(n_orgs=1, n_days=1, seed=1)
    snap.save()
    (org,) = snap.orgs
    proxy.sticky_rate = 1.0  # every write answers 503: the customer is parked, items wait
    stripe_sync.push_day(DAYS[0], engine=_engine([]))
    (row,) = [r for r in outbox_rows() if r["status"] == "parked"]
    key = row["idempotency_key"]
    assert row["kind"] == "customer" and proxy.forwarded_paths["POST /v1/customers"] == 0
    r = parking.client()
    assert set(r.hkeys(parking.PARKED)) == {key}

    def redis_loses_everything() -> None:
        assert r.flushall() is True
        assert r.hlen(parking.PARKED) == 0

    def depth() -> float | None:
        registry = CollectorRegistry()
        registry.register(metrics_export.DurableCollector(airflow=False))
        return registry.get_sample_value("billing_stripe_parked_queue_depth")

    redis_loses_everything()
    listed = stripe_sync.list_parked()
    assert [(p["idempotency_key"], p["error_class"], p["attempts"]) for p in listed] == [
        (key, "server", 6)
    ]
    assert "sticky fault" in listed[0]["last_error"]
    assert set(r.hkeys(parking.PARKED)) == {key}  # the copy is rebuilt from the outbox
    assert parking.show(r, key)["payload"]["metadata"]["org_id"] == org

    redis_loses_everything()
    assert cli.main(["parked", "list"]) == 0
    out = capsys.readouterr().out
    assert key in out and out.rstrip().endswith("1 parked write(s)")

    redis_loses_everything()
    page = billing_page.parked()
    assert page["error"] is None
    assert [(p["idempotency_key"], p["error_class"]) for p in page["items"]] == [(key, "server")]

    redis_loses_everything()
    assert depth() == 1

    redis_loses_everything()
    assert stripe_sync.show_parked(key)["outbox"]["status"] == "parked"
    proxy.sticky_rate = 0.0  # Stripe is back
    before = Counter(proxy.forwarded_paths)
    result = stripe_sync.retry_parked([key], engine=_engine([]))
    assert (result["requeued"], result["parked"], result["unknown"]) == (1, 0, [])
    assert (Counter(proxy.forwarded_paths) - before)["POST /v1/customers"] == 1
    assert {r["status"] for r in outbox_rows()} == {"sent"}  # the blocked items went too
    email = f"billing+{org}@example.test"
    in_stripe = direct_client().v1.customers.list(params={"email": email})["data"]
    assert [c["id"] for c in in_stripe] == [customers()[org]]
    assert stripe_sync.list_parked() == [] and r.hlen(parking.PARKED) == 0
    assert depth() == 0
    _assert_stripe_matches(snap, DAYS[0])


def test_retry_after_is_honoured_when_longer(proxy, env):
    env.setenv("BILLING_STRIPE_CONCURRENCY", "1")
    snap = random_snapshot(n_orgs=1, n_days=1, seed=1)
    snap.save()
    proxy.rates, proxy.retry_after = {"429": 1.0}, 3
    delays: list[float] = []
    stripe_sync.push_day(DAYS[0], engine=_engine(delays))
    assert delays == [3, 3, 4, 8, 16]


def test_base_delay_from_env(proxy, env):
    env.setenv("BILLING_STRIPE_BACKOFF_BASE_SECONDS", "0.01")
    proxy.sticky_rate = 1.0
    random_snapshot(n_orgs=1, n_days=1, seed=1).save()
    delays: list[float] = []
    stripe_sync.push_day(DAYS[0], engine=_engine(delays))
    assert delays == [0.01, 0.02, 0.04, 0.08, 0.16]


def test_non_retryable_parks_immediately(proxy):
    snap = random_snapshot(n_orgs=1, n_days=1, seed=1)
    snap.save()
    (org,) = snap.orgs
    from billing.platform import db

    with db.transaction() as cx:  # a customer Stripe does not know: every item is a 404
        cx.execute("INSERT INTO billing.stripe_customers VALUES (%s, 'cus_doesnotexist')", (org,))
    delays: list[float] = []
    summary = stripe_sync.push_day(DAYS[0], engine=_engine(delays))
    assert delays == []
    rows = [r for r in outbox_rows() if r["kind"] != "customer"]
    assert summary["parked"] == len(rows) > 0
    assert all(r["status"] == "parked" and r["attempts"] == 1 for r in rows)
    assert {p["error_class"] for p in stripe_sync.list_parked()} == {"not_found"}


def test_adopts_writes_stripe_has_after_the_idempotency_window(proxy):
    """Responses lost after commit, retried more than 24 h later: found by metadata, not re-sent."""
    from billing.platform import db

    snap = random_snapshot(n_orgs=2, n_days=1, seed=5)
    snap.save()

    def age_attempts() -> None:
        with db.transaction() as cx:
            cx.execute(
                """UPDATE billing.stripe_outbox SET first_attempt_at = now() - interval '25 hours'
                    WHERE first_attempt_at IS NOT NULL"""
            )

    def posts(before: Counter) -> Counter:
        return Counter(proxy.forwarded_paths) - before

    # 1. Customers are created but every response is lost: parked, their items wait.
    proxy.rates, proxy.fault_paths = {"lost": 1.0}, ("/v1/customers",)
    stripe_sync.push_day(DAYS[0], engine=_engine([]))
    assert {r["kind"] for r in outbox_rows() if r["status"] == "parked"} == {"customer"}
    age_attempts()
    # 2. A day later: customers adopted (listed by creation time, matched on metadata.org_id;
    #    a search would miss them: the emulator's search lags 60 s, as Stripe documents);
    #    items created, responses lost.
    org_query = {"query": f"metadata['org_id']:'{next(iter(snap.orgs))}'"}
    assert direct_client().v1.customers.search(params=org_query)["data"] == []
    proxy.fault_paths = ("/v1/invoiceitems",)
    before = Counter(proxy.forwarded_paths)
    stripe_sync.retry_parked(all=True, engine=_engine([]))
    assert posts(before)["POST /v1/customers"] == 0
    assert all(r["is_adopted"] for r in outbox_rows() if r["kind"] == "customer")
    parked_items = [r for r in outbox_rows() if r["status"] == "parked"]
    assert parked_items and {r["kind"] for r in parked_items} <= {"usage_item", "base_fee"}
    age_attempts()
    # 3. Another day later, no faults: items adopted by metadata.idempotency_key, none re-sent.
    proxy.rates = {}
    before = Counter(proxy.forwarded_paths)
    result = stripe_sync.retry_parked(all=True, engine=_engine([]))
    assert result["parked"] == 0 and result["adopted"] == len(parked_items)
    assert posts(before)["POST /v1/invoiceitems"] == 0
    assert all(r["status"] == "sent" and r["is_adopted"] for r in outbox_rows())
    assert stripe_sync.list_parked() == []
    _assert_stripe_matches(snap, DAYS[0])


def test_retry_after_a_key_roll_and_a_forgotten_idempotency_key_is_exactly_once(proxy, env):
    """A customer reached Stripe but every response was lost (parked). Then the API key is
    rolled and Stripe forgets the idempotency key (emulator clock +24 h): the retry finds
    the customer by listing and adopts it, it does not create a second one."""
    env.setenv("BILLING_STRIPE_CONCURRENCY", "1")
    snap = random_snapshot(n_orgs=1, n_days=1, seed=2)
    snap.save()
    (org,) = snap.orgs
    proxy.rates, proxy.fault_paths = {"lost": 1.0}, ("/v1/customers",)
    stripe_sync.push_day(DAYS[0], engine=_engine([]))
    (row,) = [r for r in outbox_rows() if r["status"] == "parked"]
    assert (row["kind"], row["last_error_class"]) == ("customer", "connection")
    email = f"billing+{org}@example.test"
    (created,) = direct_client().v1.customers.list(params={"email": email})["data"]

    point_stripe_at(env, proxy.url, key="sk_test_rolledKey0123456789abcdef")
    emulator_admin("clock/advance", seconds=24 * 3600 + 60)
    proxy.rates = {}
    before = Counter(proxy.forwarded_paths)
    result = stripe_sync.retry_parked(all=True, engine=_engine([]))
    assert (result["parked"], result["adopted"]) == (0, 1), result
    assert (Counter(proxy.forwarded_paths) - before)["POST /v1/customers"] == 0
    assert customers() == {org: created["id"]}
    assert [
        c["id"] for c in direct_client().v1.customers.list(params={"email": email})["data"]
    ] == [created["id"]]
    assert {r["status"] for r in outbox_rows()} == {"sent"}
    _assert_stripe_matches(snap, DAYS[0])


def test_outage_mode_survives_a_redis_flushall(proxy):
    """The read-only flag is durable in Postgres: FLUSHALL on the real Redis leaves it on,
    the next push still queues instead of sending, and the gauge still says 1."""
    from prometheus_client import CollectorRegistry, generate_latest

    from billing.observability import export as metrics_export

    random_snapshot(n_orgs=2, n_days=1, seed=4).save()
    stripe_sync.set_read_only(True, "incident 17")
    since = stripe_sync.read_only()["since"]
    parking.client().flushall()
    assert stripe_sync.read_only() == {"since": since, "reason": "incident 17"}
    stripe_sync.set_read_only(True, "still down")  # re-set: the outage's start is kept
    assert stripe_sync.read_only() == {"since": since, "reason": "still down"}
    result = stripe_sync.push_day(DAYS[0], engine=_engine([]))
    assert (result["status"], proxy.forwarded) == ("read_only", 0)
    assert {r["status"] for r in outbox_rows()} == {"pending"}
    reg = CollectorRegistry()
    reg.register(metrics_export.DurableCollector(airflow=False))
    assert "billing_stripe_read_only 1.0" in generate_latest(reg).decode().splitlines()
    stripe_sync.set_read_only(False)
    assert stripe_sync.read_only() is None
    assert stripe_sync.drain(engine=_engine([]))["still_pending"] == 0


def test_outage_mode_queues_then_drains(proxy):
    snap = random_snapshot(n_orgs=3, n_days=2, seed=9)
    snap.save()
    eng = _engine([])
    stripe_sync.set_read_only(True, "test outage")
    assert stripe_sync.read_only()["reason"] == "test outage"
    results = [stripe_sync.push_day(d, engine=eng) for d in DAYS[:2]]
    assert proxy.forwarded == 0
    n = len(outbox_rows())
    assert results[-1]["status"] == "read_only"
    assert results[-1]["message"] == f"queued {n} writes (Stripe read-only)"
    assert {r["status"] for r in outbox_rows()} == {"pending"}
    assert stripe_sync.sync_invoices(engine=eng)["failed"] == 0  # reads keep working
    stripe_sync.set_read_only(False)
    assert stripe_sync.read_only() is None
    drained = stripe_sync.drain(engine=eng)
    assert drained["sent"] == n and drained["still_pending"] == 0
    order = [r["outbox_id"] for r in sorted(outbox_rows(), key=lambda r: r["sent_at"])]
    by_org: dict[str, list[int]] = {}
    for r in sorted(outbox_rows(), key=lambda r: r["sent_at"]):
        by_org.setdefault(r["org_id"], []).append(r["outbox_id"])
    assert all(ids == sorted(ids) for ids in by_org.values()), order  # in order per org
    _assert_stripe_matches(snap, DAYS[1])


def test_sync_invoices_tracks_status(proxy):
    snap = random_snapshot(n_orgs=2, n_days=1, seed=11)
    snap.save()
    eng = _engine([])
    stripe_sync.push_day(DAYS[0], engine=eng)
    invoices = stripe_sync.close_period(PERIOD, engine=eng)["invoices"]
    paid_org, open_org = sorted(invoices)
    client = direct_client()
    client.v1.invoices.pay(invoices[paid_org], params={"paid_out_of_band": True})
    client.v1.invoices.void_invoice(invoices[open_org])
    result = stripe_sync.sync_invoices(engine=eng)
    assert result["by_status"] == {"paid": 1, "void": 1}
    from billing.platform import db

    with db.connect() as cx:
        rows = {
            r[0]: r[1:]
            for r in cx.execute(
                "SELECT org_id, status, amount_due_cents, amount_paid_cents FROM billing.stripe_invoices"
            ).fetchall()
        }
    total = snap.expected_total(paid_org, DAYS[0])
    assert rows[paid_org] == ("paid", total, total)
    assert rows[open_org][0] == "void"


def test_key_is_never_logged_or_stored(proxy, caplog):
    from billing.platform import connections

    key = connections.get(connections.STRIPE).password
    random_snapshot(n_orgs=1, n_days=1, seed=1).save()
    proxy.sticky_rate = 1.0
    caplog.set_level("DEBUG")
    stripe_sync.push_day(DAYS[0], engine=_engine([]))
    assert key not in caplog.text
    assert key not in str(outbox_rows()) and key not in str(stripe_sync.list_parked())


def test_rejected_key_fails_the_run_and_parks_nothing(env):
    """401 is not parked: the task fails (alert), rows stay queued for the fixed key."""
    from billing.stripe_sync.client import StripeAuthError

    point_stripe_at(env, emulator_url())
    from billing.platform import connections

    conn = connections.get(connections.STRIPE)
    bad = connections.Conn(
        conn.conn_id, conn.conn_type, conn.host, None, None, "not_a_key_123", None
    )
    env.setenv(connections.env_var(conn.conn_id), bad.to_json())
    random_snapshot(n_orgs=1, n_days=1, seed=1).save()
    with pytest.raises(StripeAuthError) as err:
        stripe_sync.push_day(DAYS[0], engine=_engine([]))
    assert "not_a_key_123" not in str(err.value)
    assert {r["status"] for r in outbox_rows()} == {"pending"}
    assert stripe_sync.list_parked() == []


@pytest.mark.parametrize(
    ("day", "window", "periods"),
    [
        (dt.date(2026, 11, 15), 35, ["2026-10-01", "2026-11-01"]),
        (dt.date(2026, 11, 30), 35, ["2026-10-01", "2026-11-01"]),  # Oct 31 + 35 d = Dec 5
        (dt.date(2026, 12, 5), 35, ["2026-10-01", "2026-11-01", "2026-12-01"]),
        (dt.date(2026, 12, 6), 35, ["2026-11-01", "2026-12-01"]),
        (dt.date(2026, 3, 1), 0, ["2026-03-01"]),
    ],
)
def test_periods_open_for_late_events(day, window, periods):
    """Day D also pushes late usage of earlier periods that ended inside the lateness window."""
    from billing.stripe_sync.push import periods_open_for

    assert [p.isoformat() for p in periods_open_for(day, window)] == periods


def test_a_dimensioned_charge_keys_on_a_digest_of_its_values():
    from billing.stripe_sync.outbox import key_for

    day = dt.date(2027, 1, 5)
    plain = key_for("usage", "acme", PERIOD, day, "api_calls")
    assert plain == f"billing:usage:acme:{PERIOD:%Y-%m}:2027-01-05:api_calls"
    a = key_for("usage", "acme", PERIOD, day, 'ai_tokens ["gpt-4o", "input"]')
    b = key_for("usage", "acme", PERIOD, day, 'ai_tokens ["gpt-4o", "output"]')
    long = key_for("usage", "acme", PERIOD, day, "ai_tokens " + '["' + "x" * 5000 + '"]')
    assert a.startswith(f"billing:usage:acme:{PERIOD:%Y-%m}:2027-01-05:ai_tokens.")
    assert a != b and len(a) == len(b) == len(long) < 255
    assert key_for("usage", "acme", PERIOD, day, 'ai_tokens ["gpt-4o", "input"]') == a
