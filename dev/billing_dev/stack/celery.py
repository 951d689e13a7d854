"""The distributed mode of the local stack: Airflow as production runs it, on one machine.

``billing stack up --executor celery`` starts, on top of the stack's services:

* the metadata DB in a database of its own (``airflow_celery``) on the stack's PostgreSQL;
* Redis as the Celery broker (database 1; the product's keys stay in database 0);
* ``airflow api-server`` (UI, REST API and the execution API that task processes report
  to), ``airflow scheduler`` and ``airflow dag-processor``;
* ``airflow celery worker`` x N (default 2), each with its own working and temporary
  directory, so no task can count on another task's local files.

Nothing here is a fake: the scheduler hands task workloads to the workers through Redis,
exactly as on a cluster. Everything lives under ``<stack root>/celery/``; the Airflow home
is its own (``celery/airflow``), so the single-process Airflow of ``billing airflow`` and
``billing run-day`` (SQLite) is untouched. The embedded chDB allows one process per data
path: the ``billing_clickhouse`` pool (one slot, held by the scheduler for every worker)
keeps ClickHouse work to one task at a time, which holds here because both workers share
this machine's disk. On a real cluster use a ClickHouse server (docs/DEPLOYMENT.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote

from billing.platform import connections as conns
from billing.platform.errors import ServiceError
from billing_dev.stack import process
from billing_dev.stack.api_server import answers
from billing_dev.stack.manager import POOLS, Stack, private_dir, write_private

METADATA_DB = "airflow_celery"
BROKER_DB = 1
DEFAULT_WORKERS = 2
WORKER_CONCURRENCY = 2
# Local speed-ups, production keeps Airflow's defaults: a task whose process stops
# heartbeating (its worker was killed) is failed, and retried, after this many seconds.
HEARTBEAT_TIMEOUT_S = 20


@dataclass
class CeleryCluster:
    stack: Stack
    workers: int = DEFAULT_WORKERS

    # ---------- layout ----------
    @property
    def root(self) -> Path:
        return self.stack.root / "celery"

    @property
    def home(self) -> Path:
        return self.root / "airflow"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def worker_dir(self, n: int) -> Path:
        return self.root / f"worker-{n}"

    def worker_name(self, n: int) -> str:
        return f"worker-{n}"

    def pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    @property
    def components(self) -> list[str]:
        return [
            "api-server",
            "scheduler",
            "dag-processor",
            *(self.worker_name(n) for n in range(1, self.workers + 1)),
        ]

    # ---------- configuration ----------
    def _state(self) -> dict:
        state = self.stack.load_state()
        if not state:
            raise ServiceError("the local stack has never been started: run 'billing stack up'")
        ports = state["ports"]
        sec = state["secrets"]
        changed = False
        if "airflow_celery" not in ports:
            ports["airflow_celery"] = process.free_port()
            changed = True
        for key in ("airflow_jwt_secret", "airflow_api_secret"):
            if key not in sec:
                sec[key] = secrets.token_hex(32)
                changed = True
        if changed:
            self.stack.save_state(state)
        return state

    @property
    def base_url(self) -> str:
        return _base_url(self._state())

    def env(self) -> dict[str, str]:
        """The stack's environment with Airflow switched to the distributed setup: the
        metadata DB and the broker are the stack's own PostgreSQL and Redis."""
        state = self._state()
        p, s = state["ports"], state["secrets"]
        stack_conns = self.stack.connections(state)
        pg_conn = stack_conns[conns.POSTGRES]
        pg = f"{pg_conn.login}:{quote(pg_conn.password, safe='')}@{pg_conn.host}:{pg_conn.port}"
        redis = conns.redis_url(replace(stack_conns[conns.REDIS], extra={"db": BROKER_DB}))
        base = _base_url(state)
        return {
            **self.stack.env(state),
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(self.workers * WORKER_CONCURRENCY),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{pg}/{METADATA_DB}",
            "AIRFLOW__CELERY__BROKER_URL": redis,
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql://{pg}/{METADATA_DB}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(WORKER_CONCURRENCY),
            "AIRFLOW__API__PORT": str(p["airflow_celery"]),
            "AIRFLOW__API__BASE_URL": base,
            "AIRFLOW__API__SECRET_KEY": s["airflow_api_secret"],
            "AIRFLOW__API_AUTH__JWT_SECRET": s["airflow_jwt_secret"],
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.log_dir / "tasks"),
            "AIRFLOW__SCHEDULER__STANDALONE_DAG_PROCESSOR": "True",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "BILLING_RETRY_DELAY_SECONDS": os.environ.get("BILLING_RETRY_DELAY_SECONDS", "5"),
        }

    def worker_env(self, n: int) -> dict[str, str]:
        """A worker's own folders: its working directory and TMPDIR (tempfile's)."""
        here = private_dir(self.worker_dir(n))
        tmp = private_dir(here / "tmp")
        return {**self.env(), "TMPDIR": str(tmp), "BILLING_CELERY_WORKER": self.worker_name(n)}

    # ---------- setup ----------
    def _metadata_db(self) -> str:
        from psycopg import sql

        from billing.platform import db

        with db.connect(autocommit=True) as cx:
            if cx.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (METADATA_DB,)
            ).fetchone():
                return "exists"
            cx.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(METADATA_DB)))
        return "created"

    def _airflow(self, *args: str) -> None:
        airflow = str(Path(sys.executable).parent / "airflow")
        r = subprocess.run([airflow, *args], env={**os.environ, **self.env()}, capture_output=True,
                           text=True)  # fmt: skip
        if r.returncode != 0:
            tail = (r.stderr.strip() or r.stdout.strip()).splitlines()[-3:]
            raise ServiceError(f"airflow {' '.join(args[:2])} failed: {' | '.join(tail)}")

    def _prepare(self) -> str:
        home = private_dir(self.home)
        for d in (self.run_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        password = self.stack.load_state()["secrets"]["airflow_password"]
        write_private(home / "passwords.json", json.dumps({"admin": password}))
        created = self._metadata_db()
        self._airflow("db", "migrate")
        pools = home / "pools.json"
        pools.write_text(json.dumps(POOLS, indent=2))
        self._airflow("pools", "import", str(pools))
        return f"metadata DB {METADATA_DB} {created}, migrated, pools set"

    # ---------- processes ----------
    def _argv(self, name: str) -> list[str]:
        airflow = str(Path(sys.executable).parent / "airflow")
        if name == "api-server":
            port = self._state()["ports"]["airflow_celery"]
            return [airflow, "api-server", "--host", "127.0.0.1", "--port", str(port),
                    "--workers", "1"]  # fmt: skip
        if name in ("scheduler", "dag-processor"):
            return [airflow, name]
        return [airflow, "celery", "worker", "--celery-hostname", f"{name}@%h",
                "--concurrency", str(WORKER_CONCURRENCY), "--skip-serve-logs",
                "--without-gossip", "--without-mingle"]  # fmt: skip

    def _start(self, name: str) -> str:
        pidfile = self.pidfile(name)
        if process.read_pid(pidfile) is not None:
            return "running"
        if name.startswith("worker-"):
            n = int(name.removeprefix("worker-"))
            env, cwd = self.worker_env(n), self.worker_dir(n)
        else:
            env, cwd = self.env(), self.root
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                self._argv(name), cwd=cwd, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            )  # fmt: skip
        pidfile.write_text(f"{proc.pid}\n")
        return "started"

    def _workers_registered(self) -> bool:
        """Every worker answers a Celery ping through the broker."""
        from celery import Celery

        app = Celery(broker=self.env()["AIRFLOW__CELERY__BROKER_URL"])
        try:
            replies = app.control.ping(timeout=2.0) or []
        finally:
            app.close()
        names = {name.split("@")[0] for reply in replies for name in reply}
        return names >= {self.worker_name(n) for n in range(1, self.workers + 1)}

    def up(self) -> dict[str, str]:
        """Start every component (idempotent: running ones are left alone) and wait until
        the API answers and every worker is registered with the broker."""
        result = {"metadata": self._prepare()}
        for name in self.components:
            result[name] = self._start(name)

        def ready() -> bool:
            for name in self.components:
                if process.read_pid(self.pidfile(name)) is None:
                    log = self.log_dir / f"{name}.log"
                    raise ServiceError(f"{name} exited during start: {process.tail(log, 10)}")
            return answers(self.base_url)

        process.wait_until(ready, "the celery cluster's api-server", timeout=120)
        process.wait_until(self._workers_registered, "the celery workers", timeout=120)
        return result

    def down(self) -> dict[str, str]:
        names = [*self.components]
        for path in sorted(self.run_dir.glob("worker-*.pid")):  # also workers beyond N
            if path.stem not in names:
                names.append(path.stem)
        return {
            name: "stopped" if process.terminate(self.pidfile(name), timeout=30) else "not running"
            for name in reversed(names)
        }

    def status(self) -> dict[str, dict]:
        out = {}
        for name in self.components:
            pid = process.read_pid(self.pidfile(name))
            out[name] = {"state": "running" if pid else "stopped", "pid": pid}
        out["api-server"]["uri"] = self.base_url
        return out

    # ---------- faults ----------
    def worker_pids(self) -> dict[str, int]:
        return {
            name: pid
            for name in self.components
            if name.startswith("worker-") and (pid := process.read_pid(self.pidfile(name)))
        }

    def worker_of(self, pid: int) -> str | None:
        """The worker whose process tree holds ``pid`` (a task process), if any."""
        workers = {pid: name for name, pid in self.worker_pids().items()}
        while pid > 1:
            if pid in workers:
                return workers[pid]
            pid = _parent(pid)
        return None

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL a worker and every process under it, as a machine that dies would: no
        shutdown, no goodbye to the broker. Returns the pids killed."""
        root = process.read_pid(self.pidfile(name))
        if root is None:
            raise ServiceError(f"{name} is not running")
        tree = [root, *_descendants(root)]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(root, signal.SIGKILL)
        process.wait_until(lambda: not any(process.pid_alive(p) for p in tree), f"{name} dead", 10)
        self.pidfile(name).unlink(missing_ok=True)
        return tree


def _parent(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            children.setdefault(_parent(int(entry.name)), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _base_url(state: dict) -> str:
    return f"http://127.0.0.1:{state['ports']['airflow_celery']}"
