"""A real ``airflow api-server`` (UI + REST API + the billing plugin) on the test stack.

Shared by the Billing page tests (HTTP and browser): one server per session, on the
stack's own Airflow home and metadata DB, logging in as ``admin`` with the password the
stack writes to ``$AIRFLOW_HOME/passwords.json``. The DAGs are serialized into the metadata
DB first (``airflow dags reserialize``) so that the REST API can trigger them; no
scheduler runs, so triggered runs stay ``queued``.

``scheduler`` is the other setup: a real ``airflow scheduler`` with its own api-server
(module scope), for the tests that drive runs the way the scheduler and the UI do.
``browser`` is headless Chromium (the system's, installed by
``scripts/install-system-deps.sh``; override with ``BILLING_CHROMIUM``) for Playwright.
Outside CI a missing browser skips; in CI (``CI=true``) it fails.

The server runs with a ``sitecustomize`` that records every import of chDB or dbt in
``imports.log``: web processes must never load them (ClickHouse work stays in workers).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import browser_support
import httpx
import pytest

from billing_dev.stack.api_server import run_api_server

FORBIDDEN_IN_WEB = ("chdb", "dbt")

_SITECUSTOMIZE = '''
import os, sys

_LOG = os.environ["BILLING_TEST_IMPORT_LOG"]
_WATCH = tuple(os.environ["BILLING_TEST_FORBIDDEN_IMPORTS"].split(","))


class _Recorder:
    """Records (never blocks) imports of the watched top-level packages."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _WATCH:
            with open(_LOG, "a") as f:
                f.write(f"{os.getpid()} {name}\\n")
        return None


sys.meta_path.insert(0, _Recorder())
'''


@dataclass
class AirflowServer:
    base: str
    password: str
    home: Path
    pid: int

    @property
    def log(self) -> Path:
        return self.home / "api-server.log"

    @property
    def imports_log(self) -> Path:
        return self.home / "imports.log"

    def token(self) -> str:
        r = httpx.post(
            f"{self.base}/auth/token",
            json={"username": "admin", "password": self.password},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        return r.json()["access_token"]

    def forbidden_imports(self) -> list[str]:
        if not self.imports_log.exists():
            return []
        return sorted(set(self.imports_log.read_text().split("\n")) - {""})


@pytest.fixture(scope="session")
def airflow_server(stack, tmp_path_factory) -> Iterator[AirflowServer]:
    """The api-server on the stack's Airflow home, with every DAG serialized."""
    home = tmp_path_factory.mktemp("airflow-server")
    password = json.loads((stack.airflow_home / "passwords.json").read_text())["admin"]
    airflow = str(Path(sys.executable).parent / "airflow")
    r = subprocess.run(
        [airflow, "dags", "reserialize"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    site = home / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = {
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "BILLING_STRIPE_STATUS_TTL_S": "0",
        "BILLING_TEST_IMPORT_LOG": str(home / "imports.log"),
        "BILLING_TEST_FORBIDDEN_IMPORTS": ",".join(FORBIDDEN_IN_WEB),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
    }
    with run_api_server(home, env) as (base, pid):
        yield AirflowServer(base, password, home, pid)


@pytest.fixture(scope="session")
def airflow_client(airflow_server) -> Iterator[httpx.Client]:
    """Authenticated as admin (bearer JWT from POST /auth/token)."""
    token = airflow_server.token()
    with httpx.Client(
        base_url=airflow_server.base, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as c:
        yield c


@pytest.fixture
def latest_reconciliation(airflow_server):
    """A newest reconcile run with two discrepancies (one with markup in its org id)."""
    from billing.platform import db

    key = f"page-test-{uuid.uuid4()}"
    with db.connect(autocommit=True) as cx:
        cx.execute(
            """INSERT INTO billing.reconcile_runs (idempotency_key, run_id, period, tolerance,
                   status, orgs_checked, discrepancies, above_tolerance, max_rel_diff, payload,
                   created_at)
               VALUES (%s, 'manual__page_test', '2031-07-01', 0.005, 'failed', 3, 2, 1, 0.25,
                       '{}', now() + interval '1 day')""",
            (key,),
        )
        for org, status, above, i_cents, s_cents, rel in (
            ("<b>evil</b>", "mismatch", True, 1000, 1250, "0.25"),
            ("page-org-2", "within_tolerance", False, 100000, 100100, "0.001"),
            ("page-org-3", "match", False, 500, 500, "0"),
        ):
            cx.execute(
                """INSERT INTO billing.billing_audit (idempotency_key, run_id, period, org_id,
                       status, is_above_tolerance, internal_cents, stripe_cents,
                       internal_currency, stripe_currency, abs_diff_cents, rel_diff,
                       stripe_source)
                   VALUES (%s, 'manual__page_test', '2031-07-01', %s, %s, %s, %s, %s, 'usd',
                           'usd', %s, %s, 'items')""",
                (key, org, status, above, i_cents, s_cents, abs(s_cents - i_cents), rel),
            )
    yield key
    with db.connect(autocommit=True) as cx:
        cx.execute("DELETE FROM billing.billing_audit WHERE idempotency_key = %s", (key,))
        cx.execute("DELETE FROM billing.reconcile_runs WHERE idempotency_key = %s", (key,))


@pytest.fixture
def parked_customer(airflow_server):
    """A parked customer write for a fresh org (Stripe accepts it on retry)."""
    from billing.platform import db
    from billing.stripe_sync import outbox, parking, push

    org = f"page-{uuid.uuid4().hex[:10]}"
    write = push.customer_write({"org_id": org, "name": "Page Test"}, dt.date(2026, 1, 1))
    with db.transaction() as cx:
        outbox.enqueue(cx, [write])
        row = outbox.get(cx, write.idempotency_key)
        cx.execute(
            "UPDATE billing.stripe_outbox SET attempts = 1 WHERE outbox_id = %s",
            (row["outbox_id"],),
        )
        outbox.mark_parked(cx, row["outbox_id"])  # as the engine parks a refused write
        row = outbox.get(cx, write.idempotency_key)
    parking.park(parking.client(), row, "injected by the page test", "api_connection")
    yield write.idempotency_key
    parking.unpark(parking.client(), write.idempotency_key)  # leave no parked write behind
    with db.transaction() as cx:
        cx.execute(
            """UPDATE billing.stripe_outbox SET status = 'cancelled'
                WHERE idempotency_key = %s AND status <> 'sent'""",
            (write.idempotency_key,),
        )


# ------------------------------------------------------------------ a real scheduler
@dataclass
class Scheduler:
    """``airflow scheduler`` and the api-server its task workers report to."""

    base: str
    password: str
    client: httpx.Client  # admin, bearer JWT
    log: Path


@pytest.fixture(scope="module")
def scheduler(stack, tmp_path_factory) -> Iterator[Scheduler]:
    """``airflow scheduler`` (LocalExecutor, the stack's metadata DB) plus its own api-server
    (REST API, UI, and the execution API its workers report to, with the same JWT secret).

    Runs that earlier tests of this session left queued (no scheduler ran them) are deleted
    first, so the scheduler starts only the runs this module makes. DAGs the module unpaused
    are paused again, and both processes are stopped, after the module."""
    from billing_dev.stack.api_server import run_api_server

    home = tmp_path_factory.mktemp("scheduler")
    airflow = str(Path(sys.executable).parent / "airflow")
    r = subprocess.run([airflow, "dags", "reserialize"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    password = json.loads((stack.airflow_home / "passwords.json").read_text())["admin"]
    shared = {"AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32)}
    with run_api_server(home, shared) as (base, _pid):
        token = httpx.post(
            f"{base}/auth/token", json={"username": "admin", "password": password}, timeout=30
        ).json()["access_token"]
        client = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )
        dags = client.get("/api/v2/dags", params={"tags": "billing", "limit": 100}).json()["dags"]
        for dag in dags:
            left = client.get(
                f"/api/v2/dags/{dag['dag_id']}/dagRuns",
                params={"state": ["queued", "running"], "limit": 100},
            ).json()["dag_runs"]
            for run in left:  # a running run can't be deleted: fail it first
                path = f"/api/v2/dags/{dag['dag_id']}/dagRuns/{run['dag_run_id']}"
                if run["state"] == "running":
                    r = client.patch(path, json={"state": "failed"})
                    assert r.status_code == 200, r.text
                r = client.delete(path)
                assert r.status_code == 204, r.text
        paused = {d["dag_id"] for d in dags if d["is_paused"]}
        env = {
            **os.environ,
            **shared,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
            "BILLING_RETRY_DELAY_SECONDS": "1",
        }
        log_path = home / "scheduler.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [airflow, "scheduler"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            yield Scheduler(base, password, client, log_path)
        finally:
            for dag_id in sorted(paused):
                client.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": True})
            client.close()
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# ------------------------------------------------------------------ a real browser
@pytest.fixture(scope="module")
def browser():
    exe = browser_support.chromium_path()
    if exe is None:
        browser_support.missing("no Chromium: apt-get install chromium, or set BILLING_CHROMIUM")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser_support.missing("the playwright package is not installed (requirements-dev.txt)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=exe, headless=True, args=browser_support.CHROMIUM_FLAGS
        )
        try:
            yield b
        finally:
            b.close()
