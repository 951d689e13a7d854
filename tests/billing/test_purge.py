"""Retention purge: dry runs delete nothing, the CONFIRM gate holds, only billed months go.

Everything runs inside one transaction that is rolled back, so the shared test database
keeps its partitions and the invoice/reconciliation tables other flows own are untouched.
"""

from __future__ import annotations

import datetime as dt

import pytest

from billing import purge

AS_OF = dt.date(2026, 3, 1)  # 400 days back: cutoff 2025-01-25, months before 2025-01 may go
DAYS = 400
RECONCILED, UNRECONCILED, UNINVOICED, IN_WINDOW = (
    dt.date(2024, 10, 1),
    dt.date(2024, 11, 1),
    dt.date(2024, 12, 1),
    dt.date(2025, 1, 1),
)


def _event(cx, period: dt.date, org: str, n: int) -> None:
    """An event on the first of ``period`` at noon UTC (and at 23:59 UTC on its last day,
    which is the next month in UTC+1 but not here), with its registry rows as ingest writes."""
    cx.execute("SELECT billing.ensure_usage_partition(%s)", (period,))
    last_day = (period + dt.timedelta(days=32)).replace(day=1) - dt.timedelta(days=1)
    for i, at in enumerate(
        (
            dt.datetime.combine(period, dt.time(12), dt.UTC),
            dt.datetime.combine(last_day, dt.time(23, 59, 59), dt.UTC),
        )
    ):
        event_id = f"e-{period}-{org}-{n}-{i}"
        cx.execute(
            """INSERT INTO billing.usage_events (event_id, org_id, metric, quantity, occurred_at,
                   billable, arrival_day, file_id, line_no)
               VALUES (%s, %s, 'api_calls', 1, %s, true, %s, 1, %s)""",
            (event_id, org, at, period, 2 * n + i),
        )
        cx.execute(
            """INSERT INTO billing.usage_event_ids (event_key, payload_hash, occurred_at, file_id,
                   line_no) VALUES (md5(%s)::uuid, 0, %s, 1, %s)""",
            (event_id, at, 2 * n + i),
        )


def _registry_months(cx) -> dict[str, int]:
    return dict(
        cx.execute(
            """SELECT to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM'), count(*)
                 FROM billing.usage_event_ids WHERE event_key IN (
                      SELECT md5(format('e-%s-%s-%s-%s', p, o, n, i))::uuid
                        FROM unnest('{2024-10-01,2024-11-01,2024-12-01,2025-01-01}'::date[]) p,
                             unnest('{acme,globex}'::text[]) o, generate_series(0, 1) n,
                             generate_series(0, 1) i)
                GROUP BY 1 ORDER BY 1"""
        ).fetchall()
    )


def _invoice(cx, org: str, period: dt.date) -> None:
    cx.execute(
        """INSERT INTO billing.stripe_invoices (org_id, period, stripe_invoice_id, status,
               finalized_at) VALUES (%s, %s, %s, 'paid', %s)""",
        (org, period, f"in_{org}_{period:%Y%m}", dt.datetime(2025, 1, 1, tzinfo=dt.UTC)),
    )


def _reconciled(cx, org: str, period: dt.date, status: str = "match") -> None:
    key = f"test-{period:%Y%m}-{org}-{status}"
    cx.execute(
        """INSERT INTO billing.reconcile_runs (idempotency_key, run_id, period, tolerance, status,
               orgs_checked, discrepancies, above_tolerance, max_rel_diff, payload)
           VALUES (%s, 'test', %s, 0.005, 'passed', 1, 0, 0, 0, '{}')""",
        (key, period),
    )
    cx.execute(
        """INSERT INTO billing.billing_audit (idempotency_key, run_id, period, org_id, status,
               is_above_tolerance, abs_diff_cents, rel_diff, stripe_source)
           VALUES (%s, 'test', %s, %s, %s, %s, 0, 0, 'invoice')""",
        (key, period, org, status, status == "mismatch"),
    )


@pytest.fixture
def months(clean_db, pg):
    """Four old months in different billing states, in a transaction that is rolled back."""
    with pg.transaction(force_rollback=True):
        for (name,) in pg.execute(
            """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = 'billing.usage_events'::regclass"""
        ).fetchall():
            pg.execute(f"DROP TABLE billing.{name}")
        for period in (RECONCILED, UNRECONCILED, UNINVOICED, IN_WINDOW):
            for i, org in enumerate(("acme", "globex")):
                _event(pg, period, org, i)
        for org in ("acme", "globex"):
            _invoice(pg, org, RECONCILED)
            _reconciled(pg, org, RECONCILED)
            _invoice(pg, org, UNRECONCILED)
            _invoice(pg, org, IN_WINDOW)
            _reconciled(pg, org, IN_WINDOW)
        _reconciled(pg, "acme", UNRECONCILED)  # globex still unreconciled
        pg.execute(
            """INSERT INTO billing.usage_quarantine (file_id, line_no, arrival_day, reason, detail,
                   raw, raw_bytes) VALUES (1, 1, '2024-10-03', 'malformed_json', 'x', '{', 1),
                                          (1, 2, '2024-12-03', 'malformed_json', 'x', '{', 1)"""
        )
        yield pg


def _partitions(cx) -> list[str]:
    return [
        r[0]
        for r in cx.execute(
            """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = 'billing.usage_events'::regclass ORDER BY 1"""
        ).fetchall()
    ]


ALL = [
    "usage_events_p202410",
    "usage_events_p202411",
    "usage_events_p202412",
    "usage_events_p202501",
]
REGISTRY_ALL = {"2024-10": 4, "2024-11": 4, "2024-12": 4, "2025-01": 4}


def test_eligibility_reasons(months):
    reasons = {
        i.object: (i.eligible, i.reason)
        for i in purge.plan(months, AS_OF, DAYS)
        if i.target == "postgres_partition"
    }
    assert reasons == {
        "billing.usage_events_p202410": (True, "past retention, invoiced, reconciled"),
        "billing.usage_events_p202411": (
            False,
            "not reconciled: 1 org(s) without a matching reconciliation result",
        ),
        "billing.usage_events_p202412": (
            False,
            "not invoiced: 2 org(s) without a finalized invoice",
        ),
        "billing.usage_events_p202501": (False, "within retention (keep from 2025-01-01)"),
    }


def test_dry_run_deletes_nothing_and_is_audited(months):
    summary = purge.purge(months, as_of=AS_OF, days=DAYS, run_id="t-dry", actor="test")
    assert summary["would_drop"] == [
        "billing.usage_events_p202410",
        "billing.usage_event_ids",
        "billing.usage_quarantine",
    ]
    assert summary["dropped"] == []
    assert _partitions(months) == ALL
    assert months.execute("SELECT count(*) FROM billing.usage_quarantine").fetchone()[0] == 2
    assert _registry_months(months) == REGISTRY_ALL
    assert months.execute("SELECT billing.usage_registry_horizon()").fetchone() == (None,)
    audit = months.execute(
        """SELECT object, action, dry_run FROM billing.retention_purge_audit
            WHERE run_id = 't-dry' ORDER BY object"""
    ).fetchall()
    assert audit == [
        ("billing.usage_event_ids@2024-10", "would_drop", True),
        ("billing.usage_event_ids@2024-11", "kept", True),
        ("billing.usage_event_ids@2024-12", "kept", True),
        ("billing.usage_events_p202410", "would_drop", True),
        ("billing.usage_events_p202411", "kept", True),
        ("billing.usage_events_p202412", "kept", True),
        ("billing.usage_events_p202501", "kept", True),
        ("billing.usage_quarantine@2024-10", "would_drop", True),
        ("billing.usage_quarantine@2024-12", "kept", True),
    ]


@pytest.mark.parametrize("word", [None, "", "confirm", "CONFIRM ", "yes"])
def test_wrong_confirm_refuses_and_deletes_nothing(months, word):
    with pytest.raises(purge.PurgeRefused, match="refusing to purge: confirm must be exactly"):
        purge.purge(
            months, as_of=AS_OF, days=DAYS, dry_run=False, confirm=word, run_id="t-no", actor="t"
        )
    assert _partitions(months) == ALL
    assert (
        months.execute(
            "SELECT count(*) FROM billing.retention_purge_audit WHERE run_id = 't-no'"
        ).fetchone()[0]
        == 0
    )


def test_real_purge_drops_only_invoiced_and_reconciled_months(months):
    summary = purge.purge(
        months,
        as_of=AS_OF,
        days=DAYS,
        dry_run=False,
        confirm="CONFIRM",
        run_id="t-real",
        actor="test",
    )
    assert summary["dropped"] == [
        "billing.usage_events_p202410",
        "billing.usage_event_ids",
        "billing.usage_quarantine",
    ]
    assert _partitions(months) == ALL[1:]  # invoiced-but-unreconciled 2024-11 stays
    # the registry rows of the dropped month's events go too, all four and no other
    assert _registry_months(months) == {k: v for k, v in REGISTRY_ALL.items() if k != "2024-10"}
    assert months.execute(
        """SELECT rows FROM billing.retention_purge_audit
            WHERE run_id = 't-real' AND target = 'registry' AND action = 'dropped'"""
    ).fetchall() == [(4,)]
    # from now on ingest accepts nothing before 2024-11 (docs/USAGE_EVENTS.md)
    assert months.execute("SELECT billing.usage_registry_horizon()").fetchone() == (
        dt.datetime(2024, 11, 1, tzinfo=dt.UTC),
    )
    assert months.execute(
        "SELECT arrival_day FROM billing.usage_quarantine ORDER BY 1"
    ).fetchall() == [(dt.date(2024, 12, 3),)]
    assert (
        months.execute(
            "SELECT count(*) FROM billing.usage_events WHERE occurred_at < '2024-11-01'"
        ).fetchone()[0]
        == 0
    )
    # a retry of the same run changes nothing
    again = purge.purge(
        months, as_of=AS_OF, days=DAYS, dry_run=False, confirm="CONFIRM", run_id="t-real", actor="t"
    )
    assert again["dropped"] == []
    assert _partitions(months) == ALL[1:]
    assert _registry_months(months) == {k: v for k, v in REGISTRY_ALL.items() if k != "2024-10"}


def test_open_incident_blocks_a_reconciled_month(months):
    months.execute(
        """INSERT INTO billing.billing_incidents (idempotency_key, period, org_ids, summary,
               max_rel_diff, message_id, email_to)
           VALUES ('test-202410-acme-match', '2024-10-01', '{acme}', 'x', 0.01, 'm1', '{a@b.c}')"""
    )
    (item,) = [i for i in purge.plan(months, AS_OF, DAYS) if i.object.endswith("p202410")]
    assert (item.eligible, item.reason) == (False, "1 open reconciliation incident(s)")


def test_latest_result_mismatch_blocks_a_month(months):
    _reconciled(months, "acme", RECONCILED, status="mismatch")
    months.execute(
        "UPDATE billing.billing_audit SET checked_at = checked_at + interval '1 hour' "
        "WHERE status = 'mismatch'"
    )
    (item,) = [i for i in purge.plan(months, AS_OF, DAYS) if i.object.endswith("p202410")]
    assert (item.eligible, item.reason) == (
        False,
        "not reconciled: 1 org(s) without a matching reconciliation result",
    )


def test_no_invoice_tables_means_nothing_is_eligible(months):
    months.execute("ALTER TABLE billing.billing_audit RENAME TO billing_audit_hidden")
    eligible = [i for i in purge.plan(months, AS_OF, DAYS) if i.eligible]
    assert eligible == []
    reason = months.execute("SELECT billing.usage_period_purge_blocker('2024-10-01')").fetchone()
    assert reason == ("no reconciliation table (billing.billing_audit) yet",)


def test_cli_wrong_confirm_is_one_line_exit_2(capsys):
    from billing import cli

    assert cli.main(["purge", "--older-than", "400", "--confirm", "yes"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("billing: error: refusing to purge: confirm must be exactly 'CONFIRM'")


def test_cli_real_purge_as_of_the_future_is_refused(capsys):
    from billing import cli

    tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    args = ["purge", "--older-than", "400", "--as-of", tomorrow.isoformat()]
    assert cli.main([*args, "--confirm", "CONFIRM"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"billing: error: refusing to purge: as-of {tomorrow} is after today "
        f"({tomorrow - dt.timedelta(days=1)}); nothing was deleted\n"
    )
    purge.check_as_of(tomorrow, tomorrow - dt.timedelta(days=1), dry_run=True)  # a preview may


@pytest.mark.parametrize(
    ("args", "days", "as_of"),
    [
        (["--older-than", "1000000", "--as-of", "2026-03-01"], 1000000, "2026-03-01"),
        (["--older-than", "400", "--as-of", "0001-01-01"], 400, "0001-01-01"),
        (["--older-than", "1", "--as-of", "0001-01-01", "--confirm", "CONFIRM"], 1, "0001-01-01"),
    ],
)
def test_cli_window_before_the_year_1_is_one_line(capsys, args, days, as_of):
    from billing import cli

    assert cli.main(["purge", *args]) == 2
    assert capsys.readouterr().err == (
        f"billing: error: retention of {days} days before {as_of} reaches back before the "
        "year 1; use a later as-of day or fewer days\n"
    )


def test_cutoff_counts_back_from_as_of():
    assert purge.cutoff(dt.date(2026, 3, 1), 400) == dt.date(2025, 1, 25)
    assert purge.first_kept_month(dt.date(2026, 3, 1), 400) == dt.date(2025, 1, 1)


def test_a_real_purge_and_loading_files_wait_for_each_other(clean_db):
    """A loading file holds the registry lock shared (ingest reads the horizon under it), a
    real purge exclusive: neither moves the horizon under the other (lock waits cut short)."""
    import psycopg

    from billing.platform import db

    with db.connect() as loading, db.connect() as other_file, db.connect() as purging:
        for cx in (loading, other_file, purging):
            cx.execute("SET lock_timeout = '200ms'")
            cx.commit()  # a rollback below must not undo it
        loading.execute("SELECT billing.usage_registry_horizon()")
        other_file.execute("SELECT billing.usage_registry_horizon()")  # files share it
        with pytest.raises(psycopg.errors.LockNotAvailable):
            purging.execute("SELECT billing.lock_usage_registry()")
        purging.rollback()
        loading.rollback()
        other_file.rollback()
        purging.execute("SELECT billing.lock_usage_registry()")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            loading.execute("SELECT billing.usage_registry_horizon()")
