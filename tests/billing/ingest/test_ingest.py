"""Usage ingest against the real test Postgres: reasons, exactly once, atomic files, report."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path

import pytest

from billing.ingest import loader as ingest

DAY = dt.date(2026, 11, 2)
RUN_END = dt.datetime(2026, 11, 3, tzinfo=dt.UTC)
TABLES = ("usage_events", "usage_event_ids", "usage_files", "usage_quarantine")


@pytest.fixture
def db(clean_db, pg):
    pg.execute(
        """INSERT INTO billing.organizations (org_id, name, email, plan, currency)
           SELECT 'org-' || g, 'Org ' || g, 'o' || g || '@example.test', 'starter', 'usd'
           FROM generate_series(1, 3) g"""
    )
    pg.commit()
    return pg


@pytest.fixture
def landing(tmp_path) -> Path:
    return tmp_path / "landing"


def uri(landing: Path) -> str:
    return "file://" + str(landing)


def ev(i, **over) -> dict:
    e = {
        "event_id": f"e-{i}",
        "org_id": "org-1",
        "metric": "api_calls",
        "quantity": 3,
        "occurred_at": "2026-11-02T10:00:00Z",
        "source": "api-gateway",
    }
    e.update(over)
    return {k: v for k, v in e.items() if v is not ...}


def line(obj) -> bytes:
    return json.dumps(obj).encode() if not isinstance(obj, bytes) else obj


def write(landing: Path, name: str, lines, day: dt.date = DAY) -> Path:
    d = landing / "usage" / f"dt={day.isoformat()}"
    d.mkdir(parents=True, exist_ok=True)
    data = b"".join(line(x) + b"\n" for x in lines)
    p = d / name
    p.write_bytes(gzip.compress(data, mtime=0) if name.endswith(".gz") else data)
    return p


def run(landing: Path, day: dt.date = DAY, run_end: dt.datetime = RUN_END) -> dict:
    return ingest.ingest_day(day, run_end, landing_uri=uri(landing))


def pick(d: dict, *keys) -> tuple:
    return tuple(d[k] for k in keys)


def counts(pg) -> dict:
    return {t: pg.execute(f"SELECT count(*) FROM billing.{t}").fetchone()[0] for t in TABLES}


def reasons(pg) -> dict:
    return dict(
        pg.execute(
            "SELECT reason, count(*) FROM billing.usage_quarantine GROUP BY reason"
        ).fetchall()
    )


def test_every_reason_and_exact_counts(db, landing):
    lines = [
        ev(1),
        ev(2, billable=False),
        b"",  # blank: counted as blank, not quarantined
        line(ev(3))[:-9],  # malformed_json
        b'{"event_id": "e-4", "org_id": "\xff\xfe"}',  # not_utf8
        line(ev(5, properties={"pad": "x" * 70_000})),  # line_too_long (limit 64 KiB)
        ev(6, org_id=...),  # missing_field
        ev(7, quantity="lots"),  # bad_type
        ev(8, quantity=-5),  # negative_quantity
        line(ev(9)).replace(b'"quantity": 3', b'"quantity": NaN'),  # non_finite_quantity
        ev(10, occurred_at="yesterday at noon"),  # bad_timestamp
        ev(11, occurred_at="2026-11-03T00:05:01Z"),  # future_event (> run_end + 5 min)
        ev(12, occurred_at="2026-09-28T23:59:59Z"),  # too_late (< run_end - 35 days)
        ev(13, org_id="org-unknown"),  # unknown_org
        ev(14, metric="teleportations"),  # unknown_metric
        ev(1, quantity=4),  # conflict: same event_id, different payload
        ev(1),  # duplicate of line 1
        ev(15, occurred_at="2026-11-03T00:05:00+00:00", quantity=1.50),  # edge: exactly +5 min
        ev(16, occurred_at="2026-09-29T01:00:00+01:00"),  # edge: exactly run_end - 35 days
        ev(17, occurred_at="2026-02-30T10:00:00Z"),  # impossible date -> bad_timestamp (safe path)
        ev(18, quantity=18446744073709551615),  # quantity_out_of_range (above 10^9)
    ]
    write(landing, "part-0.jsonl", lines)
    summary = run(landing)
    f = summary["files"][0]
    assert f["status"] == "loaded"
    assert (
        f["lines"],
        f["blank"],
        f["accepted"],
        f["non_billable"],
        f["duplicate"],
        f["quarantined"],
    ) == (
        21,
        1,
        3,
        1,
        1,
        15,
    )
    expected = {r: 1 for r in ingest.REASONS}
    expected["bad_timestamp"] = 2
    assert f["reasons"] == expected == reasons(db)
    assert summary["total"]["quarantined"] == expected
    assert f["registry"] == "lookup"  # e-1 repeats: its later lines found before registering
    rows = db.execute(
        """SELECT event_id, quantity::text, billable, occurred_at, line_no, arrival_day
           FROM billing.usage_events ORDER BY line_no"""
    ).fetchall()
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
        ("e-1", "3", True, 1),
        ("e-2", "3", False, 2),
        ("e-15", "1.5", True, 18),
        ("e-16", "3", True, 19),
    ]
    assert rows[0][3] == dt.datetime(2026, 11, 2, 10, tzinfo=dt.UTC) and rows[0][5] == DAY
    q = db.execute(
        "SELECT reason, line_no FROM billing.usage_quarantine ORDER BY line_no"
    ).fetchall()
    assert q == [
        ("malformed_json", 4),
        ("not_utf8", 5),
        ("line_too_long", 6),
        ("missing_field", 7),
        ("bad_type", 8),
        ("negative_quantity", 9),
        ("non_finite_quantity", 10),
        ("bad_timestamp", 11),
        ("future_event", 12),
        ("too_late", 13),
        ("unknown_org", 14),
        ("unknown_metric", 15),
        ("conflict", 16),
        ("bad_timestamp", 20),
        ("quantity_out_of_range", 21),
    ]


def test_duplicates_within_across_files_and_reruns(db, landing):
    write(landing, "a.jsonl", [ev(1), ev(2), ev(1)])
    write(landing, "b.jsonl", [ev(2), ev(3)])
    write(landing, ".c.jsonl.tmp", [ev(9)])  # in flight: ignored
    s = run(landing)
    assert pick(s["total"], "files", "lines", "accepted", "duplicate", "quarantined_total") == (
        2,
        5,
        3,
        2,
        0,
    )
    before = counts(db)
    assert before == {
        "usage_events": 3,
        "usage_event_ids": 3,
        "usage_files": 2,
        "usage_quarantine": 0,
    }
    again = run(landing)
    assert [f["status"] for f in again["files"]] == ["skipped", "skipped"]
    assert again["total"]["accepted"] == 0 and counts(db) == before
    # the same events arriving again a day later (same JSON, other key order): duplicates
    write(
        landing,
        "late.jsonl",
        [dict(reversed(ev(1).items())), ev(3)],
        day=DAY + dt.timedelta(days=1),
    )
    later = run(landing, DAY + dt.timedelta(days=1), RUN_END + dt.timedelta(days=1))
    assert later["total"]["duplicate"] == 2 and counts(db)["usage_events"] == 3


def test_nothing_is_accepted_in_a_month_whose_registry_retention_purged(db, landing):
    """A retention purge deletes the registry rows of a dropped month (test_purge.py); a later
    file, even on a backfilled arrival day, must not count those events again."""
    write(landing, "a.jsonl", [ev(1, occurred_at="2026-10-15T10:00:00Z"), ev(2)])
    assert run(landing)["total"]["accepted"] == 2
    # what a real purge of October 2026 leaves (purge.purge: partition, registry, audit row)
    db.execute("DROP TABLE billing.usage_events_p202610")
    assert db.execute("SELECT billing.prune_usage_registry('2026-10-01')").fetchone() == (1,)
    db.execute(
        """INSERT INTO billing.retention_purge_audit (run_id, as_of, retention_days, cutoff,
               dry_run, actor, target, object, period, action, reason, rows)
           VALUES ('t', '2027-12-01', 400, '2026-10-27', false, 't', 'registry',
                   'billing.usage_event_ids@2026-10', '2026-10-01', 'dropped', 'x', 1)"""
    )
    db.commit()
    write(
        landing,
        "b.jsonl",
        [
            ev(1, occurred_at="2026-10-15T10:00:00Z"),  # its registry row is gone: too_late
            ev(3, occurred_at="2026-10-31T23:59:59Z"),  # typed in Python: bounds
            ev(4, occurred_at="2026-11-01T00:30:00+01:00"),  # judged in SQL: 2026-10-31 23:30Z
            ev(5, occurred_at="2026-11-01T00:00:00Z"),  # the horizon itself: accepted
            ev(2),  # registered in November: still a duplicate
        ],
    )
    f = run(landing)["files"][1]
    assert f["path"].endswith("/b.jsonl")
    assert pick(f, "accepted", "duplicate", "quarantined") == (1, 1, 3)
    assert f["reasons"] == {"too_late": 3}
    assert db.execute(
        """SELECT line_no, event_id, detail FROM billing.usage_quarantine ORDER BY line_no"""
    ).fetchall() == [
        (
            n,
            eid,
            f"occurred_at {t} is in or before a month purged by retention "
            "(before 2026-11-01 00:00:00+00)",
        )
        for n, eid, t in (
            (1, "e-1", "2026-10-15T10:00:00Z"),
            (2, "e-3", "2026-10-31T23:59:59Z"),
            (3, "e-4", "2026-11-01T00:30:00+01:00"),
        )
    ]
    assert db.execute("SELECT count(*) FROM billing.usage_events").fetchone() == (2,)  # e-2, e-5
    # and the purged month's partition is not created again (the window starts at the horizon)
    assert db.execute("SELECT to_regclass('billing.usage_events_p202610')").fetchone() == (None,)


def test_conflict_across_files_keeps_the_first(db, landing):
    write(landing, "a.jsonl", [ev(1)])
    run(landing)
    write(landing, "b.jsonl", [ev(1, metric="storage_gb")])
    s = run(landing)
    assert s["total"]["quarantined"] == {"conflict": 1}
    detail = db.execute("SELECT detail FROM billing.usage_quarantine").fetchone()[0]
    assert "a.jsonl line 1" in detail
    assert db.execute("SELECT metric FROM billing.usage_events").fetchall() == [("api_calls",)]


def test_seen_lines_found_first_and_a_concurrent_registration_in_between(db, landing, monkeypatch):
    """A file with already-seen event_ids finds those lines, then registers the rest with a
    plain INSERT. If another file commits one of the rest in between, that INSERT fails and
    the file registers with ON CONFLICT instead: the same outcome, the racing line a conflict."""
    monkeypatch.setenv("BILLING_INGEST_WORKERS", "1")  # in-process: the hook uses `db`
    write(landing, "a.jsonl", [ev(1)])
    run(landing)
    a_id = db.execute("SELECT file_id FROM billing.usage_files").fetchone()[0]
    # e-1 twice: both seen in a.jsonl; e-3 twice: the second seen in this file; e-4 races
    write(landing, "b.jsonl", [ev(1), ev(2), ev(3), ev(3), ev(1), ev(4)])
    real = ingest.db.execute_expecting
    raced = []

    def racing(cx, expected, query, params=None):
        if "ingest_seen" in str(query) and not raced:  # the plain INSERT after the look-up
            db.execute(
                """INSERT INTO billing.usage_event_ids
                          (event_key, payload_hash, occurred_at, file_id, line_no)
                   VALUES (md5('e-4')::uuid, 1, '2026-11-02T10:00:00Z', %s, 7)""",
                (a_id,),
            )
            db.commit()
            raced.append(True)
        return real(cx, expected, query, params)

    monkeypatch.setattr(ingest.db, "execute_expecting", racing)
    b = run(landing)["files"][1]
    assert raced == [True]
    assert pick(b, "registry", "accepted", "duplicate", "quarantined", "reasons") == (
        "on_conflict",
        2,
        3,
        1,
        {"conflict": 1},
    )
    assert db.execute("SELECT line_no, detail FROM billing.usage_quarantine").fetchall() == [
        (
            6,
            f"event_id e-4 was first seen in {uri(landing)}/usage/dt={DAY}/a.jsonl line 7 "
            "with a different payload",
        )
    ]
    assert db.execute(
        "SELECT event_id, line_no FROM billing.usage_events WHERE file_id <> %s ORDER BY 1",
        (a_id,),
    ).fetchall() == [("e-2", 2), ("e-3", 3)]

    # without the race: the look-up path alone, same file content under another name
    monkeypatch.setattr(ingest.db, "execute_expecting", real)
    write(landing, "c.jsonl", [ev(5), ev(1), ev(5), ev(6, quantity=9), ev(6), ev(1)])
    c = run(landing)["files"][2]
    assert pick(c, "registry", "accepted", "duplicate", "reasons") == (
        "lookup",
        2,
        3,
        {"conflict": 1},
    )
    assert db.execute(
        "SELECT line_no FROM billing.usage_quarantine WHERE file_id = %s", (c["file_id"],)
    ).fetchall() == [(5,)]


def test_gzip_and_empty_file(db, landing):
    write(landing, "a.jsonl.gz", [ev(1), ev(2), b"not json"])
    write(landing, "empty.jsonl", [])
    s = run(landing)
    by_name = {f["path"].rsplit("/", 1)[-1]: f for f in s["files"]}
    assert by_name["a.jsonl.gz"]["accepted"] == 2 and by_name["a.jsonl.gz"]["reasons"] == {
        "malformed_json": 1
    }
    assert by_name["empty.jsonl"]["status"] == "loaded" and by_name["empty.jsonl"]["lines"] == 0
    assert counts(db)["usage_files"] == 2
    assert [f["status"] for f in run(landing)["files"]] == ["skipped", "skipped"]


def test_file_failing_halfway_is_rolled_back_and_retried(db, landing):
    write(landing, "a.jsonl", [ev(1)])
    run(landing)
    write(landing, "b.jsonl", [ev(2), ev(3), ev(4, quantity=-1), ev(1)])
    # A real failure after the registry and events are written: nothing of b may remain.
    db.execute(
        """CREATE FUNCTION billing.test_boom() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$;
           CREATE TRIGGER test_boom AFTER INSERT ON billing.usage_quarantine
           FOR EACH STATEMENT EXECUTE FUNCTION billing.test_boom()"""
    )
    db.commit()
    try:
        with pytest.raises(ingest.IngestError, match="b.jsonl"):
            run(landing)
        assert counts(db) == {
            "usage_events": 1,
            "usage_event_ids": 1,
            "usage_files": 1,
            "usage_quarantine": 0,
        }
    finally:
        db.execute(
            "DROP TRIGGER test_boom ON billing.usage_quarantine; DROP FUNCTION billing.test_boom()"
        )
        db.commit()
    s = run(landing)
    b = next(f for f in s["files"] if f["path"].endswith("b.jsonl"))
    assert (b["status"], b["accepted"], b["duplicate"], b["reasons"]) == (
        "loaded",
        2,
        1,
        {"negative_quantity": 1},
    )
    assert counts(db) == {
        "usage_events": 3,
        "usage_event_ids": 3,
        "usage_files": 2,
        "usage_quarantine": 1,
    }


def test_connection_killed_mid_file_leaves_nothing(db, landing, monkeypatch):
    write(landing, "a.jsonl", [ev(i) for i in range(1, 2001)])
    real = ingest._register
    killed = []

    def register_then_die(cx, p):
        new = real(cx, p)  # the registry rows are written; the events are not yet
        killed.append(new)
        db.execute("SELECT pg_terminate_backend(%s)", (cx.info.backend_pid,))
        db.commit()
        return new

    monkeypatch.setattr(ingest, "_register", register_then_die)
    with pytest.raises(ingest.IngestError, match="a.jsonl"):
        run(landing)
    assert killed == [(2000, "plain")]
    assert counts(db) == dict.fromkeys(TABLES, 0)
    monkeypatch.setattr(ingest, "_register", real)
    assert run(landing)["total"]["accepted"] == 2000


def test_changed_file_is_reported_not_reloaded(db, landing):
    p = write(landing, "a.jsonl", [ev(1)])
    run(landing)
    p.write_bytes(p.read_bytes() + line(ev(2)) + b"\n")
    s = run(landing)
    assert s["files"][0]["status"] == "changed"
    assert counts(db)["usage_events"] == 1
    rep = ingest.report(DAY)
    assert (
        rep["files"][0]["status"] == "changed"
        and rep["files"][0]["changed_size"] == p.stat().st_size
    )


def test_multi_megabyte_line_is_quarantined_without_losing_neighbours(db, landing):
    huge = b'{"event_id": "big", "properties": {"blob": "' + b"x" * (3 << 20) + b'"}}'
    write(landing, "a.jsonl", [ev(1), huge, ev(2), huge + b"tail-without-newline"])
    # last line has no trailing newline
    p = landing / "usage" / f"dt={DAY}" / "a.jsonl"
    p.write_bytes(p.read_bytes().rstrip(b"\n"))
    s = run(landing)
    f = s["files"][0]
    assert (f["lines"], f["accepted"], f["reasons"]) == (4, 2, {"line_too_long": 2})
    rows = db.execute(
        "SELECT line_no, raw_bytes, length(raw) FROM billing.usage_quarantine ORDER BY line_no"
    ).fetchall()
    assert rows == [(2, len(huge), 4096), (4, len(huge) + 20, 4096)]
    assert db.execute(
        "SELECT event_id, line_no FROM billing.usage_events ORDER BY line_no"
    ).fetchall() == [("e-1", 1), ("e-2", 3)]


def test_counters_are_incremented(db, landing):
    from billing import observability as obs

    def value(counter, label):
        return counter.labels(label)._value.get()

    acc, neg = (
        value(obs.INGEST_EVENTS, "accepted"),
        value(obs.INGEST_QUARANTINED, "negative_quantity"),
    )
    write(landing, "a.jsonl", [ev(1), ev(2), ev(3, quantity=-1)])
    run(landing)
    assert value(obs.INGEST_EVENTS, "accepted") - acc == 2
    assert value(obs.INGEST_QUARANTINED, "negative_quantity") - neg == 1


def test_cli_run_and_report(db, landing, monkeypatch, capsys):
    from billing import cli

    write(landing, "a.jsonl", [ev(1), ev(2, billable=False), ev(3, metric="nope")])
    monkeypatch.setenv("BILLING_LANDING_URI", uri(landing))
    assert cli.main(["ingest", "run", "--day", DAY.isoformat(), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["accepted"] == 1
    assert cli.main(["ingest", "report", "--day", DAY.isoformat(), "--format", "json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert pick(rep["total"], "files", "lines", "accepted", "non_billable", "quarantined") == (
        1,
        3,
        1,
        1,
        {"unknown_metric": 1},
    )
    assert rep["samples"][0]["line_no"] == 3
    assert cli.main(["ingest", "report", "--day", DAY.isoformat()]) == 0
    out = capsys.readouterr().out
    assert "a.jsonl" in out and "TOTAL" in out and "unknown_metric=1" in out


def test_optimistic_statements_are_not_counted_as_db_errors(db, landing):
    """The registry's plain INSERT hitting a known event_id and the fast SQL path giving up
    are control flow with a fallback, not database errors (they would page on-call)."""
    from billing import observability as obs

    def db_errors() -> float:
        return sum(s.value for s in obs.DB_ERRORS.collect()[0].samples if s.name.endswith("_total"))

    write(landing, "a.jsonl", [ev(1)])
    run(landing)
    before = db_errors()
    write(landing, "b.jsonl", [ev(1), ev(2, occurred_at="2026-02-30T10:00:00Z"), ev(3)])
    # in this process, where the counters can be read (workers count in their own)
    b = ingest.ingest_day(DAY, RUN_END, landing_uri=uri(landing), workers_=1)["files"][1]
    assert (b["mode"], b["accepted"], b["duplicate"], b["reasons"]) == (
        "safe",
        1,
        1,
        {"bad_timestamp": 1},
    )
    assert db_errors() == before
