"""Hostile input to usage ingest, on the real stack: out-of-range quantities, corrupt files,
entries that are not read, symlinks; and the whole corpus (tests/billing/ingest/hostile.py) through a
real ``billing_nightly`` run, invoiced to the cent."""

from __future__ import annotations

import datetime as dt
import gzip
import os
from collections import Counter
from pathlib import Path

import hostile
import pytest
from hostile import DAY, ORGS, RUN_END, raw_event

from billing import ingest, pricing

SNAPSHOT = "billing_snapshot"


@pytest.fixture
def pg_orgs(clean_db, pg):
    pg.cursor().executemany(
        """INSERT INTO billing.organizations (org_id, name, email, plan, currency, created_at)
           VALUES (%s, %s, %s, %s, %s, '2020-01-01')""",
        [(o, o, f"{o}@example.test", plan, cur) for o, plan, cur in ORGS],
    )
    pg.commit()
    return pg


@pytest.fixture
def landing(tmp_path) -> Path:
    return tmp_path / "landing"


def day_dir(landing: Path, day: dt.date = DAY) -> Path:
    d = landing / "usage" / f"dt={day.isoformat()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def run(landing: Path, day: dt.date = DAY) -> dict:
    return ingest.ingest_day(day, RUN_END, landing_uri="file://" + str(landing))


def lines(*events: str) -> bytes:
    return "".join(e + "\n" for e in events).encode()


def expected_invoices(monthly) -> dict[str, int]:
    catalog = pricing.load_catalog()
    return {
        org: pricing.invoice_total(catalog.plan(plan), monthly.get(org, {}))
        for org, plan, _ in ORGS
    }


def test_a_quantity_too_large_to_price_is_quarantined_and_the_snapshot_builds(pg_orgs, landing):
    """Item 1: 18446744073709551615 (and 1e308, 1000 digits) used to be stored and then break
    fct_daily_charges (bigint out of range) for every org. Now they never reach dbt."""
    from billing import transform

    (day_dir(landing) / "a.jsonl").write_bytes(
        lines(
            raw_event("ok-1", "hx-starter", "api_calls", "150000"),
            raw_event("big-1", "hx-growth", "api_calls", "18446744073709551615"),
            raw_event("big-2", "hx-growth", "storage_gb", "1e308"),
            raw_event("big-3", "hx-tokyo", "api_calls", "9" * 1000),
            raw_event("ok-2", "hx-tokyo", "api_calls", "1000000000"),  # the top of the range
        )
    )
    f = run(landing)["files"][0]
    assert (f["accepted"], f["reasons"]) == (2, {"quantity_out_of_range": 3})
    details = pg_orgs.execute(
        "SELECT line_no, detail FROM billing.usage_quarantine ORDER BY line_no"
    ).fetchall()
    assert details[0] == (
        2,
        "quantity 18446744073709551615 is outside the accepted range "
        "(0 to 1000000000, at most 9 decimal places)",
    )
    assert [n for n, _ in details] == [2, 3, 4]
    transform.transform_day(DAY, targets=["postgres"], full_refresh=True)
    totals = dict(
        pg_orgs.execute(
            f"SELECT org_id, total_cents FROM {SNAPSHOT}.fct_invoices WHERE period_start = %s",
            (DAY.replace(day=1),),
        ).fetchall()
    )
    want = expected_invoices(
        {"hx-starter": {"api_calls": 150000}, "hx-tokyo": {"api_calls": 1000000000}}
    )
    assert totals == want
    assert want["hx-starter"] == 2900 + 1000 and want["hx-tokyo"] == 3000 + 29997000


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def test_a_corrupt_compressed_file_is_rejected_whole_and_the_run_succeeds(pg_orgs, landing):
    """Item 2: truncated gzip, trailing garbage, plain text named .gz: a manifest row with a
    reason each, nothing of them loaded, the rest of the day loaded, no failed run; a re-run
    changes nothing; new bytes under a rejected name load; the counter is exported from zero."""
    from billing.observability import export as metrics_export

    def rejected_metric() -> dict:
        f, up = metrics_export._Families(), {}
        metrics_export.collect_postgres(f, up)
        fam = f.out["billing_ingest_files_rejected_total"]
        return {s.labels["reason"]: s.value for s in fam.samples if s.name.endswith("_total")}

    assert rejected_metric() == {"corrupt_gzip": 0}
    d = day_dir(landing)
    good = lines(*(raw_event(f"z-{i}") for i in range(1, 201)))
    payload = _gz(good)
    (d / "a-truncated.jsonl.gz").write_bytes(payload[:-20])
    (d / "b-trailing.jsonl.gz").write_bytes(payload + b"PK\x03\x04")
    (d / "c-plain.jsonl.gz").write_bytes(good)
    (d / "d-fine.jsonl.gz").write_bytes(_gz(lines(raw_event("fine-1"), raw_event("fine-2"))))
    s = run(landing)  # no IngestError
    by = {f["path"].rsplit("/", 1)[-1]: f for f in s["files"]}
    assert {n: (f["status"], f.get("detail")) for n, f in by.items()} == {
        "a-truncated.jsonl.gz": (
            "rejected",
            f"truncated at byte {len(payload) - 20}: the file ends before the gzip "
            "end-of-stream marker",
        ),
        "b-trailing.jsonl.gz": (
            "rejected",
            f"trailing garbage at byte {len(payload)}: 4+ byte(s) after the end of the gzip stream",
        ),
        "c-plain.jsonl.gz": ("rejected", "not a gzip file at byte 0 (it starts with b'{\"event_')"),
        "d-fine.jsonl.gz": ("loaded", None),
    }
    assert by["d-fine.jsonl.gz"]["accepted"] == 2
    assert s["total"]["rejected"] == {"corrupt_gzip": 3}
    assert pg_orgs.execute("SELECT count(*) FROM billing.usage_events").fetchone() == (2,)
    assert pg_orgs.execute("SELECT count(*) FROM billing.usage_event_ids").fetchone() == (2,)
    rows = pg_orgs.execute(
        """SELECT path, status, reject_reason, lines, accepted, quarantined
             FROM billing.usage_files ORDER BY path"""
    ).fetchall()
    assert [r[1:] for r in rows] == [
        ("rejected", "corrupt_gzip", 0, 0, 0),
        ("rejected", "corrupt_gzip", 0, 0, 0),
        ("rejected", "corrupt_gzip", 0, 0, 0),
        ("loaded", None, 2, 2, 0),
    ]
    rep = ingest.report(DAY)
    assert [(f["status"], f.get("reason")) for f in rep["files"]][:3] == [
        ("rejected", "corrupt_gzip")
    ] * 3
    text = ingest.format_report(rep)
    assert "REJECTED " + rows[0][0] + ": corrupt_gzip: truncated at byte" in text
    assert rejected_metric() == {"corrupt_gzip": 3}

    again = run(landing)
    assert [f["status"] for f in again["files"]] == ["skipped"] * 4
    assert pg_orgs.execute("SELECT count(*) FROM billing.usage_files").fetchone() == (4,)

    # the producer re-delivers the truncated file complete, under the same name: it loads
    (d / "a-truncated.jsonl.gz").write_bytes(payload)
    third = run(landing)
    assert [f["status"] for f in third["files"]] == ["loaded", "skipped", "skipped", "skipped"]
    assert third["files"][0]["accepted"] == 200
    assert rejected_metric() == {"corrupt_gzip": 2}


def test_nothing_in_a_day_folder_is_skipped_silently(pg_orgs, landing):
    """Item 3: every entry not loaded is in the summary, the report and billing.usage_skipped
    with why; .JSONL loads (names match case-insensitively); re-runs do not duplicate rows."""
    d = day_dir(landing)
    (d / "part.JSONL").write_bytes(lines(raw_event("u-1")))
    (d / "part2.Jsonl.GZ").write_bytes(_gz(lines(raw_event("u-2"))))
    (d / "x.json").write_bytes(lines(raw_event("n-1")))
    (d / "x.jsonl.bak").write_bytes(lines(raw_event("n-2")))
    (d / ".x.jsonl.part").write_bytes(lines(raw_event("n-3")))
    (d / "d.jsonl").mkdir()
    os.symlink(d / "missing.jsonl", d / "dangling.jsonl")
    want = {
        ".x.jsonl.part": "in_flight",
        "d.jsonl": "directory",
        "dangling.jsonl": "symlink",
        "x.json": "unsupported_extension",
        "x.jsonl.bak": "unsupported_extension",
    }
    s = run(landing)
    assert [f["path"].rsplit("/", 1)[-1] for f in s["files"]] == ["part.JSONL", "part2.Jsonl.GZ"]
    assert s["total"]["accepted"] == 2
    assert {e["path"].rsplit("/", 1)[-1]: e["reason"] for e in s["skipped"]} == want
    assert s["total"]["skipped"] == {
        "directory": 1,
        "in_flight": 1,
        "symlink": 1,
        "unsupported_extension": 2,
    }
    rep = ingest.report(DAY)
    assert {e["path"].rsplit("/", 1)[-1]: e["reason"] for e in rep["skipped"]} == want
    text = ingest.format_report(rep)
    assert f"NOT READ {rep['skipped'][0]['path']}: in_flight:" in text
    run(landing)
    assert pg_orgs.execute("SELECT count(*) FROM billing.usage_skipped").fetchone() == (5,)
    # the in-flight file lands under its real name: it loads and leaves the skipped list
    (d / ".x.jsonl.part").rename(d / "x3.jsonl")
    s = run(landing)
    assert s["total"]["accepted"] == 1
    assert pg_orgs.execute(
        "SELECT reason, count(*) FROM billing.usage_skipped GROUP BY 1 ORDER BY 1"
    ).fetchall() == [("directory", 1), ("symlink", 1), ("unsupported_extension", 2)]


def test_symlinks_are_never_followed_out_of_the_landing_zone(pg_orgs, landing, tmp_path):
    """Item 4: a link to /etc/passwd (or to a file of another day) is never read; nor is a day
    folder that is itself a link to somewhere else."""
    d = day_dir(landing)
    os.symlink("/etc/passwd", d / "passwd.jsonl")
    other = day_dir(landing, DAY - dt.timedelta(days=1))
    (other / "old.jsonl").write_bytes(lines(raw_event("old-1")))
    os.symlink(other / "old.jsonl", d / "old.jsonl")
    (d / "real.jsonl").write_bytes(lines(raw_event("r-1")))
    s = run(landing)
    assert [f["path"].rsplit("/", 1)[-1] for f in s["files"]] == ["real.jsonl"]
    details = {e["path"].rsplit("/", 1)[-1]: e["detail"] for e in s["skipped"]}
    assert details == {
        "old.jsonl": f"symlinks are never followed (it points to {other / 'old.jsonl'})",
        "passwd.jsonl": "symlinks are never followed (it points to /etc/passwd)",
    }
    assert pg_orgs.execute("SELECT count(*) FROM billing.usage_quarantine").fetchone() == (0,)
    assert pg_orgs.execute("SELECT event_id FROM billing.usage_events").fetchall() == [("r-1",)]

    # a whole day folder that is a link to a folder outside the landing root
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "stolen.jsonl").write_bytes(lines(raw_event("s-1")))
    later = DAY + dt.timedelta(days=1)
    os.symlink(outside, landing / "usage" / f"dt={later.isoformat()}")
    s = ingest.ingest_day(later, RUN_END + dt.timedelta(days=1), landing_uri=f"file://{landing}")
    assert s["files"] == []
    assert [(e["reason"], e["detail"]) for e in s["skipped"]] == [
        ("symlink", f"the day folder resolves to {outside}, not below the landing root")
    ]
    assert pg_orgs.execute("SELECT count(*) FROM billing.usage_events").fetchone() == (1,)


@pytest.mark.integration
def test_hostile_corpus_through_the_nightly(pg_orgs, monkeypatch):
    """The whole corpus lands in the test stack's landing zone and a real billing_nightly run
    (``airflow dags test``) loads it: every org is invoiced to the cent from its good events,
    every bad line, file and entry is accounted for with its reason, and the invariant holds."""
    from billing.platform import settings
    from billing_dev import runner

    landing = Path(settings.landing_uri().removeprefix("file://"))
    day_root = landing / "usage" / f"dt={DAY.isoformat()}"
    if day_root.exists():
        import shutil

        shutil.rmtree(day_root)
    c = hostile.write_corpus(landing)
    n_lines = sum(len(v) for v in c.lines.values())
    assert n_lines >= 60 and len(c.lines) + len(c.rejected) + len(c.skipped) >= 18

    runner.run_day(DAY, quiet=True)  # raises if any task failed

    rep = ingest.report(DAY)
    files = {f["path"].rsplit("/", 1)[-1]: f for f in rep["files"]}
    assert set(files) == set(c.lines) | set(c.rejected)
    for name, outcomes in c.lines.items():
        f = files[name]
        k = Counter(outcomes)
        reasons = {
            r: n
            for r, n in k.items()
            if r not in ("blank", "accepted", "non_billable", "duplicate")
        }
        got = (f["status"], f["lines"], f["blank"], f["accepted"], f["non_billable"])
        assert got == ("loaded", len(outcomes), k["blank"], k["accepted"], k["non_billable"]), name
        assert (f["duplicate"], f["reasons"]) == (k["duplicate"], reasons), name
        assert f["lines"] == (
            f["blank"] + f["accepted"] + f["non_billable"] + f["duplicate"] + f["quarantined"]
        )
        quarantined = dict(
            pg_orgs.execute(
                """SELECT q.line_no, q.reason FROM billing.usage_quarantine q
                     JOIN billing.usage_files f USING (file_id) WHERE f.path = %s""",
                (f["path"],),
            ).fetchall()
        )
        assert quarantined == {i: r for i, r in enumerate(outcomes, start=1) if r in reasons}, name
    for name, detail in c.rejected.items():
        f = files[name]
        assert (f["status"], f["reason"], f["lines"]) == ("rejected", "corrupt_gzip", 0), name
        assert f["detail"].startswith(detail), (name, f["detail"])
    assert {e["path"].rsplit("/", 1)[-1]: e["reason"] for e in rep["skipped"]} == c.skipped
    # nothing of a rejected file, a skipped entry or /etc/passwd was read
    assert pg_orgs.execute(
        """SELECT count(*) FROM billing.usage_events
            WHERE event_id LIKE 'x-%%' OR event_id LIKE 'never-%%'"""
    ).fetchone() == (0,)
    assert pg_orgs.execute(
        "SELECT count(*) FROM billing.usage_quarantine WHERE raw LIKE '%%root:%%'"
    ).fetchone() == (0,)

    want = expected_invoices(c.monthly())
    got = dict(
        pg_orgs.execute(
            f"SELECT org_id, total_cents FROM {SNAPSHOT}.fct_invoices WHERE period_start = %s",
            (DAY.replace(day=1),),
        ).fetchall()
    )
    assert {o: got.get(o) for o in want} == want
    catalog = pricing.load_catalog()
    assert all(want[o] > catalog.plan(p).base_fee_minor for o, p, _ in ORGS)  # usage is billed
