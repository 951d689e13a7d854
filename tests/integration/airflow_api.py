"""Start a real ``airflow api-server`` for tests (shared by the API and Billing page tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from billing.stack import process


@contextmanager
def run_api_server(home: Path, env_extra: dict[str, str]) -> Iterator[tuple[str, int]]:
    """Start ``airflow api-server`` on a free port; yield (base URL, pid); stop it after."""
    port = process.free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "AIRFLOW__API__BASE_URL": base,
        "NO_PROXY": "127.0.0.1,localhost",
        **env_extra,
    }
    log = (home / "api-server.log").open("wb")
    airflow = str(Path(sys.executable).parent / "airflow")
    proc = subprocess.Popen(
        [airflow, "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"api-server exited: {(home / 'api-server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/api/v2/version", timeout=2).status_code in (200, 401):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"api-server not ready in 90 s: {(home / 'api-server.log').read_text()[-3000:]}"
                )
            time.sleep(0.25)
        yield base, proc.pid
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()
