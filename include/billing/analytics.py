"""The analytics store (ClickHouse): an embedded chDB path locally, a server in production.

Only the ``billing_clickhouse`` connection decides which: ``extra.interface = "chdb"`` with
``extra.path`` selects the in-process engine; anything else is a ClickHouse server over
HTTP(S). chDB allows one process per data path, so callers keep ClickHouse work in one
process at a time (the ``billing_clickhouse`` pool in Airflow).
"""

from __future__ import annotations

import re

from billing import connections as conns
from billing.errors import ConfigError

_READ_ONLY = re.compile(r"^\s*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXPLAIN|EXISTS)\b", re.IGNORECASE)


def is_embedded(conn: conns.Conn | None = None) -> bool:
    c = conn or conns.get(conns.CLICKHOUSE)
    return c.extra.get("interface") == "chdb"


def client(conn: conns.Conn | None = None, **settings):
    import clickhouse_connect

    c = conn or conns.get(conns.CLICKHOUSE)
    if is_embedded(c):
        path = c.extra.get("path")
        if not path:
            raise ConfigError("connection billing_clickhouse: interface chdb needs extra.path")
        return clickhouse_connect.get_client(interface="chdb", path=path, settings=settings or None)
    secure = str(c.extra.get("secure", "false")).lower() in ("1", "true", "yes")
    return clickhouse_connect.get_client(
        host=c.host or "localhost",
        port=c.port or (8443 if secure else 8123),
        username=c.login or "default",
        password=c.password or "",
        database=c.schema or "default",
        secure=secure,
        settings=settings or None,
    )


def read_only_query(sql: str):
    """Run an analyst's query; refuse anything that is not a read."""
    if not _READ_ONLY.match(sql) or ";" in sql.strip().rstrip(";"):
        raise ConfigError(
            "only a single read-only statement (SELECT/WITH/SHOW/DESCRIBE/EXPLAIN) is allowed"
        )
    c = client(readonly=1) if not is_embedded() else client()
    return c.query(sql.strip().rstrip(";"))
