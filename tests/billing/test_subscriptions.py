"""Subscriptions over time against the real PostgreSQL: exact intervals and change rows for
each edit, no-ops that write nothing, the CSV import (idempotent, all or nothing), the orgs
import refusing a plan change, and the `billing subscriptions` commands."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from psycopg import errors as pgerr

from billing import orgs, subscriptions
from billing.platform.errors import ConfigError

D = dt.date
INF = "-infinity"
ACTOR = "cli:tester"


def _org(pg, org_id: str, plan: str = "starter", currency: str = "usd") -> None:
    orgs.upsert(pg, [orgs.Org(org_id, org_id.title(), f"{org_id}@example.test", plan, currency)])
    pg.commit()


def intervals(pg, org_id: str) -> list[tuple]:
    return [(s.plan, s.starts, s.ends) for s in subscriptions.history(pg, org_id)]


def change_rows(pg, org_id: str, after_id: int = 0) -> list[tuple]:
    return [
        (c["action"], c["before"], c["after"], c["changed_by"], c["source"], c["reason"])
        for c in subscriptions.changes(pg, org_id)
        if c["change_id"] > after_id
    ]


def last_change_id(pg) -> int:
    return pg.execute(
        "SELECT coalesce(max(change_id), 0) FROM billing.subscription_changes"
    ).fetchone()[0]


def iv(plan, starts, ends):
    return {"plan": plan, "starts_at": starts, "ends_at": ends}


@pytest.fixture
def acme(clean_db, pg):
    _org(pg, "acme")
    return "acme"


def test_new_org_starts_on_its_plan_since_always(acme, pg):
    assert intervals(pg, acme) == [("starter", None, None)]
    rows = change_rows(pg, acme)
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
        ("create", None, iv("starter", INF, None), "orgs")
    ]


def test_upgrade_on_the_15th(acme, pg):
    mark = last_change_id(pg)
    written = subscriptions.change_plan(
        pg, acme, "growth", D(2026, 3, 15), ACTOR, "cli", "upsell TKT-1"
    )
    pg.commit()
    assert intervals(pg, acme) == [
        ("starter", None, D(2026, 3, 15)),
        ("growth", D(2026, 3, 15), None),
    ]
    expected = [
        ("change", iv("starter", INF, None), iv("starter", INF, "2026-03-15")),
        ("change", None, iv("growth", "2026-03-15", None)),
    ]
    assert [(w["action"], w["before"], w["after"]) for w in written] == expected
    assert change_rows(pg, acme, mark) == [(*e, ACTOR, "cli", "upsell TKT-1") for e in expected]
    created_by = pg.execute(
        "SELECT created_by FROM billing.subscriptions WHERE org_id = %s AND plan = 'growth'",
        (acme,),
    ).fetchone()[0]
    assert created_by == ACTOR
    on = {s.org_id: s.plan for s in subscriptions.list_in_force(pg, D(2026, 3, 14))}
    assert on == {acme: "starter"}
    assert subscriptions.list_in_force(pg, D(2026, 3, 15))[0].plan == "growth"


def test_downgrade_then_same_plan_is_a_no_op(acme, pg):
    subscriptions.change_plan(pg, acme, "growth", D(2026, 3, 15), ACTOR, "cli")
    mark = last_change_id(pg)
    subscriptions.change_plan(pg, acme, "starter", D(2026, 4, 10), ACTOR, "airflow", "downsell")
    pg.commit()
    assert intervals(pg, acme) == [
        ("starter", None, D(2026, 3, 15)),
        ("growth", D(2026, 3, 15), D(2026, 4, 10)),
        ("starter", D(2026, 4, 10), None),
    ]
    assert change_rows(pg, acme, mark) == [
        (
            "change",
            iv("growth", "2026-03-15", None),
            iv("growth", "2026-03-15", "2026-04-10"),
            ACTOR,
            "airflow",
            "downsell",
        ),
        ("change", None, iv("starter", "2026-04-10", None), ACTOR, "airflow", "downsell"),
    ]
    mark = last_change_id(pg)
    # Already on starter that day (and on growth on 1 April): nothing to do, nothing logged.
    assert subscriptions.change_plan(pg, acme, "starter", D(2026, 5, 1), ACTOR, "cli") == []
    assert subscriptions.change_plan(pg, acme, "growth", D(2026, 4, 1), ACTOR, "cli") == []
    pg.commit()
    assert last_change_id(pg) == mark


def test_change_on_an_interval_start_replaces_it_and_merges_back(acme, pg):
    subscriptions.change_plan(pg, acme, "growth", D(2026, 3, 15), ACTOR, "cli")
    mark = last_change_id(pg)
    # A correction: growth from the 15th was a mistake. Undo: starter again from the 15th.
    subscriptions.change_plan(pg, acme, "starter", D(2026, 3, 15), ACTOR, "cli", "undo")
    pg.commit()
    assert intervals(pg, acme) == [("starter", None, None)]
    assert [r[:3] for r in change_rows(pg, acme, mark)] == [
        ("change", iv("growth", "2026-03-15", None), None),
        ("change", iv("starter", INF, "2026-03-15"), iv("starter", INF, None)),
    ]


def test_change_on_the_first_day_of_an_interval_deletes_and_inserts(acme, pg):
    subscriptions.change_plan(pg, acme, "growth", D(2026, 3, 15), ACTOR, "cli")
    subscriptions.change_plan(pg, acme, "starter", D(2026, 4, 1), ACTOR, "cli")
    subscriptions.change_plan(
        pg, acme, "growth", D(2026, 4, 1), ACTOR, "cli"
    )  # merges with 15 March
    subscriptions.cancel(pg, acme, D(2026, 5, 1), ACTOR, "cli")
    subscriptions.start(pg, acme, "starter", D(2026, 6, 1), None, ACTOR, "cli")
    mark = last_change_id(pg)
    # Replace the June interval (plan never rewritten in place: delete + insert, both logged).
    subscriptions.change_plan(pg, acme, "growth", D(2026, 6, 1), ACTOR, "cli")
    pg.commit()
    assert intervals(pg, acme) == [
        ("starter", None, D(2026, 3, 15)),
        ("growth", D(2026, 3, 15), D(2026, 5, 1)),
        ("growth", D(2026, 6, 1), None),
    ]
    assert [r[:3] for r in change_rows(pg, acme, mark)] == [
        ("change", iv("starter", "2026-06-01", None), None),
        ("change", None, iv("growth", "2026-06-01", None)),
    ]


def test_start_on_the_10th_cancel_on_the_20th(clean_db, pg):
    _org(pg, "beta")
    subscriptions.cancel(pg, "beta", D(2026, 2, 1), ACTOR, "cli", "churned")
    mark = last_change_id(pg)
    written = subscriptions.start(pg, "beta", "growth", D(2026, 3, 10), None, ACTOR, "cli", "back")
    assert [w["after"] for w in written] == [iv("growth", "2026-03-10", None)]
    subscriptions.cancel(pg, "beta", D(2026, 3, 20), ACTOR, "cli", "churned again")
    pg.commit()
    assert intervals(pg, "beta") == [
        ("starter", None, D(2026, 2, 1)),
        ("growth", D(2026, 3, 10), D(2026, 3, 20)),
    ]
    assert change_rows(pg, "beta", mark) == [
        ("start", None, iv("growth", "2026-03-10", None), ACTOR, "cli", "back"),
        (
            "cancel",
            iv("growth", "2026-03-10", None),
            iv("growth", "2026-03-10", "2026-03-20"),
            ACTOR,
            "cli",
            "churned again",
        ),
    ]
    assert subscriptions.list_in_force(pg, D(2026, 3, 20), "beta") == []
    assert subscriptions.list_in_force(pg, D(2026, 3, 5)) == []
    # Re-running either is a no-op (an Airflow retry, a second shell attempt).
    mark = last_change_id(pg)
    assert (
        subscriptions.start(pg, "beta", "growth", D(2026, 3, 10), D(2026, 3, 20), ACTOR, "cli")
        == []
    )
    assert subscriptions.cancel(pg, "beta", D(2026, 3, 20), ACTOR, "cli") == []
    pg.commit()
    assert last_change_id(pg) == mark


def test_cancel_removes_later_intervals(acme, pg):
    subscriptions.change_plan(pg, acme, "growth", D(2026, 4, 1), ACTOR, "cli")
    mark = last_change_id(pg)
    subscriptions.cancel(pg, acme, D(2026, 3, 20), ACTOR, "cli")
    pg.commit()
    assert intervals(pg, acme) == [("starter", None, D(2026, 3, 20))]
    assert [r[:3] for r in change_rows(pg, acme, mark)] == [
        ("cancel", iv("growth", "2026-04-01", None), None),
        ("cancel", iv("starter", INF, "2026-04-01"), iv("starter", INF, "2026-03-20")),
    ]


def test_overlaps_and_bad_requests_are_refused(acme, pg):
    mark = last_change_id(pg)
    with pytest.raises(ConfigError, match=r"already has a subscription \[-infinity, open\)"):
        subscriptions.start(pg, acme, "growth", D(2026, 3, 10), None, ACTOR, "cli")
    pg.rollback()
    with pytest.raises(ConfigError, match="not in the catalog"):
        subscriptions.change_plan(pg, acme, "platinum", D(2026, 3, 10), ACTOR, "cli")
    pg.rollback()
    with pytest.raises(ConfigError, match="billed in 'eur' but org 'acme' pays in 'usd'"):
        subscriptions.change_plan(pg, acme, "enterprise", D(2026, 3, 10), ACTOR, "cli")
    pg.rollback()
    with pytest.raises(ConfigError, match="unknown org 'nobody'"):
        subscriptions.change_plan(pg, "nobody", "growth", D(2026, 3, 10), ACTOR, "cli")
    pg.rollback()
    subscriptions.cancel(pg, acme, D(2026, 3, 1), ACTOR, "cli")
    with pytest.raises(ConfigError, match="no subscription on 2026-03-10; start one"):
        subscriptions.change_plan(pg, acme, "growth", D(2026, 3, 10), ACTOR, "cli")
    pg.rollback()
    # The database itself refuses an overlap (the trigger), whatever writes it.
    with pytest.raises(pgerr.ExclusionViolation):
        pg.execute(
            """INSERT INTO billing.subscriptions (org_id, plan, starts_at, created_by)
               VALUES ('acme', 'growth', '2026-03-10', 'x')"""
        )
    pg.rollback()
    assert intervals(pg, acme) == [("starter", None, None)]
    assert last_change_id(pg) == mark


# ---------------------------------------------------------------- CSV import
def test_csv_import_is_idempotent(clean_db, pg, tmp_path):
    _org(pg, "acme")
    _org(pg, "euro", "enterprise", "eur")
    f = tmp_path / "subs.csv"
    f.write_text(
        "org_id,plan,starts_at,ends_at\n"
        "acme,starter,,2026-01-15\n"
        "acme,growth,2026-01-15,2026-03-01\n"
        "acme,starter,2026-04-01,\n"
        "euro,enterprise,,\n"
    )
    mark = last_change_id(pg)
    counts = subscriptions.import_csv(pg, f, ACTOR)
    pg.commit()
    assert counts == {"inserted": 2, "updated": 1, "unchanged": 1}
    assert intervals(pg, "acme") == [
        ("starter", None, D(2026, 1, 15)),
        ("growth", D(2026, 1, 15), D(2026, 3, 1)),
        ("starter", D(2026, 4, 1), None),
    ]
    assert change_rows(pg, "acme", mark) == [
        (
            "import",
            iv("starter", INF, None),
            iv("starter", INF, "2026-01-15"),
            ACTOR,
            "csv",
            "import subs.csv",
        ),
        ("import", None, iv("growth", "2026-01-15", "2026-03-01"), ACTOR, "csv", "import subs.csv"),
        ("import", None, iv("starter", "2026-04-01", None), ACTOR, "csv", "import subs.csv"),
    ]
    assert change_rows(pg, "euro", mark) == []
    mark = last_change_id(pg)
    counts = subscriptions.import_csv(pg, f, ACTOR)
    pg.commit()
    assert counts == {"inserted": 0, "updated": 0, "unchanged": 4}
    assert last_change_id(pg) == mark
    # Same key, other plan: updated in place (one logged row); the export round-trips.
    f.write_text("org_id,plan,starts_at,ends_at\nacme,starter,2026-01-15,2026-03-01\n")
    assert subscriptions.import_csv(pg, f, ACTOR) == {"inserted": 0, "updated": 1, "unchanged": 0}
    pg.commit()
    assert [r[:3] for r in change_rows(pg, "acme", mark)] == [
        (
            "import",
            iv("growth", "2026-01-15", "2026-03-01"),
            iv("starter", "2026-01-15", "2026-03-01"),
        )
    ]
    out = subscriptions.write_csv(tmp_path / "out.csv", subscriptions.history(pg, "acme"))
    assert subscriptions.import_csv(pg, out, ACTOR) == {"inserted": 0, "updated": 0, "unchanged": 3}


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["acme,growth,2026-02-30,"], ":3: starts_at '2026-02-30' is not a day (YYYY-MM-DD)"),
        (["acme,growth,2026-3-1,"], ":3: starts_at '2026-3-1' is not a day"),
        (["nobody,growth,2026-03-01,"], ":3: unknown org 'nobody'"),
        (["acme,platinum,2026-03-01,"], ":3: plan 'platinum' is not in the catalog"),
        (["acme,enterprise,2026-03-01,"], ":3: plan 'enterprise' is billed in 'eur'"),
        (["acme,growth,2026-03-10,2026-03-01"], ":3: ends_at 2026-03-01 must be after starts_at"),
        (
            ["acme,growth,2026-03-01,2026-04-01", "acme,starter,2026-03-15,"],
            ":4: org 'acme' [2026-03-15, open) overlaps line 3 [2026-03-01, 2026-04-01)",
        ),
        (
            ["other,growth,2026-03-01,2026-04-01"],
            ":3: org 'other' [2026-03-01, 2026-04-01) overlaps its subscription "
            "[-infinity, open) on 'starter', which the file does not name",
        ),
    ],
)
def test_bad_csv_line_writes_nothing(clean_db, pg, tmp_path, lines, message):
    _org(pg, "acme")
    _org(pg, "other")
    f = tmp_path / "subs.csv"
    # Line 2 alone is fine (it would end the first interval): nothing of it may be written.
    f.write_text(
        "org_id,plan,starts_at,ends_at\nacme,starter,,2026-03-01\n" + "\n".join(lines) + "\n"
    )
    mark = last_change_id(pg)
    with pytest.raises(ConfigError) as err:
        subscriptions.import_csv(pg, f, ACTOR)
    pg.rollback()
    assert str(err.value).startswith(f"{f}:")
    assert message in str(err.value)
    assert intervals(pg, "acme") == [("starter", None, None)]
    assert last_change_id(pg) == mark


def test_csv_missing_column(clean_db, pg, tmp_path):
    f = tmp_path / "subs.csv"
    f.write_text("org_id,plan,starts_at\nacme,starter,\n")
    with pytest.raises(ConfigError, match="missing column.*ends_at"):
        subscriptions.import_csv(pg, f, ACTOR)


# ---------------------------------------------------------------- orgs import
def test_orgs_import_does_not_change_plans(clean_db, pg, tmp_path):
    _org(pg, "acme")
    subscriptions.change_plan(pg, "acme", "growth", D(2026, 3, 15), ACTOR, "cli")
    pg.commit()
    mark = last_change_id(pg)
    # Name and email still update; the plan column keeps the plan the org was created on.
    orgs.upsert(pg, [orgs.Org("acme", "Acme 2", "a2@example.test", "growth", "usd")])
    pg.commit()
    row = pg.execute(
        "SELECT name, plan FROM billing.organizations WHERE org_id = 'acme'"
    ).fetchone()
    assert row == ("Acme 2", "starter")
    f = tmp_path / "orgs.csv"
    f.write_text(
        "org_id,name,email,plan,currency\n"
        "new-co,New,n@example.test,starter,usd\n"
        "acme,Acme 3,a3@example.test,starter,usd\n"
    )
    from billing import pricing

    parsed = orgs.parse_csv(f, pricing.load_catalog())
    with pytest.raises(ConfigError) as err:
        orgs.upsert(pg, parsed)
    pg.rollback()
    assert str(err.value) == (
        "org 'acme' is on plan 'growth'; plan changes go through "
        "'billing subscriptions change' (history is kept)"
    )
    assert pg.execute("SELECT count(*) FROM billing.organizations").fetchone()[0] == 1
    assert last_change_id(pg) == mark
    assert intervals(pg, "acme") == [
        ("starter", None, D(2026, 3, 15)),
        ("growth", D(2026, 3, 15), None),
    ]


# ---------------------------------------------------------------- the CLI
def cli(capsys, *args) -> tuple[int, str, str]:
    from billing.cli import main

    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_change_history_list(clean_db, pg, capsys, monkeypatch):
    import getpass

    monkeypatch.setattr(getpass, "getuser", lambda: "finance-amy")
    _org(pg, "acme")
    args = (
        "subscriptions",
        "change",
        "--org",
        "acme",
        "--plan",
        "growth",
        "--effective",
        "2026-03-15",
    )
    rc, out, err = cli(capsys, *args, "--reason", "TKT-9")
    assert (rc, err) == (0, "")
    assert (
        "org 'acme': plan 'growth' from 2026-03-15 (2 change(s) logged as cli:finance-amy)" in out
    )
    rc, out, err = cli(capsys, *args)
    assert rc == 0 and out.startswith("no change: org 'acme' already has plan 'growth'")
    rc, out, _ = cli(capsys, "subscriptions", "history", "--org", "acme", "--format", "json")
    found = json.loads(out)
    assert [(i["plan"], i["starts_at"], i["ends_at"]) for i in found["intervals"]] == [
        ("starter", INF, "2026-03-15"),
        ("growth", "2026-03-15", None),
    ]
    assert [(c["changed_by"], c["source"], c["reason"]) for c in found["changes"][1:]] == [
        ("cli:finance-amy", "cli", "TKT-9")
    ] * 2
    rc, out, _ = cli(capsys, "subscriptions", "history", "--org", "acme")
    assert rc == 0 and "cli:finance-amy" in out and "starter [-infinity, open)" in out
    assert "TKT-9" in out
    rc, out, _ = cli(capsys, "subscriptions", "list", "--on", "2026-03-14", "--format", "json")
    assert [(s["org_id"], s["plan"]) for s in json.loads(out)] == [("acme", "starter")]
    rc, out, _ = cli(capsys, "subscriptions", "list", "--org", "acme", "--on", "2026-03-15")
    assert rc == 0 and "growth" in out and "starter" not in out


def test_cli_start_cancel_import(clean_db, pg, capsys, tmp_path):
    _org(pg, "acme")
    rc, out, err = cli(capsys, "subscriptions", "cancel", "--org", "acme", "--ends", "2026-03-10")
    assert rc == 0, err
    rc, out, err = cli(
        capsys, "subscriptions", "start", "--org", "acme", "--plan", "growth",
        "--starts", "2026-04-01", "--ends", "2026-05-01",
    )  # fmt: skip
    assert rc == 0, err
    f = tmp_path / "subs.csv"
    f.write_text("org_id,plan,starts_at,ends_at\nacme,growth,2026-06-01,\n")
    rc, out, err = cli(capsys, "subscriptions", "import", str(f))
    assert (rc, out.strip()) == (0, f"{f}: 1 inserted, 0 updated, 0 unchanged")
    rc, out, err = cli(capsys, "subscriptions", "import", str(f))
    assert (rc, out.strip()) == (0, f"{f}: 0 inserted, 0 updated, 1 unchanged")
    assert intervals(pg, "acme") == [
        ("starter", None, D(2026, 3, 10)),
        ("growth", D(2026, 4, 1), D(2026, 5, 1)),
        ("growth", D(2026, 6, 1), None),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["change", "--org", "acme", "--plan", "growth", "--effective", "2026-02-30"],
            "invalid day '2026-02-30': expected YYYY-MM-DD",
        ),
        (
            ["change", "--org", "acme", "--plan", "platinum", "--effective", "2026-02-03"],
            "billing: error: plan 'platinum' is not in the catalog",
        ),
        (
            ["start", "--org", "acme", "--plan", "growth", "--starts", "2026-02-03"],
            "billing: error: org 'acme' already has a subscription [-infinity, open) on 'starter'",
        ),
        (
            ["cancel", "--org", "nobody", "--ends", "2026-02-03"],
            "billing: error: unknown org 'nobody'",
        ),
        (["history", "--org", "nobody"], "billing: error: unknown org 'nobody'"),
        (["import", "/nonexistent/subs.csv"], "no such file: /nonexistent/subs.csv"),
    ],
)
def test_cli_mistakes_are_one_line(clean_db, pg, capsys, args, message):
    _org(pg, "acme")
    try:
        rc, out, err = cli(capsys, "subscriptions", *args)
    except SystemExit as exc:  # argparse's own errors
        rc, err = exc.code, capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_cli_orgs_import_names_who_created_the_first_subscription(
    clean_db, pg, capsys, monkeypatch, tmp_path
):
    import getpass

    monkeypatch.setattr(getpass, "getuser", lambda: "finance-amy")
    f = tmp_path / "orgs.csv"
    f.write_text("org_id,name,email,plan,currency\nacme,Acme,a@example.test,growth,usd\n")
    rc, out, err = cli(capsys, "orgs", "import", str(f))
    assert (rc, err) == (0, "")
    assert change_rows(pg, "acme") == [
        ("create", None, iv("growth", INF, None), "cli:finance-amy", "orgs", None)
    ]
    f.write_text("org_id,name,email,plan,currency\nacme,Acme,a@example.test,starter,usd\n")
    rc, out, err = cli(capsys, "orgs", "import", str(f))
    assert rc == 2 and err.strip() == (
        "billing: error: org 'acme' is on plan 'growth'; plan changes go through "
        "'billing subscriptions change' (history is kept)"
    )


def test_a_change_in_a_closed_period_points_at_rerate(clean_db, pg, capsys):
    _org(pg, "acme")
    pg.execute("INSERT INTO billing.period_closes (period, invoices) VALUES ('2026-02-01', 1)")
    pg.commit()
    assert subscriptions.closed_periods_since(pg, D(2026, 2, 28)) == ["2026-02"]
    assert subscriptions.closed_periods_since(pg, D(2026, 3, 1)) == []
    rc, out, err = cli(
        capsys, "subscriptions", "change", "--org", "acme", "--plan", "growth",
        "--effective", "2026-02-15", "--reason", "backdated",
    )  # fmt: skip
    assert (rc, err) == (0, "")
    assert out.splitlines()[-1] == (
        "note: closed period(s) 2026-02 already invoiced; "
        "'billing rerate --period YYYY-MM --org acme --apply' corrects each"
    )
    rc, out, err = cli(capsys, "subscriptions", "cancel", "--org", "acme", "--ends", "2026-04-01")
    assert rc == 0 and "note:" not in out
    result = subscriptions.run_task(
        {"action": "start", "org_id": "acme", "plan": "starter", "effective": "2026-05-01",
         "reason": "back"}, "amy",
    )  # fmt: skip
    assert result["closed_periods"] == [] and result["changes"]
