"""How connections become clients: TLS and default ports, one rule per system (pure)."""

from __future__ import annotations

import json

import pytest

from billing.platform import connections as conns


def _conn(conn_id: str, **fields) -> conns.Conn:
    extra = fields.pop("extra", {})
    base = dict(conn_type="x", host="h.example", port=None, login=None, password=None, schema=None)
    return conns.Conn(conn_id, **{**base, **fields}, extra=extra)


@pytest.mark.parametrize(
    ("extra", "port", "expected"),
    [
        ({}, None, (False, 8123)),
        ({"secure": True}, None, (True, 8443)),
        ({"secure": "true"}, None, (True, 8443)),  # an extra typed in the UI is text
        ({"secure": "false"}, None, (False, 8123)),
        ({"secure": True}, 9440, (True, 9440)),
    ],
)
def test_clickhouse_tls_and_port(extra, port, expected):
    assert conns.clickhouse_http(_conn(conns.CLICKHOUSE, port=port, extra=extra)) == expected


def test_redis_url_plain_and_tls():
    plain = _conn(conns.REDIS, port=6380, password="p@ss", extra={"db": 2})
    assert conns.redis_url(plain) == "redis://:p%40ss@h.example:6380/2"
    tls = _conn(conns.REDIS, password="p", extra={"ssl": True})
    assert conns.redis_url(tls) == "rediss://:p@h.example:6379/0"


@pytest.mark.parametrize(
    ("extra", "secure", "port"), [({}, False, 8123), ({"secure": True}, True, 8443)]
)
def test_the_nightly_rollups_profile_carries_tls(monkeypatch, extra, secure, port):
    """The Cosmos profile of the rollups' task group (a ClickHouse server) connects as
    ``billing sql`` does: Cosmos alone would always write ``secure: False``."""
    from billing.transform.project import _profile_mapping

    monkeypatch.setenv(
        conns.env_var(conns.CLICKHOUSE),
        json.dumps({"conn_type": "clickhouse", "host": "ch.example", "login": "dbt",
                    "password": "pw", "schema": "analytics", "extra": extra}),
    )  # fmt: skip
    profile = _profile_mapping("clickhouse").profile
    assert (profile["secure"], profile["port"], profile["host"]) == (secure, port, "ch.example")
