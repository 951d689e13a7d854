"""Paths and settings: the one place that knows where things live.

Everything has an embedded-stack default under ``.local/`` and an environment override
for production. Secrets never live here: they come from connections (see ``connections``).
"""

from __future__ import annotations

import os
from decimal import Decimal, InvalidOperation
from pathlib import Path

from billing.platform.errors import ConfigError, ServiceError

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # include/billing
PROJECT_DIR = Path(os.environ.get("BILLING_PROJECT_DIR", PACKAGE_DIR.parents[1])).resolve()


def local_dir() -> Path:
    """Root of the embedded stack's state (gitignored)."""
    return Path(os.environ.get("BILLING_LOCAL_DIR", PROJECT_DIR / ".local")).resolve()


def dags_dir() -> Path:
    return PROJECT_DIR / "dags"


def plugins_dir() -> Path:
    return PROJECT_DIR / "plugins"


def dbt_project_dir() -> Path:
    return PROJECT_DIR / "dbt_project"


def dbt_target_dir() -> Path:
    """Where dbt writes its artifacts, one folder per target: ``BILLING_DBT_TARGET_DIR``,
    else ``dbt_project/target`` (each test session has its own, as it has its own stack)."""
    explicit = os.environ.get("BILLING_DBT_TARGET_DIR")
    return Path(explicit) if explicit else dbt_project_dir() / "target"


def catalog_path() -> Path:
    return Path(
        os.environ.get("BILLING_CATALOG", PROJECT_DIR / "include" / "config" / "catalog.yaml")
    )


def landing_uri() -> str:
    """Root of the landing zone, read through Airflow's ObjectStoragePath."""
    return os.environ.get("BILLING_LANDING_URI") or (local_dir() / "landing").as_uri()


def mail_dir() -> Path:
    return Path(os.environ.get("BILLING_MAIL_DIR", local_dir() / "mail"))


def snapshot_schema() -> str:
    """The published invoice snapshot's schema, the one every reader reads
    (``BILLING_SNAPSHOT_SCHEMA``, default ``billing_snapshot``); dbt builds into
    ``transform.SNAPSHOT_BUILD_SCHEMA`` and ``transform.publish_snapshot`` copies it here."""
    return os.environ.get("BILLING_SNAPSHOT_SCHEMA", "billing_snapshot")


def lateness_days() -> int:
    return int(os.environ.get("BILLING_LATENESS_DAYS", "35"))


def max_line_bytes() -> int:
    return int(os.environ.get("BILLING_MAX_LINE_BYTES", str(64 * 1024)))


def pdf_store_uri() -> str:
    """Root of the stored invoice PDFs (an ObjectStoragePath URI, one object per ETag):
    ``BILLING_PDF_STORE``, e.g. ``s3://bucket/invoice-pdfs`` in production; locally a
    folder under the stack's data dir."""
    return os.environ.get("BILLING_PDF_STORE") or (local_dir() / "pdf-store").as_uri()


INVOICE_SELLER_DEFAULT = (
    "Example Billing Ltd.",
    "1 Example Street",
    "Example City",
    "billing@example.test",
)


def invoice_seller() -> tuple[str, ...]:
    """The seller block of invoice PDFs: ``BILLING_SELLER`` (lines separated by ``|``)."""
    raw = os.environ.get("BILLING_SELLER")
    return tuple(s.strip() for s in raw.split("|")) if raw else INVOICE_SELLER_DEFAULT


def pdf_fallback_fonts() -> tuple[Path, ...]:
    """TTF/OTF files for scripts DejaVu lacks (``BILLING_PDF_FALLBACK_FONTS``, ``os.pathsep``
    separated)."""
    raw = os.environ.get("BILLING_PDF_FALLBACK_FONTS", "")
    return tuple(Path(p) for p in raw.split(os.pathsep) if p.strip())


def stripe_status_ttl_s() -> float:
    """How long an api-server worker caches the Stripe outage flag
    (``BILLING_STRIPE_STATUS_TTL_S``)."""
    return float(os.environ.get("BILLING_STRIPE_STATUS_TTL_S", "5"))


def api_pg_pool_size() -> int:
    """PostgreSQL connections per api-server worker process (``BILLING_API_PG_POOL_SIZE``).

    workers x pool size must fit in ``max_connections`` minus what the scheduler, the task
    workers and dbt need (docs/BILLING_API.md)."""
    return max(1, int(os.environ.get("BILLING_API_PG_POOL_SIZE", "4")))


def api_pg_pool_timeout_s() -> float:
    """How long a request waits for a pooled connection before it answers 503."""
    return float(os.environ.get("BILLING_API_PG_POOL_TIMEOUT_S", "2"))


def api_workers() -> int:
    """api-server worker processes (``BILLING_API_WORKERS``), where the stack starts one."""
    return max(1, int(os.environ.get("BILLING_API_WORKERS", "1")))


def api_bench_ceiling() -> bool:
    """``BILLING_API_BENCH=1``: the plugin also mounts a bare endpoint answering a fixed 304
    (``/bench-ceiling``), the benchmark's ceiling of the stack. Never set in production."""
    return os.environ.get("BILLING_API_BENCH") == "1"


# ---------------------------------------------------------------- PostgreSQL
def pg_statement_timeout_ms() -> int:
    """``statement_timeout`` of every billing session (``BILLING_PG_STATEMENT_TIMEOUT_MS``)."""
    return int(os.environ.get("BILLING_PG_STATEMENT_TIMEOUT_MS", "300000"))


def pg_lock_timeout_ms() -> int:
    """``lock_timeout`` of every billing session (``BILLING_PG_LOCK_TIMEOUT_MS``)."""
    return int(os.environ.get("BILLING_PG_LOCK_TIMEOUT_MS", "30000"))


# ---------------------------------------------------------------- flows
def ingest_workers() -> int:
    """Processes that ingest one arrival day's files in parallel (``BILLING_INGEST_WORKERS``)."""
    return max(1, int(os.environ.get("BILLING_INGEST_WORKERS", "2")))


def invoice_grace_days() -> int:
    """Days after its period an invoice may still change (``BILLING_INVOICE_GRACE_DAYS``),
    by default the lateness window."""
    return int(os.environ.get("BILLING_INVOICE_GRACE_DAYS", lateness_days()))


def retention_days() -> int:
    """How long usage is kept before the retention purge (``BILLING_RETENTION_DAYS``)."""
    days = int(os.environ.get("BILLING_RETENTION_DAYS", "400"))
    if days < 1:
        raise ConfigError(f"BILLING_RETENTION_DAYS must be positive, got {days}")
    return days


RECONCILE_TOLERANCE_ENV = "BILLING_RECONCILE_TOLERANCE"
DEFAULT_RECONCILE_TOLERANCE = Decimal("0.005")


def reconcile_tolerance() -> Decimal:
    """Largest relative internal-vs-Stripe difference that still matches (0.5 %)."""
    raw = os.environ.get(RECONCILE_TOLERANCE_ENV, "")
    if not raw:
        return DEFAULT_RECONCILE_TOLERANCE
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ConfigError(f"{RECONCILE_TOLERANCE_ENV}={raw!r} is not a number") from None
    if not value.is_finite() or not 0 <= value < 1:
        raise ConfigError(
            f"{RECONCILE_TOLERANCE_ENV}={raw!r} must be a ratio in [0, 1), e.g. 0.005"
        )
    return value


def dunning_policy_path() -> Path:
    return Path(
        os.environ.get(
            "BILLING_DUNNING_POLICY", PROJECT_DIR / "include" / "config" / "dunning.yaml"
        )
    )


def dunning_templates_dir() -> Path:
    return Path(
        os.environ.get(
            "BILLING_DUNNING_TEMPLATES", PROJECT_DIR / "include" / "templates" / "dunning"
        )
    )


# ---------------------------------------------------------------- Stripe client policy
def _stripe_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ServiceError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise ServiceError(f"{name}={raw!r} must not be negative")
    return value


def stripe_backoff_base_s() -> float:
    return _stripe_number("BILLING_STRIPE_BACKOFF_BASE_SECONDS", 1.0)


def stripe_max_retries() -> int:
    return int(_stripe_number("BILLING_STRIPE_MAX_RETRIES", 5))


def stripe_max_rps() -> float:
    """Requests per second to Stripe across threads (0 = unlimited)."""
    return _stripe_number("BILLING_STRIPE_MAX_RPS", 25.0)


def stripe_concurrency() -> int:
    return max(1, int(_stripe_number("BILLING_STRIPE_CONCURRENCY", 4)))


def stripe_timeout_s() -> float:
    return _stripe_number("BILLING_STRIPE_TIMEOUT_SECONDS", 30.0)


def stripe_days_until_due() -> int:
    return int(_stripe_number("BILLING_STRIPE_DAYS_UNTIL_DUE", 30))


# ---------------------------------------------------------------- Airflow, the page, metrics
def retry_delay_seconds() -> int:
    """Delay before a task's first retry (``BILLING_RETRY_DELAY_SECONDS``; local runs shorten it)."""
    return int(os.environ.get("BILLING_RETRY_DELAY_SECONDS", "120"))


def airflow_api_url() -> str | None:
    """Where the Billing page reaches Airflow's REST API (``BILLING_AIRFLOW_API_URL``), if set."""
    return os.environ.get("BILLING_AIRFLOW_API_URL") or None


def page_window_days() -> int:
    """Days of history the Billing page's tiles cover (``BILLING_PAGE_WINDOW_DAYS``)."""
    return int(os.environ.get("BILLING_PAGE_WINDOW_DAYS", "7"))


def page_airflow_timeout_s() -> float:
    return float(os.environ.get("BILLING_PAGE_AIRFLOW_TIMEOUT_S", "30"))


def metrics_scrape_timeout_ms() -> int:
    """``statement_timeout`` of a scrape's queries (``BILLING_METRICS_SCRAPE_TIMEOUT_MS``)."""
    return int(os.environ.get("BILLING_METRICS_SCRAPE_TIMEOUT_MS", "5000"))


def prometheus_port() -> int | None:
    """The local Prometheus' port (``BILLING_PORT_PROMETHEUS``); None: any free port."""
    raw = os.environ.get("BILLING_PORT_PROMETHEUS")
    return int(raw) if raw else None
