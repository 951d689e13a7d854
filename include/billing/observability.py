"""Prometheus metrics for every flow: the one place metric names are defined.

Tasks are short-lived processes, so counters are also kept durably (in Postgres/Redis by
each flow) and exported at scrape time by the billing API; these in-process collectors
give the same names to code that runs inside long-lived processes and to tests.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

INGEST_EVENTS = Counter(
    "billing_ingest_events_total", "Usage lines by ingest outcome", ["outcome"], registry=REGISTRY
)
INGEST_QUARANTINED = Counter(
    "billing_ingest_quarantined_total",
    "Quarantined usage lines by reason",
    ["reason"],
    registry=REGISTRY,
)
INGEST_BYTES = Counter("billing_ingest_bytes_total", "Bytes of usage files read", registry=REGISTRY)
INGEST_DURATION = Histogram(
    "billing_ingest_file_duration_seconds",
    "Time to ingest one usage file",
    registry=REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
