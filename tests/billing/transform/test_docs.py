"""`billing docs`: dbt docs per warehouse, generated apart and served on localhost."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _billing(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "billing.cli", *argv],
        capture_output=True,
        text=True,
        env=os.environ,
        **kw,
    )


def test_generate_keeps_each_warehouse_apart_and_serve_answers(stack):
    from billing.transform import project as transform

    done = _billing("docs", "generate", check=False)
    assert done.returncode == 0, done.stderr
    manifests = {
        t: json.loads((transform.target_path(t) / "manifest.json").read_text())
        for t in transform.TARGETS
    }
    # Each target's docs describe its own warehouse only: nothing overwrote the other.
    models = {
        t: {n["name"] for n in m["nodes"].values() if n["resource_type"] == "model"}
        for t, m in manifests.items()
    }
    pg_nodes, ch_nodes = models["postgres"], models["clickhouse"]
    assert {"fct_invoices", "fct_invoice_lines", "fct_daily_charges"} <= pg_nodes
    assert not pg_nodes & {"fct_usage_hourly", "fct_usage_daily", "fct_usage_monthly"}
    assert {"fct_usage_hourly", "fct_usage_daily", "fct_usage_monthly"} <= ch_nodes
    assert not ch_nodes & {"fct_invoices", "fct_invoice_lines"}
    for t in transform.TARGETS:
        assert (transform.target_path(t) / "index.html").stat().st_size > 0

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "billing.cli", "docs", "serve", "--target", "clickhouse"]
        + ["--port", str(port)],
        env=os.environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # readiness: the port accepts, bounded by the deadline
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"docs server did not start: {server.stdout.read()}")
                time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/manifest.json", timeout=10) as r:
            served = json.loads(r.read())
        assert set(served["nodes"]) == set(manifests["clickhouse"]["nodes"])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200 and b"dbt" in r.read()
    finally:
        server.terminate()
        server.wait(timeout=30)
    # Stopping `billing docs serve` stopped the server itself: nothing is left listening.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_serve_before_generate_is_one_line(stack, tmp_path, monkeypatch):
    from billing.transform import project as transform

    missing = transform.target_path("clickhouse") / "catalog.json"
    if missing.exists():
        missing.rename(tmp_path / "catalog.json")
    try:
        done = _billing("docs", "serve", "--target", "clickhouse", check=False)
        assert done.returncode != 0
        assert done.stderr.strip().splitlines() == [
            "billing: error: no docs for clickhouse yet: run "
            "`billing docs generate --target clickhouse`"
        ]
    finally:
        if (tmp_path / "catalog.json").exists():
            (tmp_path / "catalog.json").rename(missing)
