"""Run the dbt project: the invoice snapshot in Postgres, the usage rollups in ClickHouse.

One dbt project, two targets (``dbt_project/models/snapshot`` builds on ``postgres``,
``models/rollups`` on ``clickhouse``). Credentials come from the Airflow connections and
reach dbt as environment variables (``dbt_project/profiles.yml`` holds no secrets).

dbt always runs in a child process (``python -m billing.transform <dbt args>``): dbt keeps
global state, and embedded ClickHouse (chDB) allows one process per data path, so the
child routes dbt-clickhouse's HTTP client through chDB and must be the only chDB user.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from billing import orchestration
from billing.platform import analytics, settings
from billing.platform import connections as conns
from billing.platform.errors import BillingError, ConfigError

log = logging.getLogger(__name__)

TARGETS = ("postgres", "clickhouse")
# The folder under dbt_project/models that each target builds (dbt_project.yml enables it).
MODEL_FOLDERS = {"postgres": "snapshot", "clickhouse": "rollups"}
# dbt builds the invoice snapshot here; readers never look at it. Once a build (with its
# tests) succeeds, publish_snapshot() copies the marts into the published schema
# (settings.snapshot_schema()) in one transaction.
SNAPSHOT_BUILD_SCHEMA = "billing_snapshot_build"
PUBLISHED_TABLES = {  # mart -> its key
    "fct_daily_charges": ("org_id", "period_start", "metric", "dimension_key", "usage_date"),
    "fct_invoice_lines": ("invoice_line_id",),
    "fct_invoices": ("invoice_id",),
}


class TransformError(BillingError):
    """dbt failed: a data check, a model or the connection."""

    exit_code = 4


@dataclass
class DbtResult:
    target: str
    args: list[str]
    returncode: int
    seconds: float
    results: list[dict[str, Any]] = field(default_factory=list)
    dbt_seconds: float | None = None  # dbt's own elapsed time (without start-up and parse)
    output: str = ""

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r.get("status") in ("error", "fail", "runtime error")]


# ---------------------------------------------------------------- environment
def dbt_env(target: str) -> dict[str, str]:
    """Environment variables that ``profiles.yml`` and the models read, from connections."""
    if target not in TARGETS:
        raise ConfigError(f"unknown dbt target {target!r} (expected one of: {', '.join(TARGETS)})")
    pg = conns.get(conns.POSTGRES)
    env = {
        "BILLING_DBT_PG_HOST": pg.host or "127.0.0.1",
        "BILLING_DBT_PG_PORT": str(pg.port or 5432),
        "BILLING_DBT_PG_USER": pg.login or "",
        "BILLING_DBT_PG_DBNAME": pg.schema or "billing",
        "DBT_ENV_SECRET_PG_PASSWORD": pg.password or "",
    }
    if target == "clickhouse":
        ch = conns.get(conns.CLICKHOUSE)
        secure, port = conns.clickhouse_http(ch)
        env.update(
            {
                "BILLING_DBT_CH_HOST": ch.host or "localhost",
                "BILLING_DBT_CH_PORT": str(port),
                "BILLING_DBT_CH_USER": ch.login or "default",
                "DBT_ENV_SECRET_CH_PASSWORD": ch.password or "",
                "BILLING_DBT_CH_SECURE": str(secure),
                "BILLING_DBT_CH_SCHEMA": ch.schema or "analytics",
                # ClickHouse reads Postgres itself, through a named collection: the SQL dbt
                # compiles names it and holds no credentials (macros/postgres_from_clickhouse).
                "BILLING_DBT_PG_COLLECTION": analytics.postgres_collection_name(ch),
            }
        )
    return env


def target_path(target: str) -> Path:
    return settings.dbt_target_dir() / target


def _private_target_path(target: str) -> Path:
    """``target_path`` as a 0700 folder: compiled SQL and logs are for this user only."""
    path = target_path(target)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def manifest_path(target: str) -> Path:
    return target_path(target) / "manifest.json"


def cosmos_manifest_path(target: str) -> Path:
    """The manifest without macros and docs (two thirds of it): what Cosmos reads at parse."""
    return target_path(target) / "cosmos_manifest.json"


def _write_cosmos_manifest(target: str) -> Path:
    full = json.loads(manifest_path(target).read_text())
    slim = {k: v for k, v in full.items() if k not in ("macros", "docs")}
    out = cosmos_manifest_path(target)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(slim, separators=(",", ":")))
    tmp.replace(out)
    return out


def run_vars(
    day: dt.date,
    since: dt.date | None = None,
    catalog_version: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """dbt vars for the run of ``day`` (its data interval), never derived from now()."""
    out: dict[str, Any] = {
        "day": day.isoformat(),
        "since": (since or day).isoformat(),
        "lateness_days": settings.lateness_days(),
        "invoice_grace_days": settings.invoice_grace_days(),
    }
    if catalog_version:
        out["catalog_version"] = catalog_version
    out.update(extra or {})
    return out


# ---------------------------------------------------------------- dbt
def run_dbt(
    target: str,
    command: str = "build",
    *,
    select: Sequence[str] | str | None = None,
    vars: Mapping[str, Any] | None = None,
    full_refresh: bool = False,
    args: Iterable[str] = (),
    check: bool = True,
    timeout: float | None = None,
) -> DbtResult:
    """Run one dbt command (``"build"``, ``"docs generate"``) against ``target`` in a child
    process and return its results.

    ``check``: raise :class:`TransformError` naming the failed nodes when dbt fails.
    """
    import time

    argv = [*command.split(), "--target", target]
    argv += ["--project-dir", str(settings.dbt_project_dir())]
    argv += ["--profiles-dir", str(settings.dbt_project_dir())]
    argv += ["--target-path", str(target_path(target))]
    if select:
        argv += ["--select", *([select] if isinstance(select, str) else select)]
    if vars:
        argv += ["--vars", json.dumps(dict(vars), default=str)]
    if full_refresh:
        argv.append("--full-refresh")
    argv += list(args)
    env = {
        **os.environ,
        **dbt_env(target),
        "DBT_LOG_PATH": str(target_path(target) / "logs"),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        "DBT_USE_COLORS": "false",
    }
    run_results = _private_target_path(target) / "run_results.json"
    run_results.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "billing.transform", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    result = DbtResult(target, argv, proc.returncode, time.perf_counter() - start)
    result.output = proc.stdout + proc.stderr
    if run_results.exists():
        body = json.loads(run_results.read_text())
        result.results = body.get("results", [])
        result.dbt_seconds = body.get("elapsed_time")
    if check and proc.returncode != 0:
        raise TransformError(_describe_failure(result))
    return result


def _describe_failure(result: DbtResult) -> str:
    lines = []
    for r in result.failures:
        node = r.get("unique_id", "?").split(".")
        name = node[2] if len(node) > 2 else node[-1]
        message = " ".join(str(r.get("message") or r.get("status")).split())
        lines.append(f"{name}: {message}")
    if not lines:
        tail = [x for x in result.output.strip().splitlines() if x.strip()][-5:]
        lines = tail or [f"exit code {result.returncode}"]
    return f"dbt {result.args[0]} on {result.target} failed: " + "; ".join(lines[:8])


def parse(target: str) -> Path:
    """Write ``target/<target>/manifest.json`` so Cosmos renders the DAG without running dbt.

    Parsing connects to nothing, so it works without connections (placeholders are used).
    """
    _private_target_path(target)
    argv = ["parse", "--target", target, "--project-dir", str(settings.dbt_project_dir())]
    argv += ["--profiles-dir", str(settings.dbt_project_dir())]
    argv += ["--target-path", str(target_path(target)), "--vars", '{"day": "2026-01-01"}']
    proc = subprocess.run(
        [sys.executable, "-m", "billing.transform", *argv],
        env={
            **os.environ,
            "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
            "DBT_LOG_PATH": str(target_path(target) / "logs"),
        },
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise TransformError(
            f"dbt parse on {target} failed: {proc.stdout[-500:]}{proc.stderr[-500:]}"
        )
    return _write_cosmos_manifest(target)


def docs_generate(target: str) -> Path:
    """Build dbt docs for one target into its own target folder (``target/<target>/``), so
    the Postgres snapshot's docs and the ClickHouse rollups' docs never overwrite each other;
    return the ``index.html``."""
    if target not in TARGETS:
        raise ConfigError(f"unknown dbt target {target!r} (expected one of: {', '.join(TARGETS)})")
    run_dbt(target, "docs generate", vars={"day": "2026-01-01"})
    return target_path(target) / "index.html"


def docs_serve_argv(target: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """The command that serves one target's generated docs (``billing docs serve``)."""
    if not (target_path(target) / "catalog.json").exists():
        raise ConfigError(
            f"no docs for {target} yet: run `billing docs generate --target {target}`"
        )
    return [
        sys.executable,
        "-m",
        "billing.transform",
        "docs",
        "serve",
        "--target",
        target,
        "--project-dir",
        str(settings.dbt_project_dir()),
        "--profiles-dir",
        str(settings.dbt_project_dir()),
        "--target-path",
        str(target_path(target)),
        "--host",
        host,
        "--port",
        str(port),
        "--no-browser",
    ]


# ---------------------------------------------------------------- nightly
def prepare(cx, catalog=None) -> str:
    """Sync the catalog and check every org against it; return the catalog version.

    Fails with one clear message (and nothing written by dbt) on a catalog error, an org
    subscribed to an unknown plan or one whose currency differs from its plan's (the
    subscriptions not over before the first day no closed period covers: the catalog may
    have dropped an old plan).
    """
    from billing import pricing
    from billing.pricing import catalog_sync

    catalog = catalog or pricing.load_catalog()
    problems = []
    for org_id, plan, currency in cx.execute(
        """SELECT DISTINCT s.org_id, s.plan, lower(o.currency)
             FROM billing.subscriptions s JOIN billing.organizations o USING (org_id)
            WHERE s.ends_at IS NULL OR s.ends_at > coalesce(
                  (SELECT max(period) + interval '1 month' FROM billing.period_closes), '-infinity')
            ORDER BY 1, 2"""
    ).fetchall():
        if plan not in catalog.plans:
            known = ", ".join(sorted(catalog.plans))
            problems.append(f"org {org_id!r} is on unknown plan {plan!r} (catalog plans: {known})")
        elif catalog.plans[plan].currency != currency:
            problems.append(
                f"org {org_id!r} currency {currency!r} does not match plan {plan!r} "
                f"currency {catalog.plans[plan].currency!r}"
            )
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ConfigError("cannot price: " + "; ".join(problems[:5]) + more)
    version = catalog_sync.sync(cx, catalog)
    cx.commit()
    return version


def sync_catalog() -> str:
    """The nightly task before dbt: :func:`prepare` on its own connection."""
    from billing.platform import db

    with db.connect() as cx:
        return prepare(cx)


# Each dbt target's nightly steps (billing.orchestration.nightly): its build, then what needs it.
TARGET_STEPS = {"postgres": ("dbt_snapshot", "publish_snapshot"), "clickhouse": ("dbt_rollups",)}


def transform_day(
    day: dt.date,
    since: dt.date | None = None,
    *,
    targets: Sequence[str] = TARGETS,
    full_refresh: bool = False,
    catalog=None,
) -> dict[str, DbtResult]:
    """The nightly transform for ``day``: billing_nightly's transform steps, in its order
    (:data:`billing.orchestration.nightly.TRANSFORM_STEPS`), the dbt builds per target."""
    from billing.orchestration import nightly
    from billing.platform import db

    def prepare_pricing(_day: dt.date) -> str:
        with db.connect() as cx:
            return prepare(cx, catalog)

    def build(target: str) -> Callable[[dt.date], DbtResult]:
        # no pinned catalog version: each day is priced by the version in force on it
        # (billing.catalog_activations, docs/SUBSCRIPTIONS.md "Catalog versions")
        def step(day: dt.date) -> DbtResult:
            return run_dbt(target, "build", vars=run_vars(day, since), full_refresh=full_refresh)

        return step

    handlers = {
        "prepare_pricing": prepare_pricing,
        "dbt_snapshot": build("postgres"),
        "publish_snapshot": lambda _day: publish_snapshot(),
        "dbt_rollups": build("clickhouse"),
    }
    skip = {
        step: f"target {target} not asked for"
        for target, steps in TARGET_STEPS.items()
        if target not in targets
        for step in steps
    }
    handlers = {name: run for name, run in handlers.items() if name not in skip}
    done = nightly.run(day, handlers, only=nightly.TRANSFORM_STEPS, skip=skip)
    return {target: done[steps[0]] for target, steps in TARGET_STEPS.items() if steps[0] in done}


def _columns(cx, schema: str, table: str) -> list[str]:
    """The table's column names in order; empty when it does not exist."""
    rows = cx.execute(
        """SELECT attname FROM pg_attribute
            WHERE attrelid = to_regclass(format('%%I.%%I', %s::text, %s::text))
              AND attnum > 0 AND NOT attisdropped
            ORDER BY attnum""",
        (schema, table),
    )
    return [r[0] for r in rows]


def publish_snapshot(cx=None) -> dict[str, dict[str, int]]:
    """Make the last successful dbt build what every reader sees, all marts at once.

    One transaction applies the difference between the build schema and the published one
    (delete changed or gone rows by key, insert new or changed rows). Deletes and inserts
    are MVCC: a reader's statement (or repeatable-read transaction) sees the whole old
    snapshot or the whole new one, never lines of one with totals of the other, and no
    reader waits. Idempotent: publishing the same build twice changes nothing.
    """
    from psycopg import sql

    from billing.platform import db

    build, published = SNAPSHOT_BUILD_SCHEMA, settings.snapshot_schema()
    if build == published:
        raise ConfigError(f"the published snapshot schema must differ from dbt's ({build!r})")
    out: dict[str, dict[str, int]] = {}
    with db.transaction() if cx is None else contextlib.nullcontext(cx) as cx:
        # One publisher at a time (a backfill and a nightly may finish together).
        cx.execute("SELECT pg_advisory_xact_lock(hashtext('billing.publish_snapshot'))")
        cx.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(published)))
        periods = _changed_periods(cx, build, published)
        for table, key in PUBLISHED_TABLES.items():
            src = sql.Identifier(build, table)
            dst = sql.Identifier(published, table)
            columns = _columns(cx, build, table)
            if not columns:
                raise TransformError(f"nothing to publish: {build}.{table} was not built")
            if (
                _columns(cx, published, table) != columns
            ):  # first publish, or the contract changed: same shape as dbt's
                cx.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(dst))
                cx.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(dst, src))
            cols = sql.SQL(", ").join(map(sql.Identifier, columns))
            match = sql.SQL(" AND ").join(
                sql.SQL("p.{k} = g.{k}").format(k=sql.Identifier(k)) for k in key
            )
            deleted = cx.execute(
                sql.SQL(
                    "DELETE FROM {dst} AS p USING "
                    "(SELECT {cols} FROM {dst} EXCEPT ALL SELECT {cols} FROM {src}) AS g "
                    "WHERE {match}"
                ).format(dst=dst, src=src, cols=cols, match=match)
            ).rowcount
            inserted = cx.execute(
                sql.SQL(
                    "INSERT INTO {dst} ({cols}) SELECT {cols} FROM {src} "
                    "EXCEPT ALL SELECT {cols} FROM {dst}"
                ).format(dst=dst, src=src, cols=cols)
            ).rowcount
            out[table] = {"deleted": deleted, "inserted": inserted}
        changed = sum(n for counts in out.values() for n in counts.values())
        if changed:  # a new snapshot: the push names the publish it pushed from
            cx.execute(
                "INSERT INTO billing.snapshot_publishes (rows_changed, periods) VALUES (%s, %s)",
                (changed, periods),
            )
    log.info("published the invoice snapshot into %s: %s", published, out)
    return out


def _changed_periods(cx, build: str, published: str) -> list:
    """The periods whose invoices (totals or lines, through ``snapshot_hash``) differ
    between the build and the published snapshot (all built ones on the first publish)."""
    from psycopg import sql

    src = sql.Identifier(build, "fct_invoices")
    dst = sql.Identifier(published, "fct_invoices")
    if not _columns(cx, published, "fct_invoices"):
        q = sql.SQL("SELECT DISTINCT period_start FROM {src} ORDER BY 1").format(src=src)
    else:
        q = sql.SQL(
            "SELECT DISTINCT period_start FROM ("
            "(SELECT invoice_id, period_start, snapshot_hash FROM {src}"
            " EXCEPT SELECT invoice_id, period_start, snapshot_hash FROM {dst})"
            " UNION ALL "
            "(SELECT invoice_id, period_start, snapshot_hash FROM {dst}"
            " EXCEPT SELECT invoice_id, period_start, snapshot_hash FROM {src})) AS x ORDER BY 1"
        ).format(src=src, dst=dst)
    return [r[0] for r in cx.execute(q).fetchall()]


def published_seq(cx, period=None) -> int:
    """The last publish that changed the snapshot, or with ``period`` the last one that
    changed that period's invoices (0 before any)."""
    if period is None:
        q, params = "SELECT coalesce(max(seq), 0) FROM billing.snapshot_publishes", ()
    else:
        q = "SELECT coalesce(max(seq), 0) FROM billing.snapshot_publishes WHERE %s = ANY(periods)"
        params = (period,)
    return cx.execute(q, params).fetchone()[0]


# ---------------------------------------------------------------- Airflow / Cosmos
def dbt_task_group(
    target: str = "postgres",
    *,
    group_id: str | None = None,
    dag=None,
    task_group=None,
    operator_args: Mapping[str, Any] | None = None,
    **kwargs,
):
    """A Cosmos ``DbtTaskGroup`` that builds ``target``'s models for the run's day.

    Rendered from the pre-built manifest (``billing transform --parse``), so DAG parsing
    never runs dbt. Vars come from the task context (data interval), never now().
    """
    from cosmos import (
        DbtTaskGroup,
        ExecutionConfig,
        ProfileConfig,
        ProjectConfig,
        RenderConfig,
    )
    from cosmos.constants import InvocationMode, LoadMode, TestBehavior

    if target not in TARGETS:
        raise ConfigError(f"unknown dbt target {target!r}")
    project_dir = settings.dbt_project_dir()
    manifest = cosmos_manifest_path(target)
    if not manifest.exists():  # normally built by `billing transform --parse`
        parse(target)
    profile_config = ProfileConfig(
        profile_name="billing",
        target_name=target,
        profile_mapping=_profile_mapping(target),
    )
    vars_template = {
        "day": "{{ data_interval_start.strftime('%Y-%m-%d') }}",
        "since": "{{ data_interval_start.strftime('%Y-%m-%d') }}",
        "lateness_days": settings.lateness_days(),
        "invoice_grace_days": settings.invoice_grace_days(),
    }
    args = {
        "install_deps": False,
        "vars": vars_template,
        "env": {"DBT_SEND_ANONYMOUS_USAGE_STATS": "false"},
        "append_env": True,
        **(operator_args or {}),
    }
    if target == "clickhouse":
        # chDB: one process per data path, so the rollups run one dbt process at a time.
        args.setdefault("pool", orchestration.CLICKHOUSE_POOL)
        args.setdefault("max_active_tis_per_dagrun", 1)
    project_config = ProjectConfig(
        dbt_project_path=project_dir,
        manifest_path=manifest,
        project_name="billing",
    )
    # A local file: plain pathlib reads it without ObjectStoragePath, whose lineage hook
    # loads every Airflow plugin and would cost a second at each DAG parse.
    project_config.manifest_path = manifest
    folder = MODEL_FOLDERS[target]
    return DbtTaskGroup(
        group_id=group_id or f"dbt_{folder}",
        project_config=project_config,
        profile_config=profile_config,
        execution_config=ExecutionConfig(
            dbt_executable_path=str(project_dir / "scripts" / "dbt"),
            invocation_mode=InvocationMode.SUBPROCESS,
        ),
        render_config=RenderConfig(
            load_method=LoadMode.DBT_MANIFEST,
            select=[f"path:models/{folder}"],
            test_behavior=TestBehavior.BUILD,  # one `dbt build` per model: run + its tests
            # Tests spanning models (relationships) run once all their parents are built.
            should_detach_multiple_parents_tests=True,
            enable_mock_profile=True,
        ),
        operator_args=args,
        **({"dag": dag} if dag is not None else {}),
        **({"parent_group": task_group} if task_group is not None else {}),
        **kwargs,
    )


def _profile_mapping(target: str):
    if target == "postgres":
        from cosmos.profiles import PostgresUserPasswordProfileMapping

        return PostgresUserPasswordProfileMapping(
            conn_id=conns.POSTGRES, profile_args={"schema": SNAPSHOT_BUILD_SCHEMA}
        )
    from cosmos.profiles.clickhouse.user_pass import ClickhouseUserPasswordProfileMapping

    class BillingClickhouseProfileMapping(ClickhouseUserPasswordProfileMapping):
        """Our ``clickhouse`` connections (HTTP; embedded chDB is routed by scripts/dbt)."""

        airflow_connection_type = "clickhouse"
        default_port = 8123
        required_fields = ["host", "schema"]
        airflow_param_mapping = {
            "host": "host",
            "user": "login",
            "password": "password",
            "port": "port",
            "schema": "schema",
        }

        def _set_default_param(self, profile_dict):
            # TLS and the port as every other ClickHouse client here (connections.clickhouse_http);
            # Cosmos would otherwise always write secure: False.
            secure, port = conns.clickhouse_http(conns.from_airflow(self.conn))
            profile_dict["driver"] = profile_dict.get("driver") or "http"
            profile_dict["user"] = profile_dict.get("user") or "default"
            profile_dict["secure"] = secure
            profile_dict["port"] = port
            return super()._set_default_param(profile_dict)

        @property
        def env_vars(self):
            # Embedded chDB has no password: a secret field may then be empty (not missing).
            if self.get_dbt_value("password") is None:
                saved, self.secret_fields = self.secret_fields, []
                try:
                    return super().env_vars
                finally:
                    self.secret_fields = saved
            return super().env_vars

        @property
        def profile(self):
            profile = super().profile
            if self.get_dbt_value("password") is None:
                profile["password"] = ""
            return profile

    return BillingClickhouseProfileMapping(conn_id=conns.CLICKHOUSE)


# ---------------------------------------------------------------- child process
def _route_clickhouse_through_chdb() -> str | None:
    """If the clickhouse connection is embedded chDB, make dbt-clickhouse's client chDB;
    return the chDB path (None for a ClickHouse server)."""
    try:
        ch = conns.get(conns.CLICKHOUSE)
    except ConfigError:
        return None
    if ch.extra.get("interface") != "chdb":
        return None
    import clickhouse_connect

    path = ch.extra.get("path") or str(settings.local_dir() / "clickhouse")
    Path(path).mkdir(parents=True, exist_ok=True)
    original = clickhouse_connect.get_client

    def get_client(**kwargs):
        return original(
            interface="chdb",
            path=path,
            database=kwargs.get("database"),
            settings=kwargs.get("settings"),
        )

    clickhouse_connect.get_client = get_client
    return path


# dbt commands that run SQL on the target (parse, deps, ls... connect to nothing).
_RUNS_SQL = {"build", "run", "test", "seed", "snapshot", "compile", "show", "docs", "run-operation"}


@contextlib.contextmanager
def _postgres_collection(argv: Sequence[str], chdb_path: str | None):
    """Embedded chDB: the named collection the rollups read Postgres through, for the
    duration of this dbt command only (so the password is on disk, in the 0700 chDB
    folder, only while dbt runs). A ClickHouse server has it provisioned by an admin."""
    runs_sql = _RUNS_SQL & set(argv) and "serve" not in argv  # docs serve: static files
    if chdb_path is None or _child_target(argv) != "clickhouse" or not runs_sql:
        yield
        return
    ch_conn = conns.get(conns.CLICKHOUSE)
    name = analytics.postgres_collection_name(ch_conn)
    ch = analytics.client(ch_conn)
    try:
        analytics.create_postgres_collection(
            ch, name, conns.get(conns.POSTGRES), ch_conn.extra.get("postgres_host")
        )
        yield
    finally:
        try:
            analytics.drop_collection(ch, name)
        finally:
            ch.close()


def _child_target(argv: Sequence[str]) -> str:
    return "clickhouse" if "clickhouse" in argv else "postgres"


def _child_env_from_connections() -> None:
    """Under Cosmos the child gets a profile but not our model env vars: fill them in."""
    target = _child_target(sys.argv)
    try:
        for key, value in dbt_env(target).items():
            os.environ.setdefault(key, value)
    except ConfigError:
        pass


def main(argv: list[str] | None = None) -> int:
    """``python -m billing.transform <dbt args>``: dbt, with chDB routing when configured."""
    from dbt.cli.main import dbtRunner

    argv = list(sys.argv[1:] if argv is None else argv)
    _child_env_from_connections()
    chdb_path = _route_clickhouse_through_chdb()
    os.umask(0o077)  # dbt's target files (compiled SQL, logs, results) are the user's only
    with _postgres_collection(argv, chdb_path):
        result = dbtRunner().invoke(argv)
    if result.exception is not None:
        print(f"dbt: {result.exception}", file=sys.stderr)
        orchestration.leave_failure_cause(f"dbt: {result.exception}")
        return 2
    if not result.success:
        orchestration.leave_failure_cause(_cause_of(result.result))
    return 0 if result.success else 1


def _cause_of(run_result) -> str:
    """The failed nodes and their messages, in one short paragraph (as for the CLI)."""
    lines = []
    for r in getattr(run_result, "results", None) or []:
        status = str(getattr(r, "status", "")).lower()
        if status in ("error", "fail", "runtime error"):
            name = getattr(getattr(r, "node", None), "name", "?")
            lines.append(f"{name}: {' '.join(str(r.message or status).split())}")
    return "; ".join(lines[:8]) or "dbt failed without a node result (see the task log)"


if __name__ == "__main__":
    sys.exit(main())
