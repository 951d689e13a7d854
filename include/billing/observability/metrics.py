"""Prometheus metrics for every flow: the one place metric names are defined.

Tasks are short-lived processes, so counters are also kept durably (in Postgres/Redis by
each flow) and exported at scrape time by the billing API; these in-process collectors
give the same names to code that runs inside long-lived processes and to tests.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram

log = logging.getLogger(__name__)

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
INGEST_REJECTED = Counter(
    "billing_ingest_files_rejected_total",
    "Usage files rejected whole (nothing loaded), by reason",
    ["reason"],
    registry=REGISTRY,
)
INGEST_SKIPPED = Counter(
    "billing_ingest_entries_skipped_total",
    "Day-folder entries not read (in flight, unsupported name, directory, symlink), by reason",
    ["reason"],
    registry=REGISTRY,
)
INGEST_DURATION = Histogram(
    "billing_ingest_file_duration_seconds",
    "Time to ingest one usage file",
    registry=REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)

# Stripe sync (billing.stripe_sync). Durable twins live in billing.stripe_outbox
# (attempts, retries, error_counts, status); see stripe_sync.outbox.counters().
STRIPE_REQUESTS = Counter(
    "billing_stripe_requests_total",
    "Stripe API requests by operation and outcome (ok or error class)",
    ["op", "outcome"],
    registry=REGISTRY,
)
STRIPE_REQUEST_SECONDS = Histogram(
    "billing_stripe_request_duration_seconds",
    "Latency of one Stripe API request",
    ["op"],
    registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
STRIPE_ERRORS = Counter(
    "billing_stripe_errors_total",
    "Failed Stripe requests by error class",
    ["error_class"],
    registry=REGISTRY,
)
STRIPE_RETRIES = Counter(
    "billing_stripe_retries_total",
    "Stripe requests retried after a backoff, by error class",
    ["error_class"],
    registry=REGISTRY,
)
STRIPE_WRITES = Counter(
    "billing_stripe_writes_total",
    "Outbox writes by outcome (sent, adopted, parked, queued, blocked)",
    ["kind", "outcome"],
    registry=REGISTRY,
)

# Dunning (billing.dunning). Durable twin: billing.dunning_notices (status, failures).
DUNNING_NOTICES = Counter(
    "billing_dunning_notices_total",
    "Dunning notice send attempts in this process by stage and outcome (sent, failed)",
    ["stage", "status"],
    registry=REGISTRY,
)

# ---------------------------------------------------------------- exported by the API server
# Airflow tasks exit before any scrape, so the billing API (GET /billing/metrics) exports
# SERVER_REGISTRY: in-process metrics of the API server itself plus DurableCollector
# (billing.observability.export), which reads durable state at scrape time. Design:
# docs/OBSERVABILITY.md. Metric names live here only; the collector looks them up.
SERVER_REGISTRY = CollectorRegistry(auto_describe=True)

API_REQUESTS = Counter(
    "billing_api_requests_total",
    "Billing API requests by route template, method and status code",
    ["route", "method", "status"],
    registry=SERVER_REGISTRY,
)
API_LATENCY = Histogram(
    "billing_api_request_duration_seconds",
    "Billing API request latency by route template",
    ["route"],
    registry=SERVER_REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DB_QUERY_SECONDS = Histogram(
    "billing_db_query_duration_seconds",
    "PostgreSQL statement latency in this process (billing.platform.db cursors)",
    registry=SERVER_REGISTRY,
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 300),
)
# Task-local twin of the durable DB error counter, for logs and tests.
DB_ERRORS = Counter(
    "billing_db_errors_total",
    "PostgreSQL errors by kind (statement_timeout, lock_timeout, connection, other)",
    ["kind"],
    registry=REGISTRY,
)
DB_RETRIES = Counter(
    "billing_db_retries_total",
    "Idempotent database operations retried after a transient error",
    ["operation"],
    registry=REGISTRY,
)

# Durable metrics: read at scrape time from Postgres, Redis and Airflow's metadata DB.
# name -> (type, help, label names). Histograms list their bucket bounds in DURABLE_BUCKETS.
DURABLE_METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # ingest (billing.usage_files manifest; monotonic: manifest rows are never purged)
    "billing_ingest_files_total": ("counter", "Usage files loaded, by status", ("status",)),
    "billing_ingest_events_total": ("counter", "Usage lines by ingest outcome", ("outcome",)),
    "billing_ingest_quarantined_total": (
        "counter",
        "Quarantined usage lines by reason",
        ("reason",),
    ),
    "billing_ingest_bytes_total": ("counter", "Bytes of usage files read", ()),
    # exported from zero for every reason (billing.ingest.loader.REJECT_REASONS), so increase() works
    "billing_ingest_files_rejected_total": (
        "counter",
        "Usage files rejected whole (nothing loaded), by reason",
        ("reason",),
    ),
    "billing_ingest_entries_skipped": (
        "gauge",
        "Day-folder entries the latest listing did not read, by reason (billing.usage_skipped)",
        ("reason",),
    ),
    "billing_ingest_file_duration_seconds": ("histogram", "Time to ingest one usage file", ()),
    "billing_ingest_last_loaded_timestamp_seconds": (
        "gauge",
        "When the newest usage file was loaded",
        (),
    ),
    # every billing DAG's tasks (Airflow metadata DB): RED for ingest, dbt, Stripe, reconcile, dunning
    "billing_task_runs_total": (
        "counter",
        "Finished task instances of billing DAGs by state",
        ("dag", "task", "state"),
    ),
    "billing_task_duration_seconds": (
        "histogram",
        "Duration of finished task instances of billing DAGs",
        ("dag", "task"),
    ),
    "billing_last_successful_run_timestamp_seconds": (
        "gauge",
        "End of the newest successful run of a billing DAG",
        ("dag",),
    ),
    # Stripe push (billing.stripe_outbox, Redis parking/outage flag)
    "billing_stripe_outbox_rows": (
        "gauge",
        "Stripe outbox rows by status (pending = queued, e.g. in outage mode)",
        ("status",),
    ),
    "billing_stripe_outbox_attempts_total": (
        "counter",
        "Stripe write attempts recorded on outbox rows",
        (),
    ),
    "billing_stripe_outbox_retries_total": (
        "counter",
        "Stripe write retries recorded on outbox rows",
        (),
    ),
    "billing_stripe_outbox_errors_total": (
        "counter",
        "Stripe write errors recorded on outbox rows, by class",
        ("error_class",),
    ),
    "billing_stripe_parked_queue_depth": (
        "gauge",
        "Parked Stripe writes awaiting manual retry (outbox rows with status parked)",
        (),
    ),
    "billing_stripe_read_only": ("gauge", "1 while Stripe outage (read-only) mode is on", ()),
    "billing_stripe_read_only_since_timestamp_seconds": (
        "gauge",
        "When read-only mode was switched on (0 when off)",
        (),
    ),
    # reconciliation (billing.billing_audit, billing.billing_incidents)
    "billing_reconcile_checks_total": (
        "counter",
        "Reconciliation results by outcome",
        ("outcome",),
    ),
    "billing_reconcile_max_relative_diff": (
        "gauge",
        "Largest relative internal-vs-Stripe difference in the latest result per org and period",
        (),
    ),
    "billing_reconcile_last_run_timestamp_seconds": (
        "gauge",
        "When reconciliation last wrote a result",
        (),
    ),
    "billing_reconcile_open_incidents": ("gauge", "Open reconciliation incidents", ()),
    # dunning (billing.dunning_notices)
    "billing_dunning_notices_total": (
        "counter",
        "Dunning notices by stage and status (sent, failed)",
        ("stage", "status"),
    ),
    "billing_dunning_send_failures_total": (
        "counter",
        "Failed dunning send attempts (refused recipient, SMTP error), by stage",
        ("stage",),
    ),
    "billing_dunning_degraded_orgs": (
        "gauge",
        "Organisations whose service level is degraded by dunning",
        (),
    ),
    # database faults, counted durably in Redis by every process (billing.platform.db)
    "billing_db_errors_total": ("counter", "PostgreSQL errors by kind, all processes", ("kind",)),
    "billing_db_retries_total": (
        "counter",
        "Idempotent database operations retried, all processes",
        ("operation",),
    ),
    # retention purge (billing.retention_purge_audit)
    "billing_purge_partitions_dropped_total": (
        "counter",
        "Usage partitions dropped by retention purge",
        (),
    ),
    "billing_purge_last_run_timestamp_seconds": (
        "gauge",
        "When retention purge last ran, by mode",
        ("mode",),
    ),
    # the collector itself
    "billing_metrics_source_up": (
        "gauge",
        "1 if a durable metrics source was read, 0 if missing or failing",
        ("source",),
    ),
}
DURABLE_BUCKETS = {
    "billing_ingest_file_duration_seconds": (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    "billing_task_duration_seconds": (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
}
# Redis hash of durable counters written by billing.platform.db (field = "<metric>|<label value>").
DURABLE_COUNTERS_KEY = "billing:metrics:counters"


def redis_client():
    """The Redis holding the durable counters, with short timeouts (a scrape must not hang)."""
    import redis

    from billing.platform import connections

    return redis.Redis.from_url(
        connections.redis_url(),
        decode_responses=True,
        socket_timeout=1,
        socket_connect_timeout=1,
    )


def record(metric: str, label: str, amount: int = 1) -> None:
    """Add to a durable counter in Redis. Best effort: observability never breaks the caller."""
    if metric not in DURABLE_METRICS:
        raise KeyError(f"unknown durable metric {metric}")
    try:
        redis_client().hincrby(DURABLE_COUNTERS_KEY, f"{metric}|{label}", amount)
    except Exception as exc:
        log.debug("metrics: could not record %s{%s}: %s", metric, label, exc)
