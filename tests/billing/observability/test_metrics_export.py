"""The scrape-time collector: durable state in, Prometheus text out, missing flows skipped."""

from __future__ import annotations

import json

import pytest
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from billing import observability as obs
from billing.observability import export as metrics_export


def _samples(registry) -> dict[tuple, float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


@pytest.fixture
def redis_keys(stack):
    from billing.stripe_sync import parking

    r = obs.redis_client()
    parked = parking.PARKED
    saved = r.dump(parked)
    r.delete(parked)
    yield r, parked
    r.delete(parked)
    if saved is not None:
        r.restore(parked, 0, saved)


def test_collector_reads_durable_state(clean_db, pg, redis_keys):
    r, parked = redis_keys
    pg.execute(
        """INSERT INTO billing.usage_files (path, arrival_day, size_bytes, checksum, lines, blank,
               accepted, non_billable, duplicate, quarantined, reasons, seconds, run_end)
           VALUES ('a.jsonl', '2026-01-02', 100, 'x', 10, 1, 5, 1, 1, 2,
                   '{"malformed_json": 2}', 0.2, now()),
                  ('b.jsonl', '2026-01-02', 50, 'y', 4, 0, 3, 0, 0, 1,
                   '{"unknown_org": 1}', 7, now())"""
    )
    pg.execute(
        """INSERT INTO billing.stripe_outbox (idempotency_key, kind, org_id, period, payload,
               status, attempts, retries, error_counts)
           VALUES ('k1', 'customer', 'acme', '2026-01-01', '{}', 'pending', 0, 0, '{}'),
                  ('k2', 'customer', 'beta', '2026-01-01', '{}', 'parked', 5, 4,
                   '{"api_connection": 3, "rate_limit": 2}')"""
    )
    pg.commit()
    r.hset(parked, "k2", json.dumps({"error": "down"}))
    # Outage mode is durable in Postgres: a Redis FLUSHALL leaves the gauge at 1.
    pg.execute(
        """INSERT INTO billing.stripe_read_only (since, reason)
           VALUES ('2026-01-02T03:00:00+00:00', 'test')"""
    )
    pg.commit()
    r.flushall()

    reg = CollectorRegistry()
    reg.register(metrics_export.DurableCollector(airflow=False))
    s = _samples(reg)

    assert s[("billing_ingest_events_total", (("outcome", "accepted"),))] == 8
    assert s[("billing_ingest_events_total", (("outcome", "quarantined"),))] == 3
    assert s[("billing_ingest_quarantined_total", (("reason", "malformed_json"),))] == 2
    assert s[("billing_ingest_quarantined_total", (("reason", "unknown_org"),))] == 1
    assert s[("billing_ingest_bytes_total", ())] == 150
    assert s[("billing_ingest_files_total", (("status", "loaded"),))] == 2
    assert s[("billing_ingest_file_duration_seconds_bucket", (("le", "0.25"),))] == 1
    assert s[("billing_ingest_file_duration_seconds_bucket", (("le", "10.0"),))] == 2
    assert s[("billing_ingest_file_duration_seconds_count", ())] == 2
    assert s[("billing_ingest_file_duration_seconds_sum", ())] == pytest.approx(7.2)
    assert s[("billing_stripe_outbox_rows", (("status", "pending"),))] == 1
    assert s[("billing_stripe_outbox_rows", (("status", "parked"),))] == 1
    assert s[("billing_stripe_outbox_rows", (("status", "sent"),))] == 0
    assert s[("billing_stripe_outbox_attempts_total", ())] == 5
    assert s[("billing_stripe_outbox_retries_total", ())] == 4
    assert s[("billing_stripe_outbox_errors_total", (("error_class", "rate_limit"),))] == 2
    assert s[("billing_stripe_parked_queue_depth", ())] == 1
    assert s[("billing_stripe_read_only", ())] == 1
    assert s[("billing_stripe_read_only_since_timestamp_seconds", ())] == 1767322800
    assert s[("billing_metrics_source_up", (("source", "ingest"),))] == 1
    assert s[("billing_metrics_source_up", (("source", "redis"),))] == 1


def test_missing_flow_tables_are_skipped_not_fatal(clean_db, pg, redis_keys):
    reg = CollectorRegistry()
    reg.register(metrics_export.DurableCollector(airflow=False))
    s = _samples(reg)
    for source, relations in metrics_export.PG_SOURCES.items():
        present = all(
            pg.execute("SELECT to_regclass(%s) IS NOT NULL", (rel,)).fetchone()[0]
            for rel in relations
        )
        assert s[("billing_metrics_source_up", (("source", source),))] == (1 if present else 0)


def test_postgres_down_still_renders(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_BILLING_POSTGRES", "postgres://nobody:x@127.0.0.1:1/none?connect_timeout=1"
    )
    monkeypatch.setenv("AIRFLOW_CONN_BILLING_REDIS", "redis://:x@127.0.0.1:1/0")
    reg = CollectorRegistry()
    reg.register(metrics_export.DurableCollector(airflow=False))
    s = _samples(reg)
    assert s[("billing_metrics_source_up", (("source", "ingest"),))] == 0
    assert s[("billing_metrics_source_up", (("source", "redis"),))] == 0


def test_every_exported_name_is_declared_once():
    declared = set(obs.DURABLE_METRICS) | {
        m.name for m in obs.SERVER_REGISTRY.collect() if m.name.startswith("billing_")
    }
    assert "billing_api_requests" in declared or "billing_api_requests_total" in declared
    assert set(obs.DURABLE_BUCKETS) <= set(obs.DURABLE_METRICS)
    assert all(obs.DURABLE_METRICS[n][0] == "histogram" for n in obs.DURABLE_BUCKETS)


def _app() -> FastAPI:
    def auth(authorization: str | None = Header(None)) -> None:  # noqa: B008
        if authorization != "Bearer ok":
            raise HTTPException(401, "no")

    app = FastAPI(dependencies=[Depends(auth)])

    @app.get("/invoices/{invoice_id}")
    def invoice(invoice_id: str) -> dict:
        return {"id": invoice_id}

    metrics_export.instrument(app)
    return app


def test_metrics_route_is_authenticated_and_counts_requests(stack):
    before = (
        obs.SERVER_REGISTRY.get_sample_value(
            "billing_api_requests_total",
            {"route": "/invoices/{invoice_id}", "method": "GET", "status": "200"},
        )
        or 0
    )
    with TestClient(_app()) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/invoices/inv_1", headers={"Authorization": "Bearer ok"}).status_code == 200
        r = c.get("/metrics", headers={"Authorization": "Bearer ok"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"billing_api_requests", "billing_api_request_duration_seconds"} <= names
    assert "billing_metrics_source_up" in names
    assert (
        obs.SERVER_REGISTRY.get_sample_value(
            "billing_api_requests_total",
            {"route": "/invoices/{invoice_id}", "method": "GET", "status": "200"},
        )
        == before + 1
    )
    assert (
        obs.SERVER_REGISTRY.get_sample_value(
            "billing_api_requests_total", {"route": "/metrics", "method": "GET", "status": "401"}
        )
        >= 1
    )


def test_billing_api_serves_metrics_behind_its_auth():
    from billing.web import api

    app = api.create_app()
    assert "/metrics" in {getattr(r, "path", None) for r in app.routes}
    assert app.router.dependencies  # the app-wide Airflow auth dependency covers /metrics
