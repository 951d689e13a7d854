"""Observability: every metric name, and the scrape-time export of durable counters.

Playbook "Monitoring". Prometheus rules and dashboards are in ``monitoring/``.

* ``metrics``: the one place metric names are defined (in-process collectors, durable ones).
* ``export``: ``GET /billing/metrics``, the durable state of each flow read at scrape time.
"""

from __future__ import annotations

from billing.observability.metrics import (
    API_LATENCY,
    API_REQUESTS,
    DB_ERRORS,
    DB_QUERY_SECONDS,
    DB_RETRIES,
    DUNNING_NOTICES,
    DURABLE_BUCKETS,
    DURABLE_COUNTERS_KEY,
    DURABLE_METRICS,
    INGEST_BYTES,
    INGEST_DURATION,
    INGEST_EVENTS,
    INGEST_QUARANTINED,
    INGEST_REJECTED,
    INGEST_SKIPPED,
    REGISTRY,
    SERVER_REGISTRY,
    STRIPE_ERRORS,
    STRIPE_REQUEST_SECONDS,
    STRIPE_REQUESTS,
    STRIPE_RETRIES,
    STRIPE_WRITES,
    record,
    redis_client,
)

__all__ = [
    "API_LATENCY",
    "API_REQUESTS",
    "DB_ERRORS",
    "DB_QUERY_SECONDS",
    "DB_RETRIES",
    "DUNNING_NOTICES",
    "DURABLE_METRICS",
    "DURABLE_BUCKETS",
    "DURABLE_COUNTERS_KEY",
    "INGEST_BYTES",
    "INGEST_DURATION",
    "INGEST_EVENTS",
    "INGEST_QUARANTINED",
    "INGEST_REJECTED",
    "INGEST_SKIPPED",
    "REGISTRY",
    "SERVER_REGISTRY",
    "STRIPE_ERRORS",
    "STRIPE_REQUESTS",
    "STRIPE_REQUEST_SECONDS",
    "STRIPE_RETRIES",
    "STRIPE_WRITES",
    "record",
    "redis_client",
]
