"""Run a real ``airflow api-server`` (UI, REST API and the billing plugin) for a while.

Used by the integration tests and the API benchmark; the UI for people is ``billing airflow``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from billing.platform.errors import ServiceError
from billing_dev.stack import process


def answers(base: str) -> bool:
    """The api-server at ``base`` answers (its REST API, with or without a token)."""
    import httpx

    try:
        return httpx.get(f"{base}/api/v2/version", timeout=2).status_code in (200, 401)
    except httpx.TransportError:
        return False


@contextmanager
def run_api_server(
    home: Path,
    env_extra: dict[str, str] | None = None,
    workers: int | None = None,
    timeout: float = 90,
) -> Iterator[tuple[str, int]]:
    """Start the api-server on a free loopback port; yield (base URL, pid); stop it after.

    ``workers``: uvicorn worker processes, default ``BILLING_API_WORKERS`` (each has its
    own connection pool: docs/BILLING_API.md). Its log is ``home/api-server.log``.
    """
    from billing.platform import settings

    workers = workers or settings.api_workers()
    port = process.free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AIRFLOW__API__BASE_URL": base, "NO_PROXY": "127.0.0.1,localhost"}
    env.update(env_extra or {})
    log_path = home / "api-server.log"
    airflow = str(Path(sys.executable).parent / "airflow")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [airflow, "api-server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", str(workers)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    pidfile = home / "api-server.pid"
    pidfile.write_text(f"{proc.pid}\n")
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise ServiceError(f"api-server exited: {process.tail(log_path, 20)}")
            return answers(base)

        try:
            process.wait_until(ready, "airflow api-server", timeout)
        except ServiceError as exc:
            raise ServiceError(f"{exc}; log: {process.tail(log_path, 20)}") from None
        yield base, proc.pid
    finally:
        process.terminate(pidfile, timeout=20)
        proc.wait(timeout=5)
