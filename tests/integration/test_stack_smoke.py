"""Each embedded service really answers, reached only through the configured connections."""

from __future__ import annotations

import email
import json
import uuid

import pytest

from billing.platform import connections as conns

pytestmark = pytest.mark.integration


def test_postgres_answers_sql(pg):
    assert pg.execute("SELECT 6 * 7").fetchone()[0] == 42
    versions = [
        r[0] for r in pg.execute("SELECT version FROM billing.schema_migrations ORDER BY 1")
    ]
    assert versions[0] == "0001_foundation.sql"


def test_clickhouse_answers_sql(stack):
    """chDB through clickhouse-connect, run in a child process (one process per chDB path)."""
    import subprocess
    import sys

    code = (
        "from billing.platform import analytics\n"
        "c = analytics.client()\n"
        "print(c.query('SELECT sum(number) FROM numbers(10)').result_rows[0][0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "45"


def test_redis_answers_ping(stack):
    import redis

    r = redis.Redis.from_url(conns.redis_url())
    assert r.ping() is True
    r.set("billing:smoke", "ok")
    assert r.get("billing:smoke") == b"ok"


def test_stripe_emulator_creates_a_customer(stack):
    import stripe

    c = conns.get(conns.STRIPE)
    client = stripe.StripeClient(c.password, base_addresses={"api": c.host})
    org = f"smoke-{uuid.uuid4().hex[:8]}"
    cus = client.v1.customers.create(
        params={"email": f"{org}@example.test", "metadata": {"org_id": org}}
    )
    assert cus.id.startswith("cus_")
    assert client.v1.customers.retrieve(cus.id).metadata["org_id"] == org


def test_smtp_sink_receives_an_email(stack):
    from billing.platform import mailer, settings

    subject = f"smoke {uuid.uuid4().hex}"
    msg_id = mailer.send(mailer.build("someone@example.test", subject, "hello from the smoke test"))
    files = [p for p in settings.mail_dir().glob("*.eml") if subject in p.read_text()]
    assert len(files) == 1
    parsed = email.message_from_bytes(files[0].read_bytes())
    assert parsed["Message-ID"] == msg_id
    assert parsed["To"] == "someone@example.test"


def test_status_json_lists_every_service(stack):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "billing.cli", "stack", "status", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    status = json.loads(out.stdout)
    assert set(status) == {"postgres", "clickhouse", "redis", "stripe", "smtp", "airflow"}
    for name in ("postgres", "redis", "stripe", "smtp"):
        assert status[name]["state"] == "running", name
    assert status["clickhouse"]["state"] == "ready"
    assert status["postgres"]["uri"].startswith("postgresql://billing:")
