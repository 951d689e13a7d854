"""Paths and settings: the one place that knows where things live.

Everything has an embedded-stack default under ``.local/`` and an environment override
for production. Secrets never live here: they come from connections (see ``connections``).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
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
