"""Connections to the outside world, resolved the way Airflow resolves them.

``AIRFLOW_CONN_<ID>`` environment variables (JSON or URI form) are read directly, so the
CLI and tests don't pay for importing Airflow; any other secrets backend configured in
Airflow is consulted as a fallback. Production and the embedded stack differ only in
what these connections say.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from billing.platform.errors import ConfigError

POSTGRES = "billing_postgres"
CLICKHOUSE = "billing_clickhouse"
REDIS = "billing_redis"
STRIPE = "stripe_default"  # the name the Stripe provider and the playbook use
SMTP = "billing_smtp"
ALL = (POSTGRES, CLICKHOUSE, REDIS, STRIPE, SMTP)


@dataclass(frozen=True)
class Conn:
    conn_id: str
    conn_type: str
    host: str | None = None
    port: int | None = None
    login: str | None = None
    password: str | None = field(default=None, repr=False)
    schema: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        body = {
            "conn_type": self.conn_type,
            "host": self.host,
            "port": self.port,
            "login": self.login,
            "password": self.password,
            "schema": self.schema,
            "extra": self.extra,
        }
        return json.dumps({k: v for k, v in body.items() if v not in (None, {}, "")})


def env_var(conn_id: str) -> str:
    return f"AIRFLOW_CONN_{conn_id.upper()}"


def _parse(conn_id: str, raw: str) -> Conn:
    raw = raw.strip()
    if raw.startswith("{"):
        d = json.loads(raw)
        extra = d.get("extra") or {}
        if isinstance(extra, str):
            extra = json.loads(extra) if extra else {}
        return Conn(
            conn_id=conn_id,
            conn_type=d.get("conn_type", ""),
            host=d.get("host"),
            port=int(d["port"]) if d.get("port") else None,
            login=d.get("login"),
            password=d.get("password"),
            schema=d.get("schema"),
            extra=extra,
        )
    parts = urlsplit(raw)
    extra = dict(parse_qsl(parts.query))
    if "__extra__" in extra:
        extra = json.loads(extra["__extra__"])
    return Conn(
        conn_id=conn_id,
        conn_type=parts.scheme.replace("-", "_"),
        host=unquote(parts.hostname) if parts.hostname else None,
        port=parts.port,
        login=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        schema=unquote(parts.path.lstrip("/")) or None,
        extra=extra,
    )


def get(conn_id: str) -> Conn:
    """Return the connection ``conn_id`` from the environment or Airflow's secrets backends."""
    raw = os.environ.get(env_var(conn_id))
    if raw:
        try:
            return _parse(conn_id, raw)
        except (ValueError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"connection {conn_id}: cannot parse {env_var(conn_id)}: {exc}"
            ) from None
    try:
        from airflow.sdk import BaseHook

        c = BaseHook.get_connection(conn_id)
    except Exception as exc:  # Airflow raises its own not-found type per version
        raise ConfigError(
            f"connection {conn_id} is not configured (set {env_var(conn_id)} or run 'billing stack up')"
        ) from exc
    return from_airflow(c)


def from_airflow(c) -> Conn:
    """An Airflow ``Connection`` (a secrets backend's, a hook's) as a :class:`Conn`."""
    return Conn(c.conn_id, c.conn_type, c.host, c.port, c.login, c.password, c.schema,
                c.extra_dejson)  # fmt: skip


def postgres_dsn(conn: Conn | None = None) -> str:
    """libpq connection string for psycopg."""
    c = conn or get(POSTGRES)
    parts = {
        "host": c.host or "127.0.0.1",
        "port": c.port or 5432,
        "dbname": c.schema or "billing",
        "user": c.login,
        "password": c.password,
        "application_name": "billing",
    }
    for key in ("sslmode", "connect_timeout", "options"):
        if key in c.extra:
            parts[key] = c.extra[key]
    return " ".join(f"{k}={_libpq_quote(str(v))}" for k, v in parts.items() if v is not None)


def _libpq_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _flag(value) -> bool:
    """A yes/no connection extra, as JSON (true) or as text ("true", "1", "yes")."""
    return str(value).lower() in ("1", "true", "yes")


def redis_url(conn: Conn | None = None) -> str:
    """``redis://`` or, with ``extra.ssl`` (as Airflow's Redis connection has it), ``rediss://``
    (TLS, the server certificate verified)."""
    c = conn or get(REDIS)
    auth = f":{quote(c.password, safe='')}@" if c.password else ""
    db = c.extra.get("db", 0)
    scheme = "rediss" if _flag(c.extra.get("ssl", False)) else "redis"
    return f"{scheme}://{auth}{c.host or '127.0.0.1'}:{c.port or 6379}/{db}"


def clickhouse_http(conn: Conn) -> tuple[bool, int]:
    """A ClickHouse server connection's (TLS on, port): ``extra.secure`` turns TLS on, and
    the port defaults to ClickHouse's HTTP(S) port for it (8443 with TLS, else 8123).
    ``billing sql``, the dbt runs and the nightly rollups all connect this way."""
    secure = _flag(conn.extra.get("secure", False))
    return secure, conn.port or (8443 if secure else 8123)


def redact(uri: str) -> str:
    """Hide the password of a URI for printing."""
    parts = urlsplit(uri)
    if parts.password is not None:  # the raw userinfo, however the password is encoded
        userinfo, hostport = parts.netloc.rsplit("@", 1)
        return parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{hostport}").geturl()
    return uri
