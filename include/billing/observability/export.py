"""Scrape-time export of durable counters: what the billing API serves at /billing/metrics.

Airflow tasks are gone before Prometheus scrapes, so their in-process counters would be
lost. Each flow already keeps durable state (the ingest manifest, the Stripe outbox, the
reconciliation audit, dunning notices, the Redis read-only flag); ``DurableCollector`` turns that
state into metrics when Prometheus asks. A source whose table does not exist yet (or
that fails) is skipped and reported as ``billing_metrics_source_up{source} 0``; a scrape
never fails because one flow is missing. Names and help texts come from
``billing.observability`` only.
"""

from __future__ import annotations

import logging

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from billing.observability import metrics as obs
from billing.platform import settings

log = logging.getLogger(__name__)

# source name -> relations it needs (checked with to_regclass before querying)
PG_SOURCES: dict[str, tuple[str, ...]] = {
    "ingest": ("billing.usage_files",),
    "stripe_outbox": ("billing.stripe_outbox",),
    "stripe_read_only": ("billing.stripe_read_only",),
    "reconcile": ("billing.billing_audit",),
    "incidents": ("billing.billing_incidents",),
    "dunning": ("billing.dunning_notices", "billing.org_service_levels"),
    "purge": ("billing.retention_purge_audit",),
}


class _Families:
    """Builds metric families from observability.DURABLE_METRICS by name."""

    def __init__(self):
        self.out: dict[str, object] = {}

    def _family(self, name: str):
        if name not in self.out:
            kind, doc, labels = obs.DURABLE_METRICS[name]
            if kind == "counter":
                fam = CounterMetricFamily(name, doc, labels=list(labels))
            elif kind == "gauge":
                fam = GaugeMetricFamily(name, doc, labels=list(labels))
            else:
                fam = HistogramMetricFamily(name, doc, labels=list(labels))
            self.out[name] = fam
        return self.out[name]

    def add(self, name: str, value: float, *labels: str) -> None:
        self._family(name).add_metric(list(labels), float(value))

    def histogram(self, name: str, cumulative: list[int], total: float, *labels: str) -> None:
        bounds = obs.DURABLE_BUCKETS[name]
        buckets = [(_le(b), float(c)) for b, c in zip(bounds, cumulative[:-1], strict=True)]
        buckets.append(("+Inf", float(cumulative[-1])))
        self._family(name).add_metric(list(labels), buckets, float(total))


def _le(bound: float) -> str:
    return str(float(bound))


def from_zero(known, rows) -> list[tuple]:
    """Every known label value at 0, then the counted ones (label values, n) from ``rows``.

    Counters are exported from zero so that ``increase()`` sees the first failure: a series
    that appears with value 1 has no earlier sample to increase from. Values counted but not
    in ``known`` (e.g. a stage dropped from the policy) are kept. Sorted by label values.
    """
    out = {k if isinstance(k, tuple) else (k,): 0 for k in known}
    for *labels, n in rows:
        out[tuple(str(x) for x in labels)] = n
    return sorted(out.items())


def _bucket_sql(column: str, bounds) -> str:
    parts = [f"count(*) FILTER (WHERE {column} <= {float(b)})" for b in bounds]
    return ", ".join([*parts, "count(*)", f"coalesce(sum({column}), 0)"])


# ---------------------------------------------------------------- Postgres sources
def _ingest(cx, f: _Families) -> None:
    bounds = obs.DURABLE_BUCKETS["billing_ingest_file_duration_seconds"]
    row = cx.execute(
        f"""SELECT coalesce(sum(accepted), 0), coalesce(sum(non_billable), 0),
                   coalesce(sum(duplicate), 0), coalesce(sum(quarantined), 0),
                   coalesce(sum(blank), 0), coalesce(sum(size_bytes), 0),
                   extract(epoch FROM max(loaded_at)), {_bucket_sql("seconds", bounds)}
              FROM billing.usage_files"""
    ).fetchone()
    for outcome, value in zip(
        ("accepted", "non_billable", "duplicate", "quarantined", "blank"), row[:5], strict=True
    ):
        f.add("billing_ingest_events_total", value, outcome)
    f.add("billing_ingest_bytes_total", row[5])
    f.add("billing_ingest_last_loaded_timestamp_seconds", row[6] or 0)
    f.histogram("billing_ingest_file_duration_seconds", list(row[7:-1]), row[-1])
    from billing import ingest

    for labels, n in from_zero(
        ingest.FILE_STATUSES,
        cx.execute("SELECT status, count(*) FROM billing.usage_files GROUP BY status"),
    ):
        f.add("billing_ingest_files_total", n, *labels)
    for labels, n in from_zero(
        ingest.REASONS,
        cx.execute(
            """SELECT r.key, sum(r.value::bigint) FROM billing.usage_files u,
                      jsonb_each_text(u.reasons) r GROUP BY r.key"""
        ),
    ):
        f.add("billing_ingest_quarantined_total", n, *labels)
    for labels, n in from_zero(
        ingest.REJECT_REASONS,
        cx.execute(
            """SELECT reject_reason, count(*) FROM billing.usage_files
                WHERE status = 'rejected' GROUP BY 1"""
        ),
    ):
        f.add("billing_ingest_files_rejected_total", n, *labels)
    for labels, n in from_zero(
        ingest.SKIP_REASONS,
        cx.execute("SELECT reason, count(*) FROM billing.usage_skipped GROUP BY 1"),
    ):
        f.add("billing_ingest_entries_skipped", n, *labels)


def _stripe_outbox(cx, f: _Families) -> None:
    from billing.stripe_sync import client, outbox

    counts = dict(
        cx.execute("SELECT status, count(*) FROM billing.stripe_outbox GROUP BY status").fetchall()
    )
    for status in outbox.STATUSES:
        f.add("billing_stripe_outbox_rows", counts.get(status, 0), status)
    # The outbox is the source of truth for parked writes (Redis holds a copy that a
    # FLUSHALL or a restart without persistence can lose; the alert must not go quiet).
    f.add("billing_stripe_parked_queue_depth", counts.get("parked", 0))
    attempts, retries = cx.execute(
        "SELECT coalesce(sum(attempts), 0), coalesce(sum(retries), 0) FROM billing.stripe_outbox"
    ).fetchone()
    f.add("billing_stripe_outbox_attempts_total", attempts)
    f.add("billing_stripe_outbox_retries_total", retries)
    for labels, n in from_zero(
        client.ERROR_CLASSES,
        cx.execute(
            """SELECT e.key, sum(e.value::bigint) FROM billing.stripe_outbox o,
                      jsonb_each_text(o.error_counts) e GROUP BY e.key"""
        ),
    ):
        f.add("billing_stripe_outbox_errors_total", n, *labels)


def _stripe_read_only(cx, f: _Families) -> None:
    # Durable in Postgres (billing.stripe_sync.mode): a Redis flush cannot zero the gauge.
    row = cx.execute("SELECT extract(epoch FROM since) FROM billing.stripe_read_only").fetchone()
    f.add("billing_stripe_read_only", 0 if row is None else 1)
    f.add("billing_stripe_read_only_since_timestamp_seconds", 0 if row is None else row[0])


def _reconcile(cx, f: _Families) -> None:
    from billing.reconcile.compare import OUTCOMES

    for labels, n in from_zero(
        OUTCOMES, cx.execute("SELECT status, count(*) FROM billing.billing_audit GROUP BY status")
    ):
        f.add("billing_reconcile_checks_total", n, *labels)
    max_diff, last = cx.execute(
        """SELECT coalesce(max(abs(rel_diff)), 0), extract(epoch FROM max(checked_at))
             FROM (SELECT DISTINCT ON (org_id, period) rel_diff, checked_at
                     FROM billing.billing_audit
                    ORDER BY org_id, period, checked_at DESC) latest"""
    ).fetchone()
    f.add("billing_reconcile_max_relative_diff", max_diff)
    f.add("billing_reconcile_last_run_timestamp_seconds", last or 0)


def _incidents(cx, f: _Families) -> None:
    (n,) = cx.execute(
        "SELECT count(*) FROM billing.billing_incidents WHERE status = 'open'"
    ).fetchone()
    f.add("billing_reconcile_open_incidents", n)


def dunning_stages() -> tuple[str, ...]:
    """The stage names of the dunning policy (none if it cannot be loaded: rows still count)."""
    from billing import dunning

    try:
        return tuple(s.name for s in dunning.load_policy().stages)
    except Exception as exc:  # a broken policy file must not break the scrape
        log.warning("metrics: dunning policy unreadable: %s", exc)
        return ()


def _dunning(cx, f: _Families) -> None:
    from billing.dunning.notices import NOTICE_STATUSES

    stages = dunning_stages()
    for labels, n in from_zero(
        [(stage, status) for stage in stages for status in NOTICE_STATUSES],
        cx.execute("SELECT stage, status, count(*) FROM billing.dunning_notices GROUP BY 1, 2"),
    ):
        f.add("billing_dunning_notices_total", n, *labels)
    for labels, n in from_zero(
        stages,
        cx.execute("SELECT stage, sum(failures) FROM billing.dunning_notices GROUP BY 1"),
    ):
        f.add("billing_dunning_send_failures_total", n, *labels)
    (degraded,) = cx.execute(
        "SELECT count(*) FROM billing.org_service_levels WHERE service_level = 'degraded'"
    ).fetchone()
    f.add("billing_dunning_degraded_orgs", degraded)


def _purge(cx, f: _Families) -> None:
    (dropped,) = cx.execute(
        """SELECT count(*) FROM billing.retention_purge_audit
            WHERE target = 'postgres_partition' AND action = 'dropped'"""
    ).fetchone()
    f.add("billing_purge_partitions_dropped_total", dropped)
    for mode, ts in cx.execute(
        """SELECT CASE WHEN dry_run THEN 'dry_run' ELSE 'purge' END,
                  extract(epoch FROM max(created_at))
             FROM billing.retention_purge_audit GROUP BY 1 ORDER BY 1"""
    ):
        f.add("billing_purge_last_run_timestamp_seconds", ts, mode)


_PG_READERS = {
    "ingest": _ingest,
    "stripe_outbox": _stripe_outbox,
    "stripe_read_only": _stripe_read_only,
    "reconcile": _reconcile,
    "incidents": _incidents,
    "dunning": _dunning,
    "purge": _purge,
}


def collect_postgres(f: _Families, up: dict[str, int]) -> None:
    from billing.platform import db

    try:
        cx = db.connect(autocommit=True)
    except Exception as exc:
        log.warning("metrics: PostgreSQL unavailable: %s", exc)
        up.update({name: 0 for name in PG_SOURCES})
        return
    with cx:
        cx.execute(
            "SELECT set_config('statement_timeout', %s, false)",
            (f"{settings.metrics_scrape_timeout_ms()}ms",),
        )
        for name, relations in PG_SOURCES.items():
            present = cx.execute(
                "SELECT bool_and(to_regclass(r) IS NOT NULL) FROM unnest(%s::text[]) r",
                (list(relations),),
            ).fetchone()[0]
            if not present:
                up[name] = 0
                continue
            try:
                with cx.transaction():
                    _PG_READERS[name](cx, f)
                up[name] = 1
            except Exception as exc:  # one flow's shape change must not break the scrape
                log.warning("metrics: source %s failed: %s", name, exc)
                up[name] = 0


# ---------------------------------------------------------------- Redis
def collect_redis(f: _Families, up: dict[str, int]) -> None:
    try:
        counters = obs.redis_client().hgetall(obs.DURABLE_COUNTERS_KEY)
    except Exception as exc:
        log.warning("metrics: Redis unavailable: %s", exc)
        up["redis"] = 0
        return
    from billing.platform import db

    known = {
        "billing_db_errors_total": db.ERROR_KINDS,
        "billing_db_retries_total": db.RETRY_OPERATIONS,
    }
    counted: dict[str, list] = {name: [] for name in known}
    for field, value in counters.items():
        name, _, label = field.partition("|")
        if name in obs.DURABLE_METRICS:
            counted.setdefault(name, []).append((label, int(value)))
    for name, rows in counted.items():
        for labels, n in from_zero(known.get(name, ()), rows):
            f.add(name, n, *labels)
    up["redis"] = 1


# ---------------------------------------------------------------- Airflow metadata DB
TASK_STATES = ("success", "failed", "upstream_failed", "skipped")  # finished: the state labels


def known_tasks(s) -> list[tuple[str, str]]:
    """(dag_id, task_id) of every task of a billing DAG in the metadata DB's serialized DAGs."""
    from airflow.models.dag import DagModel
    from airflow.models.serialized_dag import SerializedDagModel
    from sqlalchemy import select

    dag_ids = s.scalars(select(DagModel.dag_id).where(DagModel.dag_id.like("billing%"))).all()
    out = []
    for row in SerializedDagModel.get_latest_serialized_dags(dag_ids=list(dag_ids), session=s):
        out += [(row.dag_id, t["__var"]["task_id"]) for t in row.data["dag"]["tasks"]]
    return out


def collect_airflow(f: _Families, up: dict[str, int]) -> None:
    """Task outcomes and durations of billing_* DAGs, and each DAG's last successful run."""
    try:
        from airflow.models.dagrun import DagRun
        from airflow.models.taskinstance import TaskInstance as TI
        from airflow.utils.session import create_session
        from sqlalchemy import case, func, select

        bounds = obs.DURABLE_BUCKETS["billing_task_duration_seconds"]
        finished = TASK_STATES
        with create_session() as s:
            tasks = known_tasks(s)
            runs = s.execute(
                select(TI.dag_id, TI.task_id, TI.state, func.count())
                .where(TI.dag_id.like("billing%"), TI.state.in_(finished))
                .group_by(TI.dag_id, TI.task_id, TI.state)
                .order_by(TI.dag_id, TI.task_id, TI.state)
            ).all()
            cols = [func.sum(case((TI.duration <= b, 1), else_=0)) for b in bounds]
            durations = s.execute(
                select(
                    TI.dag_id,
                    TI.task_id,
                    *cols,
                    func.count(),
                    func.coalesce(func.sum(TI.duration), 0),
                )
                .where(TI.dag_id.like("billing%"), TI.state.in_(finished), TI.duration.isnot(None))
                .group_by(TI.dag_id, TI.task_id)
                .order_by(TI.dag_id, TI.task_id)
            ).all()
            last = s.execute(
                select(DagRun.dag_id, func.max(DagRun.end_date))
                .where(DagRun.dag_id.like("billing%"), DagRun.state == "success")
                .group_by(DagRun.dag_id)
                .order_by(DagRun.dag_id)
            ).all()
    except Exception as exc:
        log.warning("metrics: Airflow metadata DB unavailable: %s", exc)
        up["airflow"] = 0
        return
    # From zero for every task of every billing DAG, so increase() sees its first failure.
    for labels, n in from_zero(
        [(d, t, state) for d, t in tasks for state in finished],
        [(d, t, str(state), n) for d, t, state, n in runs],
    ):
        f.add("billing_task_runs_total", n, *labels)
    hist = {task: ([0] * (len(bounds) + 1), 0) for task in tasks}  # never finished: empty
    for dag_id, task_id, *rest in durations:
        hist[(dag_id, task_id)] = ([int(x or 0) for x in rest[:-1]], rest[-1])
    for (dag_id, task_id), (cumulative, total) in sorted(hist.items()):
        f.histogram("billing_task_duration_seconds", cumulative, total, dag_id, task_id)
    for dag_id, end in last:
        f.add("billing_last_successful_run_timestamp_seconds", end.timestamp(), dag_id)
    up["airflow"] = 1


class DurableCollector:
    """A prometheus_client custom collector over the durable sources."""

    def __init__(self, airflow: bool = True):
        self.airflow = airflow

    def collect(self):
        f = _Families()
        up: dict[str, int] = {}
        collect_postgres(f, up)
        collect_redis(f, up)
        if self.airflow:
            collect_airflow(f, up)
        for name in sorted(up):
            f.add("billing_metrics_source_up", up[name], name)
        yield from f.out.values()

    def describe(self):  # no auto-describe: collecting needs the databases
        return []


_registered = False


def register(registry=None) -> None:
    """Attach the durable collector to the API server's registry (once)."""
    global _registered
    if not _registered:
        (registry or obs.SERVER_REGISTRY).register(DurableCollector())
        _registered = True


def render() -> tuple[bytes, str]:
    register()
    return generate_latest(obs.SERVER_REGISTRY), CONTENT_TYPE_LATEST


def instrument(app) -> None:
    """Count requests and time them (RED for the billing API) and serve GET /metrics.

    The route inherits the app's dependencies, so scraping needs the same Airflow
    identity as any other billing route (see docs/OBSERVABILITY.md for the scrape config).
    """
    import time

    from fastapi import Response

    class _RED:
        """Pure ASGI middleware (no per-request task and streams, as ``@app.middleware``
        would add): the route template is known once the app has routed the request."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            started = time.perf_counter()
            status = 500

            async def send_status(message):
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await self.inner(scope, receive, send_status)
            finally:
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                obs.API_REQUESTS.labels(template, scope["method"], str(status)).inc()
                obs.API_LATENCY.labels(template).observe(time.perf_counter() - started)

    app.add_middleware(_RED)

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    def metrics() -> Response:
        body, content_type = render()
        return Response(content=body, media_type=content_type)
