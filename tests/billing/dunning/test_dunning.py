"""Dunning against the real stack: Postgres, Redis and the SMTP sink (or our own aiosmtpd
server that refuses one recipient). Invoices are inserted directly, as stripe_sync leaves them."""

from __future__ import annotations

import datetime as dt
import email
import shutil
import uuid
from pathlib import Path

import pytest
from smtp_support import RefusingHandler, free_port, point_smtp_at

from billing.dunning import notices as dunning
from billing.platform import settings
from billing.platform.errors import ConfigError

pytestmark = pytest.mark.integration

DUE = dt.date(2026, 3, 1)


def day(n: int) -> dt.date:
    """The day an invoice due on DUE is ``n`` days overdue."""
    return DUE + dt.timedelta(days=n)


@pytest.fixture
def tag(clean_db):
    return f"t{uuid.uuid4().hex[:8]}"


def add_org(pg, org_id, plan="starter", currency="usd", name=None):
    pg.execute(
        """INSERT INTO billing.organizations (org_id, name, email, plan, currency)
           VALUES (%s, %s, %s, %s, %s)""",
        (org_id, name or f"Org {org_id}", f"ap@{org_id}.example.test", plan, currency),
    )
    pg.commit()


def add_invoice(pg, org_id, inv, due=DUE, cents=12_345, status="open", currency="usd", period=None):
    pg.execute(
        """INSERT INTO billing.stripe_invoices
               (org_id, period, stripe_invoice_id, status, currency, amount_due_cents,
                amount_paid_cents, amount_remaining_cents, due_at, finalized_at)
           VALUES (%s, %s, %s, %s, %s, %s, 0, %s, %s, %s)""",
        (
            org_id,
            period or dt.date(2026, 1, 1),
            inv,
            status,
            currency,
            cents,
            cents,
            dt.datetime.combine(due, dt.time(12), tzinfo=dt.UTC),
            dt.datetime(2026, 2, 1, tzinfo=dt.UTC),
        ),
    )
    pg.commit()


def set_status(pg, inv, status):
    pg.execute(
        "UPDATE billing.stripe_invoices SET status = %s WHERE stripe_invoice_id = %s", (status, inv)
    )
    pg.commit()


def mails(tag, maildir=None):
    """Messages the sink received for this test's orgs, in arrival order."""
    from billing.platform import settings

    out = []
    for p in sorted(Path(maildir or settings.mail_dir()).glob("*.eml")):
        msg = email.message_from_bytes(p.read_bytes())
        if (msg["X-Billing-Org"] or "").startswith(tag):
            out.append(msg)
    return out


def brief(msgs):
    return [(m["X-Billing-Org"], m["X-Billing-Dunning-Stage"], m["To"]) for m in msgs]


def notices(pg, tag):
    return pg.execute(
        """SELECT stripe_invoice_id, stage, status FROM billing.dunning_notices
            WHERE org_id LIKE %s ORDER BY stripe_invoice_id, days_past_due""",
        (tag + "%",),
    ).fetchall()


def redis_level(org):
    from billing.stripe_sync import parking

    return parking.client().get(f"billing:org:{org}:service_level")


def bodies(msg) -> dict[str, str]:
    parts = [p for p in msg.walk() if p.get_content_type() in ("text/plain", "text/html")]
    return {p.get_content_type(): p.get_payload(decode=True).decode() for p in parts}


# ---------------------------------------------------------------- the sequence
def test_each_stage_sent_once_across_reruns_then_paid_restores_service(pg, tag):
    org = f"{tag}-a"
    inv = f"in_{tag}a"
    add_org(pg, org, name="Acme <b>& Co</b>")
    add_invoice(pg, org, inv)
    customer, finance = f"ap@{org}.example.test", "finance@example.test"

    sent = []
    for n in (0, 1, 1, 3, 7, 7, 8, 14, 21, 21, 30, 31):
        s = dunning.run(day(n))
        assert s["failed"] == 0
        sent += [x["stage"] for x in s["notices"]]
    assert sent == ["reminder", "second_notice", "final_notice", "service_degraded", "escalation"]

    msgs = mails(tag)
    assert brief(msgs) == [
        (org, "reminder", customer),
        (org, "second_notice", customer),
        (org, "final_notice", customer),
        (org, "service_degraded", customer),
        (org, "escalation", finance),
    ]
    assert [m["Message-ID"] for m in msgs] == [
        f"<dunning.in_{tag}a.{s}@billing.local>" for s in sent
    ]
    first = bodies(msgs[0])
    assert msgs[0]["Subject"] == f"Payment reminder: invoice {inv} ($123.45) is past due"
    assert "now 1 day(s) past due. Amount due: $123.45." in first["text/plain"]
    assert "Hello Acme <b>& Co</b>," in first["text/plain"]
    assert "Hello Acme &lt;b&gt;&amp; Co&lt;/b&gt;," in first["text/html"]
    assert f"https://billing.example.test/pay/{inv}" in first["text/plain"]
    esc = bodies(msgs[4])["text/plain"]
    assert f"  - {inv}  period 2026-01  due 2026-03-01  30 days overdue  $123.45" in esc
    assert "Total overdue: $123.45" in esc

    assert notices(pg, tag) == [
        (inv, s, "sent")
        for s in ("reminder", "second_notice", "final_notice", "service_degraded", "escalation")
    ]
    assert redis_level(org) == "degraded"
    assert pg.execute(
        "SELECT service_level, as_of FROM billing.org_service_levels WHERE org_id = %s", (org,)
    ).fetchone() == ("degraded", day(21))

    # Paid: nothing further, service back to normal, both changes audited.
    set_status(pg, inv, "paid")
    s = dunning.run(day(40))
    assert (s["sent"], s["overdue_invoices"], s["restored"]) == (0, 0, [org])
    assert dunning.run(day(41))["restored"] == []
    assert len(mails(tag)) == 5
    assert redis_level(org) == "normal"
    assert pg.execute(
        """SELECT from_level, to_level, as_of, stripe_invoice_id, reason
             FROM billing.service_level_changes WHERE org_id = %s ORDER BY change_id""",
        (org,),
    ).fetchall() == [
        ("normal", "degraded", day(21), inv, f"invoice {inv} 21 days overdue"),
        ("degraded", "normal", day(40), None, "no overdue invoice"),
    ]
    # A backfill of an older day must not undo the newer decision.
    set_status(pg, inv, "open")
    assert dunning.run(day(25))["degraded"] == []
    assert redis_level(org) == "normal"


def test_catch_up_after_downtime_sends_only_the_current_stage(pg, tag):
    org = f"{tag}-b"
    add_org(pg, org)
    add_invoice(pg, org, f"in_{tag}b")
    s = dunning.run(day(16))
    assert (s["sent"], s["skipped"]) == (1, 2)
    assert dunning.run(day(16))["sent"] == 0
    assert brief(mails(tag)) == [(org, "final_notice", f"ap@{org}.example.test")]
    assert notices(pg, tag) == [
        (f"in_{tag}b", "reminder", "skipped"),
        (f"in_{tag}b", "second_notice", "skipped"),
        (f"in_{tag}b", "final_notice", "sent"),
    ]
    # Backfilling the missed days afterwards sends nothing old.
    for n in (1, 7, 10):
        assert dunning.run(day(n))["sent"] == 0
    assert len(mails(tag)) == 1


def test_minimum_amount_plan_override_and_dry_run(pg, tag):
    add_org(pg, f"{tag}-small")
    add_invoice(pg, f"{tag}-small", f"in_{tag}small", cents=499)  # below the usd minimum 500
    add_org(pg, f"{tag}-ent", plan="enterprise")
    add_invoice(pg, f"{tag}-ent", f"in_{tag}ent")
    add_org(pg, f"{tag}-jp", plan="tokyo", currency="jpy")
    add_invoice(pg, f"{tag}-jp", f"in_{tag}jp", cents=5_000, currency="jpy")

    dry = dunning.run(day(2), dry_run=True)
    assert [(w["org_id"], w["stage"]) for w in dry["would_send"]] == [(f"{tag}-jp", "reminder")]
    assert notices(pg, tag) == [] and mails(tag) == []

    assert dunning.run(day(2))["sent"] == 1  # enterprise reminders start at 3 days
    s = dunning.run(day(25))  # enterprise never degrades; jpy org does
    assert s["degraded"] == [f"{tag}-jp"]
    assert brief(mails(tag)) == [
        (f"{tag}-jp", "reminder", f"ap@{tag}-jp.example.test"),
        (f"{tag}-ent", "final_notice", f"ap@{tag}-ent.example.test"),
        (f"{tag}-jp", "service_degraded", f"ap@{tag}-jp.example.test"),
    ]
    assert "Amount due: ¥5,000." in bodies(mails(tag)[0])["text/plain"]
    assert redis_level(f"{tag}-ent") is None
    assert notices(pg, f"{tag}-small") == []


def test_the_policy_is_the_plan_of_the_invoiced_period(pg, tag):
    """An org upgraded to enterprise in January is dunned on enterprise terms for January's
    invoice (reminders from 3 days), though it was created on starter (docs/SUBSCRIPTIONS.md)."""
    org = f"{tag}-up"
    add_org(pg, org, plan="starter")
    pg.execute("UPDATE billing.subscriptions SET ends_at = '2026-01-15' WHERE org_id = %s", (org,))
    pg.execute(
        "INSERT INTO billing.subscriptions (org_id, plan, starts_at, created_by)"
        " VALUES (%s, 'enterprise', '2026-01-15', 'test')",
        (org,),
    )
    pg.commit()
    add_invoice(pg, org, f"in_{tag}up")
    [inv] = dunning.overdue_invoices(pg, day(2), org)
    assert inv.plan == "enterprise"
    assert dunning.run(day(2))["sent"] == 0  # starter would remind after 1 day
    assert dunning.run(day(3))["sent"] == 1


# ---------------------------------------------------------------- failures
def test_refused_recipient_is_recorded_and_retried_without_blocking_others(pg, tag, monkeypatch):
    from aiosmtpd.controller import Controller

    from billing.observability import export as metrics_export

    for o in ("a", "b", "c"):
        add_org(pg, f"{tag}-{o}")
        add_invoice(pg, f"{tag}-{o}", f"in_{tag}{o}")
    handler = RefusingHandler(f"ap@{tag}-b.example.test")
    port = free_port()
    server = Controller(handler, hostname="127.0.0.1", port=port)
    server.start()
    try:
        point_smtp_at(monkeypatch, port)
        s = dunning.run(day(1))
    finally:
        server.stop()
    assert (s["sent"], s["failed"]) == (2, 1)
    assert s["failures"][0]["invoice"] == f"in_{tag}b"
    assert "550" in s["failures"][0]["error"]
    assert [m["X-Billing-Org"] for m in handler.received] == [f"{tag}-a", f"{tag}-c"]
    row = pg.execute(
        """SELECT status, attempts, failures, error FROM billing.dunning_notices
            WHERE stripe_invoice_id = %s""",
        (f"in_{tag}b",),
    ).fetchone()
    assert row == (
        "failed",
        1,
        1,
        f"ap@{tag}-b.example.test refused: 550 5.1.1 mailbox unavailable",
    )

    f, up = metrics_export._Families(), {}
    metrics_export.collect_postgres(f, up)
    assert up["dunning"] == 1
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in (
            f.out["billing_dunning_notices_total"],
            f.out["billing_dunning_send_failures_total"],
        )
        for s in fam.samples
    }
    assert (
        samples[("billing_dunning_notices_total", (("stage", "reminder"), ("status", "failed")))]
        == 1
    )
    assert samples[("billing_dunning_send_failures_total", (("stage", "reminder"),))] == 1

    # Next run, back on the normal relay: only the failed one is retried, same Message-ID.
    monkeypatch.undo()
    s = dunning.run(day(2))
    assert (s["sent"], s["failed"]) == (1, 0)
    assert brief(mails(tag)) == [(f"{tag}-b", "reminder", f"ap@{tag}-b.example.test")]
    assert mails(tag)[0]["Message-ID"] == f"<dunning.in_{tag}b.reminder@billing.local>"
    assert notices(pg, tag) == [(f"in_{tag}{o}", "reminder", "sent") for o in "abc"]


def test_crash_between_claim_and_send_resends_with_the_same_message_id(pg, tag, monkeypatch):
    org, inv = f"{tag}-a", f"in_{tag}a"
    add_org(pg, org)
    add_invoice(pg, org, inv)
    # The relay is down: the claim is committed, the send fails at connect.
    point_smtp_at(monkeypatch, free_port())
    s = dunning.run(day(1))
    assert (s["sent"], s["failed"]) == (0, 1)
    # Simulate the worst case instead: the process died after claiming, before recording.
    pg.execute(
        "UPDATE billing.dunning_notices SET status = 'claimed', error = NULL WHERE org_id = %s",
        (org,),
    )
    pg.commit()
    monkeypatch.undo()
    assert dunning.run(day(1))["sent"] == 1
    assert dunning.run(day(1))["sent"] == 0
    (msg,) = mails(tag)
    assert msg["Message-ID"] == f"<dunning.{inv}.reminder@billing.local>"


def test_voided_invoice_cancels_its_pending_notice(pg, tag, monkeypatch):
    org, inv = f"{tag}-a", f"in_{tag}a"
    add_org(pg, org)
    add_invoice(pg, org, inv)
    point_smtp_at(monkeypatch, free_port())
    assert dunning.run(day(1))["failed"] == 1
    monkeypatch.undo()
    set_status(pg, inv, "void")
    assert dunning.run(day(2))["cancelled"] == 1
    assert notices(pg, tag) == [(inv, "reminder", "cancelled")]
    assert mails(tag) == []


# ---------------------------------------------------------------- templates and policy
def test_missing_template_variable_fails_before_anything_is_sent(pg, tag, tmp_path, monkeypatch):
    shutil.copytree(settings.dunning_templates_dir(), tmp_path / "t")
    (tmp_path / "t" / "second_notice.txt.j2").write_text(
        "Subject: hi\n\nDear {{ account_manager }}, pay {{ amount_due }}\n"
    )
    monkeypatch.setenv("BILLING_DUNNING_TEMPLATES", str(tmp_path / "t"))
    add_org(pg, f"{tag}-a")
    add_invoice(pg, f"{tag}-a", f"in_{tag}a")
    with pytest.raises(dunning.TemplateError) as exc:
        dunning.run(day(1))
    assert str(exc.value).startswith(
        "dunning template second_notice.txt.j2: 'account_manager' is undefined (provided variables: "
    )
    assert notices(pg, tag) == [] and mails(tag) == []


def test_render_needs_every_variable():
    variables = {**dunning.sample_variables(), "stage": "reminder"}
    del variables["pay_link"]
    with pytest.raises(dunning.TemplateError, match="reminder.txt.j2: 'pay_link' is undefined"):
        dunning.render("reminder", variables)


def _policy_doc():
    import yaml

    return yaml.safe_load(settings.dunning_policy_path().read_text())


def _broken(edit):
    doc = _policy_doc()
    edit(doc)
    return doc


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["stages"][1].update(days_past_due=1),
            "stages: days_past_due must increase: second_notice (1) comes after reminder (1)",
        ),
        (
            lambda d: d["stages"][2].update(action="sue"),
            "stages[2].action: expected one of notice, degrade, escalate, got 'sue'",
        ),
        (
            lambda d: d["stages"][0].update(days_past_due="1"),
            "stages[0].days_past_due: expected an integer >= 1, got '1'",
        ),
        (
            lambda d: d["minimum_amount_due"].update(usd=-1),
            "minimum_amount_due.usd: expected an integer >= 0, got -1",
        ),
        (
            lambda d: d["minimum_amount_due"].update(xxx=1),
            "minimum_amount_due.xxx: unsupported currency",
        ),
        (
            lambda d: d["plan_overrides"]["enterprise"]["stages"].update(nope=3),
            "plan_overrides.enterprise.stages.nope: no such stage in stages",
        ),
        (
            lambda d: d["plan_overrides"]["enterprise"]["stages"].update(reminder=40),
            "plan_overrides.enterprise.stages: days_past_due must increase",
        ),
        (lambda d: d.update(degradation={"enabled": "yes"}), "degradation.enabled: expected true"),
        (lambda d: d.update(colour="red"), "colour: unknown field"),
        (lambda d: d.pop("support_contact"), "support_contact: expected a non-empty string"),
    ],
)
def test_invalid_policy_names_the_field(edit, message):
    with pytest.raises(ConfigError) as exc:
        dunning.parse_policy(_broken(edit), Path("p.yaml"))
    assert str(exc.value).startswith(f"dunning policy p.yaml: {message}")


def test_policy_file_from_env(tmp_path, monkeypatch):
    bad = tmp_path / "dunning.yaml"
    bad.write_text("version: 1\nstages: []\n")
    monkeypatch.setenv("BILLING_DUNNING_POLICY", str(bad))
    with pytest.raises(ConfigError, match=rf"^dunning policy {bad}: stages: expected a non-empty"):
        dunning.load_policy()
    monkeypatch.delenv("BILLING_DUNNING_POLICY")
    default = dunning.load_policy()
    assert [(s.name, s.days_past_due, s.action) for s in default] == [
        ("reminder", 1, "notice"),
        ("second_notice", 7, "notice"),
        ("final_notice", 14, "notice"),
        ("service_degraded", 21, "degrade"),
        ("escalation", 30, "escalate"),
    ]


# ---------------------------------------------------------------- CLI
def test_cli_run_and_status(pg, tag, capsys):
    import json

    from billing import cli

    add_org(pg, f"{tag}-a")
    add_invoice(pg, f"{tag}-a", f"in_{tag}a")
    assert (
        cli.main(["dunning", "run", "--as-of", day(8).isoformat(), "--dry-run", "--format", "json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["would_send"][0]["stage"] == "second_notice"
    assert cli.main(["dunning", "run", "--as-of", day(8).isoformat(), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["sent"] == 1
    argv = ["dunning", "status", "--org", f"{tag}-a", "--as-of", day(9).isoformat()]
    assert cli.main([*argv, "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(n["stage"], n["status"]) for n in out["notices"]] == [
        ("reminder", "skipped"),
        ("second_notice", "sent"),
    ]
    assert out["overdue"][0]["days_overdue"] == 9
    # The default is for people: the amount due in its currency, the notices as history.
    assert cli.main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    row = table[table.index("overdue invoices:") + 3].split()
    assert row == [f"{tag}-a", f"in_{tag}a", "9", "$123.45", "second_notice"]
    notices = table[table.index("notices:") + 3 :]
    assert [r.split()[2:4] for r in notices] == [["reminder", "skipped"], ["second_notice", "sent"]]
    with pytest.raises(SystemExit) as exc:
        cli.main(["dunning", "run", "--as-of", "2026-3-1"])
    assert exc.value.code == 2
    assert "invalid day '2026-3-1': expected YYYY-MM-DD" in capsys.readouterr().err
