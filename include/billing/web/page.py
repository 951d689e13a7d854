"""The Billing page: an operator's view inside the Airflow UI (Admin → Billing).

Served by the Billing API app (``billing.web.api``), so every route here has the same Airflow
authentication and ``Billing`` custom-view check as the invoice routes. The Airflow UI
shows ``GET /billing/ui`` in an iframe (``external_views`` in ``plugins/billing_plugin.py``);
the iframe is same-origin, so the browser sends the UI's ``_token`` cookie with the page
and with every ``fetch`` the page makes (``credentials: "same-origin"``), exactly as the
Airflow UI's own requests.

What the page shows (rendered on the server, Jinja2 with autoescaping; the small script
only performs the two actions and writes their results with ``textContent``):

* RED tiles per billing flow (each ``billing_*`` DAG): rate, errors and duration over
  the recent runs, read from Airflow's REST API with the caller's own token, so the page
  shows exactly the runs the user may see.
* Stripe outage mode (``billing.web.common.stripe_status``) and the parked pushes
  (``billing.stripe_sync.list_parked``: the outbox's parked rows) with a retry button each
  (``POST /billing/stripe/parked/{key}/retry`` → ``billing.stripe_sync.retry_parked``).
* The latest reconciliation (``billing.reconcile_runs``), its discrepancies
  (``billing.billing_audit``) and open incidents, and **Reconcile now**:
  ``POST /billing/reconcile/runs`` with an ``Idempotency-Key`` header triggers the DAG
  ``billing_reconcile`` through ``POST /api/v2/dags/billing_reconcile/dagRuns`` (as the
  calling user) with conf ``{"idempotency_key": <key>, "period": ...}``. The DAG run id is
  derived from the key (``billing_page__<key>``), so Airflow's own unique (dag_id, run_id)
  constraint is the key → run store: a repeated key returns the run it started, never a
  second one, across workers and restarts.

Nothing here imports chDB or dbt: the web process only reads Postgres, Redis and Airflow.
"""

from __future__ import annotations

import datetime as dt
import logging
import statistics
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import httpx
from fastapi import Body, Depends, FastAPI, Header, HTTPException, Request, Response, status
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from billing.platform import settings
from billing.platform.dates import OPTIONAL_PERIOD_PATTERN
from billing.platform.tables import money
from billing.web.common import RESOURCE_NAME, stripe_status

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "assets"  # templates, CSS, JS
RECONCILE_DAG = "billing_reconcile"
RETRY_DAG = "billing_retry_parked"
RUN_ID_PREFIX = "billing_page__"
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9_.:-]{8,100}$"
PARKED_KEY_PATTERN = r"^[A-Za-z0-9_.:@=+-]{1,300}$"
ASSETS = {  # name -> media type; the only files the asset route serves
    "page.js": "text/javascript; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'self'"
)


# ---------------------------------------------------------------- Airflow REST API
def caller_token(request: Request) -> str | None:
    """The credential the caller authenticated with: bearer header first, then the cookie.

    Same precedence as ``airflow.api_fastapi.core_api.security.get_user``, which has already
    accepted it for this request.
    """
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN

    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(COOKIE_NAME_JWT_TOKEN)


def airflow_base_url(request: Request) -> str:
    """Where this API server answers: ``BILLING_AIRFLOW_API_URL``, else ``[api] base_url``,
    else the origin the request came in on."""
    explicit = settings.airflow_api_url()
    if explicit:
        return explicit.rstrip("/")
    try:
        from airflow.configuration import conf

        configured = conf.get("api", "base_url", fallback=None)
    except Exception:
        configured = None
    if configured:
        return configured.rstrip("/")
    return f"{request.url.scheme}://{request.url.netloc}"


class Airflow:
    """Airflow's public REST API, called as the user of the current request."""

    def __init__(self, request: Request):
        token = caller_token(request)
        self.client = httpx.Client(
            base_url=airflow_base_url(request),
            headers={"Authorization": f"Bearer {token}"} if token else {},
            timeout=settings.page_airflow_timeout_s(),
            trust_env=False,  # loopback to ourselves: never through a proxy
        )

    def __enter__(self) -> Airflow:
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()

    def get(self, path: str, **params) -> httpx.Response:
        return self.client.get(path, params=params or None)

    def post(self, path: str, body: dict) -> httpx.Response:
        return self.client.post(path, json=body)


def _detail(r: httpx.Response) -> str:
    try:
        detail = r.json().get("detail")
    except Exception:
        detail = None
    return str(detail or r.text[:200] or r.reason_phrase)


def _run_url(dag_id: str, run_id: str) -> str:
    """The run's page in the Airflow UI (relative to the UI's base)."""
    return f"dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


# ---------------------------------------------------------------- RED tiles
def _when(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def _seconds(run: dict, tis: list[dict] = ()) -> float | None:
    """A run's duration: first task start to last task end when it has task instances.

    Not the run's own start/end: ``airflow dags test`` (``billing run-day``, ``billing
    demo``) records the logical date as the run's start, so a run of an earlier day would
    read hundreds of hours. Without task times, the run's duration as Airflow reports it.
    """
    starts = [t for ti in tis if (t := _when(ti.get("start_date")))]
    ends = [t for ti in tis if (t := _when(ti.get("end_date")))]
    if starts and ends:
        return max(0.0, (max(ends) - min(starts)).total_seconds())
    if run.get("duration") is not None:
        return float(run["duration"])
    if run.get("start_date") and run.get("end_date"):
        return (_when(run["end_date"]) - _when(run["start_date"])).total_seconds()
    return None


def _fmt_seconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _outcome(run: dict, tis: list[dict]) -> str:
    """``failed``, ``retrying`` (a task up for retry), ``degraded`` (a skipped delivery
    sentinel), ``success`` or ``active``: what the tiles count a run as."""
    from billing.stripe_sync.delivery import SENTINEL_TASK_ID

    if run["state"] == "failed":
        return "failed"
    if any(ti.get("state") == "up_for_retry" for ti in tis):
        return "retrying"
    if run["state"] == "success":
        skipped = {ti["task_id"] for ti in tis if ti.get("state") == "skipped"}
        return "degraded" if SENTINEL_TASK_ID in skipped else "success"
    return "active"


def red_tiles(
    dags: list[dict], runs: list[dict], days: int, tis: list[dict] | None = None
) -> list[dict]:
    """Rate, errors and duration per billing DAG over the runs of the last ``days`` days.

    ``tis`` are the runs' task instances: a run with a task up for retry counts as an error
    (it is not healthy, even though the run is still ``running``), a successful run whose
    ``stripe_all_delivered`` sentinel skipped counts as degraded, and durations span the
    task instances.
    """
    by_run: dict[tuple[str, str], list[dict]] = {}
    for ti in tis or ():
        by_run.setdefault((ti["dag_id"], ti["dag_run_id"]), []).append(ti)
    by_dag: dict[str, list[dict]] = {d["dag_id"]: [] for d in dags}
    for run in runs:
        by_dag.setdefault(run["dag_id"], []).append(run)
    paused = {d["dag_id"]: bool(d.get("is_paused")) for d in dags}
    tiles = []
    for dag_id in sorted(by_dag):
        rs = sorted(by_dag[dag_id], key=lambda r: r.get("run_after") or "", reverse=True)
        run_tis = {r["dag_run_id"]: by_run.get((dag_id, r["dag_run_id"]), []) for r in rs}
        outcome = {r["dag_run_id"]: _outcome(r, run_tis[r["dag_run_id"]]) for r in rs}
        counted = [r for r in rs if outcome[r["dag_run_id"]] != "active"]
        n = {
            k: sum(1 for r in counted if outcome[r["dag_run_id"]] == k)
            for k in ("failed", "retrying", "degraded")
        }
        finished = [r for r in rs if r["state"] in ("success", "failed")]
        durations = sorted(
            d for r in finished if (d := _seconds(r, run_tis[r["dag_run_id"]])) is not None
        )
        p50 = statistics.median(durations) if durations else None
        p95 = durations[min(len(durations) - 1, int(0.95 * len(durations)))] if durations else None
        errors = n["failed"] + n["retrying"]
        error_rate = errors / len(counted) if counted else None
        last = rs[0] if rs else None
        latest = outcome[counted[0]["dag_run_id"]] if counted else None
        if not counted:
            health = "idle"
        elif latest == "failed":
            health = "failing"
        elif errors or n["degraded"]:
            health = "degraded"
        else:
            health = "ok"
        tiles.append(
            {
                "dag_id": dag_id,
                "is_paused": paused.get(dag_id, False),
                "health": health,
                "runs": len(rs),
                "rate_per_day": round(len(rs) / days, 2),
                "finished": len(finished),
                "failed": n["failed"],
                "retrying": n["retrying"],
                "degraded": n["degraded"],
                "errors": errors,
                "counted": len(counted),
                "active": len(rs) - len(finished),
                "error_rate": None if error_rate is None else round(error_rate, 4),
                "error_pct": "–" if error_rate is None else f"{error_rate * 100:.0f}%",
                "duration_p50_s": p50,
                "duration_p95_s": p95,
                "duration_p50": _fmt_seconds(p50),
                "duration_p95": _fmt_seconds(p95),
                "last_run": None
                if last is None
                else {
                    "dag_run_id": last["dag_run_id"],
                    "state": last["state"],
                    "outcome": outcome[last["dag_run_id"]],
                    "run_after": last.get("run_after"),
                    "url": _run_url(dag_id, last["dag_run_id"]),
                },
            }
        )
    return tiles


def _pages(af: Airflow, path: str, key: str, limit: int = 2000, **params) -> list[dict]:
    """Every item of a paged Airflow list (up to ``limit``); raises _ApiError on a non-200."""
    items: list[dict] = []
    while True:
        r = af.get(path, limit=100, offset=len(items), **params)
        if r.status_code != 200:
            raise _ApiError(f"Airflow {path}: {r.status_code} {_detail(r)}")
        page = r.json()[key]
        items += page
        if len(page) < 100 or len(items) >= limit:
            return items


class _ApiError(Exception):
    pass


def flows(af: Airflow, days: int) -> dict:
    """The tiles, or the reason they are unavailable (never raises)."""
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(days=days)).isoformat()
    billing = {"dag_id_pattern": "billing_", "run_after_gte": since}
    try:
        r = af.get("/api/v2/dags", dag_id_pattern="billing_", limit=100, order_by="dag_id")
        if r.status_code != 200:
            return {"tiles": [], "error": f"Airflow /api/v2/dags: {r.status_code} {_detail(r)}"}
        dags = [d for d in r.json()["dags"] if d["dag_id"].startswith("billing_")]
        # A week of billing runs is small; page anyway.
        runs = _pages(af, "/api/v2/dags/~/dagRuns", "dag_runs", order_by="-run_after", **billing)
        # Their task instances: retries, the delivery sentinel, task-based durations.
        tis = _pages(
            af,
            "/api/v2/dags/~/dagRuns/~/taskInstances",
            "task_instances",
            limit=20000,
            order_by="id",
            **billing,
        )
    except _ApiError as exc:
        return {"tiles": [], "error": str(exc)}
    except httpx.HTTPError as exc:
        return {"tiles": [], "error": f"Airflow API unreachable: {type(exc).__name__}"}
    runs = [x for x in runs if x["dag_id"].startswith("billing_")]
    tis = [t for t in tis if t["dag_id"].startswith("billing_")]
    return {"tiles": red_tiles(dags, runs, days, tis), "error": None}


# ---------------------------------------------------------------- Stripe and reconcile
def parked() -> dict:
    keys = (
        "idempotency_key",
        "kind",
        "org_id",
        "period",
        "day",
        "metric",
        "amount_cents",
        "currency",
        "attempts",
        "error_class",
        "last_error",
        "parked_at",
    )
    try:
        from billing import stripe_sync

        items = [{k: p.get(k) for k in keys} for p in stripe_sync.list_parked()]
        for p in items:  # for people: the amount in its currency (minor units stay in JSON)
            p["amount"] = (
                "" if p["amount_cents"] is None else money(p["amount_cents"], p["currency"])
            )
    except Exception as exc:  # Postgres down: show it, keep the page (Redis is only a copy)
        return {"items": [], "error": f"parked pushes unavailable: {type(exc).__name__}"}
    items.sort(key=lambda p: (p.get("parked_at") or "", p["idempotency_key"]), reverse=True)
    return {"items": items, "error": None}


def stripe_delivery() -> dict:
    """The Stripe line: reachability from the outbox (parked/pending rows and their last
    error) and the durable read-only flag (``billing.stripe_sync.delivery.status``)."""
    try:
        from billing.platform import db
        from billing.stripe_sync import delivery, mode

        with db.connect(autocommit=True) as cx:
            return {**delivery.status(delivery.open_writes(cx), mode.info(cx)), "error": None}
    except Exception as exc:  # Postgres down: say so, keep the page
        log.warning("billing page: Stripe status unavailable: %s", exc)
        return {
            "state": "unknown",
            "text": "",
            "error": f"Stripe status unavailable: {type(exc).__name__}",
        }


def latest_reconciliation(limit: int = 50) -> dict:
    """The newest reconcile run, its discrepancies (non-matching orgs) and open incidents."""
    from psycopg.rows import dict_row

    from billing.platform import db

    try:
        with db.connect() as cx, cx.cursor(row_factory=dict_row) as cur:
            present = cur.execute(
                "SELECT to_regclass('billing.reconcile_runs') IS NOT NULL AS ok"
            ).fetchone()["ok"]
            if not present:
                return {"run": None, "discrepancies": [], "incidents": [], "error": None}
            run = cur.execute(
                """SELECT idempotency_key, run_id, to_char(period, 'YYYY-MM') AS period, status,
                          orgs_checked, discrepancies, above_tolerance,
                          max_rel_diff::text AS max_rel_diff, tolerance::text AS tolerance,
                          created_at
                     FROM billing.reconcile_runs ORDER BY created_at DESC, idempotency_key
                    LIMIT 1"""
            ).fetchone()
            rows = []
            if run is not None:
                rows = cur.execute(
                    """SELECT org_id, status, is_above_tolerance, internal_cents, stripe_cents,
                              internal_currency, stripe_currency, abs_diff_cents,
                              rel_diff::text AS rel_diff
                         FROM billing.billing_audit
                        WHERE idempotency_key = %s AND status <> 'match'
                        ORDER BY is_above_tolerance DESC, rel_diff DESC, org_id LIMIT %s""",
                    (run["idempotency_key"], limit),
                ).fetchall()
            incidents = cur.execute(
                """SELECT incident_id, to_char(period, 'YYYY-MM') AS period, org_ids, summary,
                          max_rel_diff::text AS max_rel_diff, created_at
                     FROM billing.billing_incidents WHERE status = 'open'
                    ORDER BY incident_id DESC LIMIT 20"""
            ).fetchall()
    except Exception as exc:
        log.warning("billing page: reconciliation unavailable: %s", exc)
        return {
            "run": None,
            "discrepancies": [],
            "incidents": [],
            "error": f"reconciliation unavailable: {type(exc).__name__}",
        }
    from decimal import Decimal

    for r in rows:
        r["rel_pct"] = f"{Decimal(r['rel_diff']) * 100:.2f}%"
        r["internal"] = money(r["internal_cents"], r["internal_currency"])
        r["stripe"] = money(r["stripe_cents"], r["stripe_currency"])
        r["abs_diff"] = money(r["abs_diff_cents"], r["internal_currency"] or r["stripe_currency"])
    return {"run": run, "discrepancies": rows, "incidents": incidents, "error": None}


def default_period(reconcile: dict) -> str:
    run = reconcile.get("run")
    return run["period"] if run else dt.date.today().strftime("%Y-%m")


def overview(request: Request) -> dict:
    days = settings.page_window_days()
    with Airflow(request) as af:
        red = flows(af, days)
    rec = latest_reconciliation()
    return {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "window_days": days,
        "flows": red,
        "stripe": stripe_status(),
        "delivery": stripe_delivery(),
        "parked": parked(),
        "reconcile": rec,
        "default_period": default_period(rec),
        "reconcile_dag": RECONCILE_DAG,
        "credits": _credits_panel(request.query_params.get("org")),
        "subscriptions": _subscriptions_panel(request.query_params.get("org")),
    }


def _subscriptions_panel(org_id: str | None) -> dict | None:
    """The org's plans over time and who changed them (docs/SUBSCRIPTIONS.md), for the org
    the credits form names; None when none is named or it is not an org."""
    import re

    from billing import subscriptions
    from billing.orgs import ORG_ID_PATTERN
    from billing.platform import db
    from billing.platform.errors import ConfigError

    if not org_id or not re.match(ORG_ID_PATTERN, org_id):
        return None
    try:
        with db.connect() as cx:
            found = subscriptions.history(cx, org_id)
            log = subscriptions.changes(cx, org_id)
    except ConfigError:
        return None

    def span(item: dict | None) -> str:
        if not item:
            return "-"
        ends = item.get("ends_at") or "open"
        return f"{item['plan']} [{item['starts_at']}, {ends})"

    return {
        "org_id": org_id,
        "intervals": [
            {"plan": x.plan, "span": x.span(), "created_by": x.created_by} for x in found
        ],
        "changes": [
            {
                "when": f"{c['changed_at']:%Y-%m-%d %H:%M}",
                "who": c["changed_by"],
                "source": c["source"],
                "action": c["action"],
                "before": span(c["before"]),
                "after": span(c["after"]),
                "reason": c["reason"] or "",
            }
            for c in reversed(log[-20:])
        ],
    }


def _credits_panel(org_id: str | None) -> dict | None:
    from billing.web import credits

    return credits.panel(org_id)


# ---------------------------------------------------------------- rendering
_env = None


def _templates():
    global _env
    if _env is None:
        import jinja2

        _env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(WEB_DIR)),
            autoescape=True,  # every value in the page is data: always escaped
            undefined=jinja2.StrictUndefined,
        )
    return _env


def render_page(data: dict) -> str:
    return _templates().get_template("page.html.j2").render(ui_root="../", assets="ui/", **data)


def health(request: Request) -> dict:
    """Admin → Health: the RED tiles only (the playbook's Admin → Health)."""
    days = settings.page_window_days()
    with Airflow(request) as af:
        red = flows(af, days)
    return {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "window_days": days,
        "flows": red,
    }


def render_health(data: dict) -> str:
    # Served at /billing/ui/health: one level deeper than the page.
    return _templates().get_template("health.html.j2").render(ui_root="../../", assets="", **data)


# ---------------------------------------------------------------- authorization for writes
def requires_write(dag_id: str):
    """POST on the Billing view, and permission to create runs of ``dag_id``.

    The app-level dependency has authenticated the user already; this adds the auth
    manager's decision for the write (with SimpleAuthManager: role ``user`` and up).
    """
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import (
        DagAccessEntity,
        DagDetails,
    )
    from airflow.api_fastapi.core_api.security import get_user

    def inner(user=Depends(get_user)) -> None:  # noqa: B008
        am = get_auth_manager()
        allowed = am.is_authorized_custom_view(
            method="POST", resource_name=RESOURCE_NAME, user=user
        ) and am.is_authorized_dag(
            method="POST",
            access_entity=DagAccessEntity.RUN,
            details=DagDetails(id=dag_id),
            user=user,
        )
        if not allowed:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden")

    return inner


def _require_json(request: Request) -> None:
    """Writes take JSON only: a cross-site form cannot send it without a CORS preflight."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "send Content-Type: application/json"
        )


class ReconcileRequest(BaseModel):
    period: str = Field(
        "", pattern=OPTIONAL_PERIOD_PATTERN, description="YYYY-MM; empty: the DAG's"
    )


def _run_json(run: dict, created: bool) -> dict:
    return {
        "created": created,
        "dag_id": run["dag_id"],
        "dag_run_id": run["dag_run_id"],
        "state": run["state"],
        "logical_date": run.get("logical_date"),
        "run_after": run.get("run_after"),
        "conf": run.get("conf") or {},
        "url": _run_url(run["dag_id"], run["dag_run_id"]),
        "api_url": f"/api/v2/dags/{quote(run['dag_id'], safe='')}/dagRuns/"
        f"{quote(run['dag_run_id'], safe='')}",
    }


def trigger_reconcile(af: Airflow, key: str, period: str, user_name: str) -> tuple[int, dict]:
    """Start (or find) the reconcile run of ``key``; returns (HTTP status, body)."""
    run_id = RUN_ID_PREFIX + key
    path = f"/api/v2/dags/{RECONCILE_DAG}/dagRuns"

    def existing() -> tuple[int, dict] | None:
        r = af.get(f"{path}/{quote(run_id, safe='')}")
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise HTTPException(r.status_code, f"Airflow: {_detail(r)}")
        run = r.json()
        if (run.get("conf") or {}).get("period", "") != period:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"Idempotency-Key already used for run {run_id} with another period",
            )
        return status.HTTP_200_OK, _run_json(run, created=False)

    found = existing()
    if found:
        return found
    r = af.post(
        path,
        {
            "dag_run_id": run_id,
            "logical_date": None,
            "conf": {"idempotency_key": key, "period": period},
            "note": f"Reconcile now (Billing page, {user_name})",
        },
    )
    if r.status_code not in (200, 201):
        # A concurrent request with the same key won the insert: Airflow answers 409 (or, on
        # SQLite, may fail the losing insert with a 500). Either way the key's run exists.
        found = existing()
        if found:
            return found
    if r.status_code not in (200, 201):
        raise HTTPException(
            r.status_code if r.status_code in (400, 401, 403, 404, 422) else 502,
            f"Airflow: {_detail(r)}",
        )
    log.info("billing page: %s triggered %s %s", user_name, RECONCILE_DAG, run_id)
    return status.HTTP_201_CREATED, _run_json(r.json(), created=True)


# ---------------------------------------------------------------- routes
def install(app: FastAPI) -> None:
    """Add the page and its action routes to the Billing API app (auth is app-wide)."""
    from airflow.api_fastapi.core_api.security import get_user

    headers = {
        "Content-Security-Policy": CSP,
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
    }

    @app.get("/ui", response_class=HTMLResponse, summary="The Billing page (Airflow UI view)")
    def page(request: Request) -> HTMLResponse:
        return HTMLResponse(render_page(overview(request)), headers=headers)

    @app.get(
        "/ui/health",
        response_class=HTMLResponse,
        summary="Admin → Health: the RED tiles per billing flow (Airflow UI view)",
    )
    def health_page(request: Request) -> HTMLResponse:
        return HTMLResponse(render_health(health(request)), headers=headers)

    @app.get("/ui/assets/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in ASSETS:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such asset")
        return Response(
            (WEB_DIR / name).read_bytes(),
            media_type=ASSETS[name],
            headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    @app.get("/overview", summary="The Billing page's data as JSON")
    def overview_json(request: Request) -> dict:
        return overview(request)

    @app.post(
        "/reconcile/runs",
        summary="Reconcile now: trigger billing_reconcile (idempotent per Idempotency-Key)",
        status_code=status.HTTP_201_CREATED,
        dependencies=[Depends(requires_write(RECONCILE_DAG))],
        responses={200: {"description": "the run this key already started"}, 409: {}},
    )
    def reconcile_now(
        request: Request,
        idempotency_key: Annotated[
            str, Header(alias="Idempotency-Key", pattern=IDEMPOTENCY_KEY_PATTERN)
        ],
        body: Annotated[ReconcileRequest | None, Body()] = None,
        user=Depends(get_user),  # noqa: B008
    ) -> JSONResponse:
        _require_json(request)
        period = (body or ReconcileRequest()).period
        with Airflow(request) as af:
            try:
                code, out = trigger_reconcile(af, idempotency_key, period, user.get_name())
            except httpx.HTTPError as exc:
                raise HTTPException(
                    status.HTTP_502_BAD_GATEWAY, f"Airflow API unreachable: {type(exc).__name__}"
                ) from None
        return JSONResponse(out, status_code=code)

    @app.post(
        "/stripe/parked/{key}/retry",
        summary="Retry one parked Stripe push (billing.stripe_sync.retry_parked)",
        dependencies=[Depends(requires_write(RETRY_DAG))],
        responses={404: {}, 409: {}, 503: {}},
    )
    def retry_one(
        request: Request,
        key: Annotated[str, PathParam(pattern=PARKED_KEY_PATTERN, max_length=300)],
        user=Depends(get_user),  # noqa: B008
    ) -> dict:
        from billing import stripe_sync
        from billing.platform.errors import BillingError, ServiceError

        _require_json(request)
        try:
            if key not in {p["idempotency_key"] for p in stripe_sync.list_parked()}:
                raise HTTPException(status.HTTP_404_NOT_FOUND, "no parked push with this key")
            result = stripe_sync.retry_parked([key])
            still = key in {p["idempotency_key"] for p in stripe_sync.list_parked()}
        except ServiceError as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
        except BillingError as exc:  # Stripe read-only: refuse, nothing changed
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        log.info("billing page: %s retried parked %s: %s", user.get_name(), key, result)
        return {"key": key, "still_parked": still, "result": result}


__all__ = [
    "health",
    "install",
    "overview",
    "red_tiles",
    "render_health",
    "render_page",
    "stripe_delivery",
    "trigger_reconcile",
]
