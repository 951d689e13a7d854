"""`billing stack` as a user runs it: idempotent up, clean down, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def billing(*args, env=None, check=False):
    return subprocess.run(
        [sys.executable, "-m", "billing.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        check=check,
        timeout=300,
    )


@pytest.fixture
def own_stack_env(tmp_path):
    """A second, independent stack in a temporary folder (as a second checkout would have)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW_CONN_", "BILLING_", "AIRFLOW_"))
    }
    env["BILLING_LOCAL_DIR"] = str(tmp_path / "local")
    yield env
    billing("stack", "destroy", env=env)  # also PostgreSQL's folder outside tmp_path, if any


def _pids(root):
    run = root / "run"
    pids = [int(p.read_text()) for p in run.glob("*.pid")] if run.exists() else []
    pg = json.loads((root / "stack.json").read_text())["postgres"]["base_dir"]
    pm = os.path.join(pg, "data", "postmaster.pid")
    if os.path.exists(pm):
        pids.append(int(open(pm).readline()))
    return pids


def _alive(pid):
    from billing_dev.stack.process import pid_alive

    return pid_alive(pid)


def test_up_twice_is_harmless_and_down_stops_everything(own_stack_env, stack):
    root = own_stack_env["BILLING_LOCAL_DIR"]
    first = billing("stack", "up", env=own_stack_env)
    assert first.returncode == 0, first.stderr
    ports_before = json.loads(open(os.path.join(root, "stack.json")).read())["ports"]
    second = billing("stack", "up", env=own_stack_env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("already running") == 4  # postgres, redis, stripe, smtp
    assert json.loads(open(os.path.join(root, "stack.json")).read())["ports"] == ports_before

    out = billing("stack", "status", "--format", "json", env=own_stack_env, check=True).stdout
    status = json.loads(out)
    assert {
        s["state"] for n, s in status.items() if n in ("postgres", "redis", "stripe", "smtp")
    } == {"running"}
    # Passwords stay in their 0600 files unless asked for explicitly.
    secrets = json.loads(open(os.path.join(root, "stack.json")).read())["secrets"]
    assert secrets["postgres_password"] not in out and secrets["redis_password"] not in out
    assert status["postgres"]["uri"].startswith("postgresql://billing:***@127.0.0.1:")
    assert status["redis"]["uri"].startswith("redis://:***@127.0.0.1:")
    shown = json.loads(
        billing(
            "stack", "status", "--format", "json", "--show-secrets", env=own_stack_env, check=True
        ).stdout
    )
    assert f":{secrets['postgres_password']}@" in shown["postgres"]["uri"]
    assert f":{secrets['redis_password']}@" in shown["redis"]["uri"]
    for name in ("stack.json", "stack.env", "airflow/passwords.json", "redis/redis.conf"):
        assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o600, name
    for name in ("airflow", "redis", "clickhouse"):
        assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o700, name
    # The second stack has its own ports, so two checkouts run side by side.
    main_ports = json.loads(stack.state_file.read_text())["ports"]
    assert set(ports_before.values()).isdisjoint(main_ports.values())

    from pathlib import Path

    pids = _pids(Path(root))
    assert len(pids) == 4 and all(_alive(p) for p in pids)
    down = billing("stack", "down", env=own_stack_env)
    assert down.returncode == 0, down.stderr
    assert not any(_alive(p) for p in pids)
    status = json.loads(
        billing("stack", "status", "--format", "json", env=own_stack_env, check=True).stdout
    )
    assert {
        s["state"] for n, s in status.items() if n in ("postgres", "redis", "stripe", "smtp")
    } == {"stopped"}


def _password_works(state: dict) -> bool:
    import psycopg

    from billing.platform import connections as conns
    from billing_dev.stack.manager import Stack

    c = Stack(Path("/nonexistent")).connections(state)[conns.POSTGRES]
    with psycopg.connect(conns.postgres_dsn(c), connect_timeout=10) as cx:
        return cx.execute("SELECT current_user").fetchone() == ("billing",)


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL leaves the root only when run as root")
def test_destroy_removes_postgres_outside_the_checkout_and_a_re_up_starts_afresh(own_stack_env):
    """tmp_path is inside a 0700 folder the unprivileged postgres user cannot enter (like a
    checkout under /root), so PostgreSQL's data lives in /var/tmp/billing-<hash>: `stack
    destroy` (make clean) removes it, and so does the next `up` after a bare `rm -rf`."""
    from billing_dev.stack.manager import Stack

    root = Path(own_stack_env["BILLING_LOCAL_DIR"])
    stack = Stack(root)

    def up() -> dict:
        out = billing("stack", "up", env=own_stack_env)
        assert out.returncode == 0, out.stderr
        return json.loads(stack.state_file.read_text())

    first = up()
    assert first["postgres"]["base_dir"] == str(stack.external_dir / "postgres")
    assert (stack.external_dir / "postgres" / "data" / "PG_VERSION").exists()
    pids = _pids(root)
    assert len(pids) == 4 and all(_alive(p) for p in pids)

    out = billing("stack", "destroy", env=own_stack_env)
    assert out.returncode == 0, out.stderr
    assert not any(_alive(p) for p in pids)
    assert not stack.external_dir.exists()
    assert sorted(os.listdir(root)) == []

    second = up()  # a new stack: new passwords, and PostgreSQL accepts the new one
    assert second["secrets"]["postgres_password"] != first["secrets"]["postgres_password"]
    assert _password_works(second)

    # The old `make clean` (stop, then rm -rf the root) left the data with the old password.
    assert billing("stack", "down", env=own_stack_env).returncode == 0
    shutil.rmtree(root)
    assert (stack.external_dir / "postgres" / "data" / "PG_VERSION").exists()
    third = up()
    assert third["secrets"]["postgres_password"] != second["secrets"]["postgres_password"]
    assert _password_works(third)


def test_taken_port_is_a_one_line_error(own_stack_env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        env = {**own_stack_env, "BILLING_PORT_POSTGRES": str(port)}
        out = billing("stack", "up", env=env)
    assert out.returncode == 3
    assert out.stderr.strip() == (
        f"billing: error: port {port} for postgres is taken by another process; "
        "free it or set BILLING_PORT_POSTGRES"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run-day", "2026-13-01"], "invalid day '2026-13-01': expected YYYY-MM-DD"),
        (["run-day", "yesterday"], "invalid day 'yesterday': expected YYYY-MM-DD"),
        (["orgs", "import", "/nonexistent/orgs.csv"], "no such file: /nonexistent/orgs.csv"),
        (
            ["generate-usage", "--day", "2026-11-01", "--orgs", "0", "--events", "5"],
            "expected a positive integer",
        ),
        (["stack", "sideways"], "invalid choice: 'sideways'"),
    ],
)
def test_bad_invocation_is_one_line(args, message):
    out = billing(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert message in lines[0]
    assert "Traceback" not in out.stderr


def test_bad_orgs_csv_is_one_line_and_writes_nothing(stack, clean_db, tmp_path, pg):
    bad = tmp_path / "orgs.csv"
    bad.write_text(
        "org_id,name,email,plan,currency\norg-a,A,a@example.test,starter,usd\n"
        "org-b,B,not-an-email,starter,usd\n"
    )
    out = billing("orgs", "import", str(bad))
    assert out.returncode == 2
    assert out.stderr.strip() == f"billing: error: {bad}:3: email 'not-an-email' is not an address"
    assert pg.execute("SELECT count(*) FROM billing.organizations").fetchone()[0] == 0


def test_orgs_import_upserts_by_org_id(stack, clean_db, tmp_path, pg):
    f = tmp_path / "orgs.csv"
    f.write_text("org_id,name,email,plan,currency\norg-a,A,a@example.test,starter,usd\n")
    assert billing("orgs", "import", str(f)).returncode == 0
    f.write_text(
        "org_id,name,email,plan,currency\norg-a,A2,a2@example.test,starter,usd\n"
        "org-b,Zürich GmbH,b@example.test,starter,usd\n"
    )
    out = billing("orgs", "import", str(f))
    assert out.returncode == 0, out.stderr
    rows = pg.execute("SELECT org_id, name, email FROM billing.organizations ORDER BY 1").fetchall()
    assert rows == [("org-a", "A2", "a2@example.test"), ("org-b", "Zürich GmbH", "b@example.test")]
