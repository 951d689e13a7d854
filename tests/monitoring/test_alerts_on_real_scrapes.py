"""The alert rules on what the exporter really serves: two real scrapes of GET /billing/metrics
(``metrics_export.render``, on the real stack), one before and one after real failures
(a refused dunning recipient on a real SMTP server, real lock timeouts, a corrupt .gz through
ingest), turned into promtool ``input_series`` with the exact names and labels scraped.

The first failure must fire: ``increase()`` only sees it when the series was already exported
(at 0) before it happened."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from smtp_support import RefusingHandler, free_port, point_smtp_at

from billing import dunning, ingest
from billing.observability import export as metrics_export
from billing.platform import db

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "prometheus" / "billing_alerts.yml"
# What Prometheus adds to every scraped series (scrape config job + target).
TARGET = {"job": "billing", "instance": "127.0.0.1:8080"}
BEFORE, AFTER = 30, 60  # minutes of samples of each scrape (scrape interval 1m)
LOCK_TIMEOUTS = 6  # BillingDbErrors fires above 5 in 15 minutes
RUNBOOKS = "https://runbooks.test"


def scrape() -> dict[tuple[str, tuple], float]:
    """One scrape of the real exporter: (sample name, sorted labels) -> value."""
    body, _ = metrics_export.render()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }


def _selector(name: str, labels: tuple) -> str:
    pairs = sorted({**dict(labels), **TARGET}.items())
    inner = ",".join(f'{k}="{v}"' for k, v in pairs)
    return f"{name}{{{inner}}}"


def input_series(before: dict, after: dict) -> list[dict]:
    """Each series as Prometheus stores it: absent ('_') while a scrape did not have it."""

    def run(value, n):
        return f"_x{n - 1}" if value is None else f"{value:g}x{n - 1}"

    out = []
    for key in sorted(set(before) | set(after)):
        values = f"{run(before.get(key), BEFORE)} {run(after.get(key), AFTER)}"
        out.append({"series": _selector(*key), "values": values})
    return out


def _refused_dunning_send(pg, monkeypatch, tag: str) -> None:
    """One overdue invoice whose recipient a real SMTP server refuses (550)."""
    from aiosmtpd.controller import Controller

    org = f"{tag}-refused"
    pg.execute(
        """INSERT INTO billing.organizations (org_id, name, email, plan, currency)
           VALUES (%s, %s, %s, 'starter', 'usd')""",
        (org, org, f"ap@{org}.example.test"),
    )
    pg.execute(
        """INSERT INTO billing.stripe_invoices
               (org_id, period, stripe_invoice_id, status, currency, amount_due_cents,
                amount_paid_cents, amount_remaining_cents, due_at, finalized_at)
           VALUES (%s, '2026-01-01', %s, 'open', 'usd', 12345, 0, 12345,
                   '2026-03-01 12:00+00', '2026-02-01 00:00+00')""",
        (org, f"in_{tag}"),
    )
    pg.commit()
    port = free_port()
    server = Controller(RefusingHandler(f"ap@{org}.example.test"), hostname="127.0.0.1", port=port)
    server.start()
    try:
        with monkeypatch.context() as m:
            point_smtp_at(m, port)
            summary = dunning.run(dt.date(2026, 3, 2))
    finally:
        server.stop()
    assert (summary["sent"], summary["failed"]) == (0, 1)


def _lock_timeouts(monkeypatch, n: int) -> None:
    """``n`` real lock waits over lock_timeout on a table another session holds."""
    with monkeypatch.context() as m:
        m.setenv("BILLING_PG_LOCK_TIMEOUT_MS", "50")
        with db.connect() as holder, db.connect() as waiter:
            holder.execute("LOCK TABLE billing.organizations IN ACCESS EXCLUSIVE MODE")
            for _ in range(n):
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    waiter.execute("SELECT count(*) FROM billing.organizations")
                waiter.rollback()
            holder.rollback()


def _rejected_file(tmp_path: Path) -> None:
    """A plain-text file named .jsonl.gz in a real landing folder: rejected whole."""
    day = dt.date(2026, 3, 2)
    folder = tmp_path / "landing" / "usage" / f"dt={day.isoformat()}"
    folder.mkdir(parents=True)
    (folder / "part-0.jsonl.gz").write_bytes(b'{"event_id": "e1"}\n')
    s = ingest.ingest_day(
        day,
        dt.datetime(2026, 3, 3, tzinfo=dt.UTC),
        landing_uri=(tmp_path / "landing").as_uri(),
    )
    assert s["total"]["rejected"] == {"corrupt_gzip": 1}


def _alert(name: str, labels: dict, summary: str) -> dict:
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    rule = rules[name]
    annotations = {
        "summary": summary,
        "runbook_url": rule["annotations"]["runbook_url"].replace(
            "{{ $externalLabels.runbook_base }}", RUNBOOKS
        ),
    }
    if "description" in rule["annotations"]:
        annotations["description"] = rule["annotations"]["description"]
    return {"exp_labels": {**labels, **rule["labels"]}, "exp_annotations": annotations}


@pytest.fixture
def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.fail("promtool not found: run scripts/install-system-deps.sh (package prometheus)")
    return found


def test_first_failures_fire_on_the_series_the_exporter_serves(
    clean_db, pg, monkeypatch, tmp_path, promtool
):
    before = scrape()
    _refused_dunning_send(pg, monkeypatch, f"t{uuid.uuid4().hex[:8]}")
    _lock_timeouts(monkeypatch, LOCK_TIMEOUTS)
    _rejected_file(tmp_path)
    after = scrape()

    # What the scrapes must show for the rules below to mean anything.
    failures = ("billing_dunning_send_failures_total", (("stage", "reminder"),))
    locks = ("billing_db_errors_total", (("kind", "lock_timeout"),))
    rejected = ("billing_ingest_files_rejected_total", (("reason", "corrupt_gzip"),))
    assert after[failures] == before.get(failures, 0) + 1
    assert after[locks] == before.get(locks, 0) + LOCK_TIMEOUTS
    assert after[rejected] == before.get(rejected, 0) + 1

    quiet, fired = f"{BEFORE - 1}m", f"{BEFORE + 10}m"  # last 'before' sample; 10 min after
    cases = [
        {"eval_time": quiet, "alertname": a, "exp_alerts": []}
        for a in ("BillingDunningSendFailures", "BillingDbErrors", "BillingIngestFileRejected")
    ]
    cases += [
        {
            "eval_time": fired,
            "alertname": "BillingDunningSendFailures",
            "exp_alerts": [
                _alert(
                    "BillingDunningSendFailures",
                    {"stage": "reminder"},
                    "1 dunning notice(s) at stage reminder failed to send in the last day",
                )
            ],
        },
        {
            "eval_time": fired,
            "alertname": "BillingDbErrors",
            "exp_alerts": [
                _alert(
                    "BillingDbErrors",
                    {"kind": "lock_timeout"},
                    f"{LOCK_TIMEOUTS} PostgreSQL lock_timeout errors in 15 minutes",
                )
            ],
        },
        {
            "eval_time": fired,
            "alertname": "BillingIngestFileRejected",
            "exp_alerts": [
                _alert(
                    "BillingIngestFileRejected",
                    {"reason": "corrupt_gzip"},
                    "1 usage file(s) rejected whole in the last day (corrupt_gzip)",
                )
            ],
        },
        # every source was readable in both scrapes
        {"eval_time": "89m", "alertname": "BillingMetricsSourceDown", "exp_alerts": []},
    ]
    doc = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": "first failures on real scrapes",
                "interval": "1m",
                "external_labels": {"runbook_base": RUNBOOKS},
                "input_series": input_series(before, after),
                "alert_rule_test": cases,
            }
        ],
    }
    path = tmp_path / "real_scrapes_test.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert "SUCCESS" in out.stdout
