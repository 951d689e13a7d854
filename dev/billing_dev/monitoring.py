"""Local monitoring: a real Prometheus with the billing alert rules, scraping the local stack.

``billing monitoring up`` (``make monitoring``) writes ``.local/monitoring/prometheus.yml``
(rules from ``monitoring/prometheus/``, the Airflow api-server of ``billing airflow`` as the
target, ``/billing/metrics`` behind its JWT), fetches a token for ``admin`` with the password
in ``.local/airflow/passwords.json`` into a 0600 file that Prometheus re-reads on every
scrape, and starts ``prometheus`` (Debian package) on a free loopback port. Nothing secret is
committed or put in the config. Grafana is not packaged by Debian or PyPI: point one at this
Prometheus with ``monitoring/grafana/provisioning`` (docs/OBSERVABILITY.md).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from billing.platform import settings
from billing.platform.errors import BillingError, ServiceError
from billing_dev.stack import process

RULES = settings.PROJECT_DIR / "monitoring" / "prometheus" / "billing_alerts.yml"
JOB = "billing"
SCRAPE_INTERVAL = "30s"
SCRAPE_TIMEOUT = "20s"  # >= BILLING_METRICS_SCRAPE_TIMEOUT_MS x the handful of queries


class MonitoringError(BillingError):
    """Prometheus cannot be set up (not installed, the api-server is not running, ...)."""


def _http():
    import httpx

    return httpx.Client(timeout=10, trust_env=False)


def folder(stack) -> Path:
    return stack.root / "monitoring"


def config(target: str, token_file: Path, rules: Path = RULES) -> dict:
    """The Prometheus config: one job scraping GET /billing/metrics on ``target`` (host:port)."""
    return {
        "global": {
            "scrape_interval": SCRAPE_INTERVAL,
            "evaluation_interval": SCRAPE_INTERVAL,
            # runbook links in the rules: <runbook_base>/docs/runbooks/<file>.md#<section>
            "external_labels": {"runbook_base": settings.PROJECT_DIR.as_uri()},
        },
        "rule_files": [str(rules)],
        "scrape_configs": [
            {
                "job_name": JOB,
                "metrics_path": "/billing/metrics",
                "scrape_timeout": SCRAPE_TIMEOUT,
                "authorization": {"type": "Bearer", "credentials_file": str(token_file)},
                "static_configs": [{"targets": [target]}],
            }
        ],
    }


def fetch_token(base: str, password: str) -> str:
    """A JWT for ``admin`` from the api-server (``POST /auth/token``, SimpleAuthManager)."""
    import httpx

    try:
        with _http() as c:
            r = c.post(f"{base}/auth/token", json={"username": "admin", "password": password})
    except httpx.TransportError as exc:
        raise MonitoringError(
            f"the Airflow api-server at {base} does not answer ({exc}): start it with "
            "`billing airflow` (make airflow) first"
        ) from None
    if r.status_code != 201:
        raise MonitoringError(f"{base}/auth/token refused admin: HTTP {r.status_code}")
    return r.json()["access_token"]


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _state(stack) -> dict:
    p = folder(stack) / "state.json"
    return json.loads(p.read_text()) if p.exists() else {}


def up(stack, base: str | None = None, password: str | None = None) -> dict:
    """Start (or refresh the token of) Prometheus for ``stack``; returns its URL and target."""
    prometheus = shutil.which("prometheus")
    if not prometheus:
        raise MonitoringError(
            "prometheus not found: run scripts/install-system-deps.sh (Debian package prometheus)"
        )
    if base is None:
        if not stack.state_file.exists():
            raise MonitoringError("no local stack: run `billing stack up` and `billing airflow`")
        base = f"http://127.0.0.1:{stack.load_state()['ports']['airflow']}"
    if password is None:
        password = json.loads((stack.airflow_home / "passwords.json").read_text())["admin"]
    token = fetch_token(base, password)
    d = folder(stack)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    d.chmod(0o700)
    token_file = d / "billing_api_token"
    _write_secret(token_file, token)  # re-read by Prometheus on every scrape
    target = base.split("://", 1)[1].rstrip("/")
    cfg = d / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config(target, token_file), sort_keys=False))
    pidfile = d / "prometheus.pid"
    state = _state(stack)
    if process.read_pid(pidfile) is not None:  # running: a new token and config are enough
        _reload(state["url"])
        return {**state, "target": target, "started": False}
    port = settings.prometheus_port() or process.free_port()
    if not process.port_bindable(port):
        raise MonitoringError(f"port {port} (BILLING_PORT_PROMETHEUS) is taken")
    url = f"http://127.0.0.1:{port}"
    process.spawn(
        [
            prometheus,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={d / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=7d",
        ],
        pidfile,
        d / "prometheus.log",
    )
    try:
        process.wait_until(lambda: _ready(url, pidfile), "prometheus", 60)
    except ServiceError:
        process.terminate(pidfile)
        raise MonitoringError(
            f"prometheus did not start: {process.tail(d / 'prometheus.log', 5)}"
        ) from None
    state = {"url": url, "port": port, "config": str(cfg)}
    (d / "state.json").write_text(json.dumps(state))
    return {**state, "target": target, "started": True}


def _ready(url: str, pidfile: Path) -> bool:
    import httpx

    if process.read_pid(pidfile) is None:
        raise ServiceError("prometheus exited")
    try:
        with _http() as c:
            return c.get(f"{url}/-/ready").status_code == 200
    except httpx.TransportError:
        return False


def _reload(url: str) -> None:
    with _http() as c:
        r = c.post(f"{url}/-/reload")
    if r.status_code != 200:
        raise MonitoringError(f"prometheus refused the new config: {r.text.strip()}")


def down(stack) -> bool:
    return process.terminate(folder(stack) / "prometheus.pid")


def status(stack) -> dict:
    """Whether Prometheus runs, and each target's health and each rule's state as it reports."""
    state = _state(stack)
    if not state or process.read_pid(folder(stack) / "prometheus.pid") is None:
        return {"running": False}
    with _http() as c:
        targets = c.get(f"{state['url']}/api/v1/targets").json()["data"]["activeTargets"]
        groups = c.get(f"{state['url']}/api/v1/rules").json()["data"]["groups"]
    return {
        "running": True,
        "url": state["url"],
        "targets": [
            {"url": t["scrapeUrl"], "health": t["health"], "error": t["lastError"]} for t in targets
        ],
        "rules": {r["name"]: r.get("state", "") for g in groups for r in g["rules"]},
    }


def format_status(s: dict) -> str:
    if not s["running"]:
        return "prometheus: not running (billing monitoring up)"
    out = [f"prometheus: {s['url']}"]
    for t in s["targets"]:
        out.append(f"target {t['url']}: {t['health']}" + (f" ({t['error']})" if t["error"] else ""))
    firing = sorted(n for n, st in s["rules"].items() if st == "firing")
    out.append(f"{len(s['rules'])} alert rules, firing: {', '.join(firing) or 'none'}")
    return "\n".join(out)
