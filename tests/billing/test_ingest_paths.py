"""Ingest's fast SQL path keeps exactly the lines (and values) the safe path keeps.

The fast path (json_populate_record, direct casts) exists for speed only; every line it does
not reject with a cast error must come out identical to the safe path's, the reference that
names every reason. Checked line by line on a real Postgres, on edge cases and generated lines.
Also: what counts as the same payload (duplicate) and what as a conflict.
"""

from __future__ import annotations

import datetime as dt
import json

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing import ingest, pricing

DAY = dt.date(2026, 11, 2)
RUN_END = dt.datetime(2026, 11, 3, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def cx(stack):
    from billing import db

    with db.connect(autocommit=True) as c:
        c.execute(
            """INSERT INTO billing.organizations (org_id, name, email, plan, currency)
               VALUES ('org-1', 'Org 1', 'o1@example.test', 'starter', 'usd')
               ON CONFLICT DO NOTHING"""
        )
    with db.connect(autocommit=True) as c:
        c.execute("SET TimeZone = 'UTC'")
        yield c


@pytest.fixture(scope="module")
def ctx():
    return ingest._Context(
        day=DAY,
        run_end=RUN_END,
        metrics=sorted(pricing.load_catalog().metrics),
        lateness=dt.timedelta(days=35),
        max_line=65536,
    )


def kept(cx, ctx, raw: str, *, safe: bool):
    """The ingest_ok row the path keeps for one staged line: a tuple, None, or 'cast error'."""
    try:
        with cx.transaction():
            cx.execute(ingest._STAGE)
            cx.execute("INSERT INTO ingest_stage (raw) VALUES (%s)", (raw,))
            ingest._keep_valid(cx, ctx, safe=safe)
            rows = cx.execute("SELECT * FROM ingest_ok").fetchall()
            raise psycopg.Rollback()
    except psycopg.DataError:
        assert not safe, f"the safe path raised on {raw!r}"
        return "cast error"
    assert len(rows) <= 1
    return rows[0] if rows else None


def same_on_both_paths(cx, ctx, raw: str):
    fast = kept(cx, ctx, raw, safe=False)
    safe = kept(cx, ctx, raw, safe=True)
    if fast != "cast error":
        assert fast == safe, raw
    return fast, safe


BASE = {
    "event_id": "e-1",
    "org_id": "org-1",
    "metric": "api_calls",
    "quantity": 3,
    "occurred_at": "2026-11-02T10:00:00Z",
}


def obj(**over) -> str:
    e = {**BASE, **over}
    return json.dumps({k: v for k, v in e.items() if v is not ...})


EDGE_LINES = [
    obj(),
    obj(billable=False),
    obj(billable=None),
    obj(billable="false"),
    obj(billable="maybe"),
    obj(source=None),
    obj(source=7),
    obj(source="tab\there \u00e9"),
    obj(properties={"a": [1, 2.50], "b": {"c": None}}),
    obj(properties=[1]),
    obj(properties="x"),
    obj(properties=None),
    obj(quantity=0),
    obj(quantity=1.5),
    obj(quantity=-1),
    obj(quantity="5"),
    obj(quantity=None),
    obj(quantity=True),
    obj(quantity=...),
    '{"event_id":"e-1","org_id":"org-1","metric":"api_calls","quantity":-0,"occurred_at":"2026-11-02T10:00:00Z"}',
    '{"event_id":"e-1","org_id":"org-1","metric":"api_calls","quantity":1.50,"occurred_at":"2026-11-02T10:00:00Z"}',
    '{"event_id":"e-1","org_id":"org-1","metric":"api_calls","quantity":1E2,"occurred_at":"2026-11-02T10:00:00Z"}',
    '{"event_id":"e-1","org_id":"org-1","metric":"api_calls","quantity":2.5e-3,"occurred_at":"2026-11-02T10:00:00Z"}',
    '{"event_id":"e-1","org_id":"org-1","metric":"api_calls","quantity":-1,"quantity":2,"occurred_at":"2026-11-02T10:00:00Z"}',
    '{"event_id":"e-1","event_id":"","org_id":"org-1","metric":"api_calls","quantity":2,"occurred_at":"2026-11-02T10:00:00Z"}',
    '{ "event_id" : "e-\\u0031" , "org_id":"org-1","metric":"api_calls","quantity":2,"occurred_at":"2026-11-02T10:00:00Z" }',
    obj(event_id=""),
    obj(event_id=5),
    obj(event_id=None),
    obj(event_id=...),
    obj(org_id="org-2"),
    obj(org_id=""),
    obj(org_id=1),
    obj(metric="teleportations"),
    obj(metric=["api_calls"]),
    obj(occurred_at="2026-11-02T10:00:00+01:00"),
    obj(occurred_at="2026-11-02T10:00:00-05:30"),
    obj(occurred_at="2026-11-02t10:00:00z"),
    obj(occurred_at="2026-11-02 10:00:00Z"),
    obj(occurred_at="2026-11-02T10:00:00.123456Z"),
    obj(occurred_at="2026-11-02T10:00:00.1234567Z"),
    obj(occurred_at="2026-11-02T10:00:00"),
    obj(occurred_at="2026-11-02"),
    obj(occurred_at="2026-11-02T24:00:00Z"),
    obj(occurred_at="2026-02-30T10:00:00Z"),
    obj(occurred_at="2026-11-03T00:05:00Z"),
    obj(occurred_at="2026-11-03T00:05:00.000001Z"),
    obj(occurred_at="2026-09-29T00:00:00Z"),
    obj(occurred_at="2026-09-28T23:59:59.999999Z"),
    obj(occurred_at=1762077600),
    obj(occurred_at=""),
    "[1, 2]",
    "5",
    '"text"',
    "null",
    "{}",
    '{"event_id": "e-1", "org_id": "org-1"',
    '{"event_id":"e-\\u0000","org_id":"org-1","metric":"api_calls","quantity":2,"occurred_at":"2026-11-02T10:00:00Z"}',
    '{"event_id":"e-1","org_id":"org-1","metric":"api_calls","quantity":1e400000,"occurred_at":"2026-11-02T10:00:00Z"}',
]


@pytest.mark.parametrize("raw", EDGE_LINES)
def test_edge_lines_agree(cx, ctx, raw):
    same_on_both_paths(cx, ctx, raw)


def test_edge_lines_cover_both_outcomes(cx, ctx):
    # The comparison above must not pass vacuously: the list holds lines of every kind.
    outcomes = [same_on_both_paths(cx, ctx, raw) for raw in EDGE_LINES]
    assert sum(1 for f, s in outcomes if f not in (None, "cast error")) >= 20  # kept by both
    assert sum(1 for f, s in outcomes if f is None and s is None) >= 20  # rejected by both
    assert sum(1 for f, s in outcomes if f == "cast error") >= 5  # fast path gives up


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**20),
    st.decimals(min_value=-5, max_value=10**6, allow_nan=False, places=3).map(float),
    st.sampled_from(
        [
            "",
            "org-1",
            "org-2",
            "api_calls",
            "storage_gb",
            "2026-11-02T10:00:00Z",
            "2026-11-02T23:30:00+05:00",
            "2026-11-03T00:05:00Z",
            "2026-09-28T23:59:59Z",
            "2026-11-02T10:00:00",
            "yesterday",
        ]
    ),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_FIELDS = ("event_id", "org_id", "metric", "quantity", "occurred_at", "billable", "source", "properties")


@st.composite
def lines(draw):
    e = dict(BASE)
    for k in draw(st.lists(st.sampled_from(_FIELDS), max_size=3, unique=True)):
        if draw(st.booleans()):
            e.pop(k, None)
        else:
            e[k] = draw(_values)
    keys = draw(st.permutations(list(e)))
    return json.dumps({k: e[k] for k in keys}, ensure_ascii=draw(st.booleans()))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=lines())
def test_generated_lines_agree(cx, ctx, raw):
    same_on_both_paths(cx, ctx, raw)


def test_payload_identity_is_by_value(clean_db, pg, tmp_path):
    """Equal values spelled differently are duplicates; any changed value is a conflict."""
    pg.execute(
        """INSERT INTO billing.organizations (org_id, name, email, plan, currency)
           VALUES ('org-1', 'Org 1', 'o1@example.test', 'starter', 'usd')"""
    )
    pg.commit()
    base = '{"event_id":"%s","org_id":"org-1","metric":"api_calls","quantity":1.50,"occurred_at":"2026-11-02T10:00:00Z","properties":{"a":1,"b":[2.0]}}'
    first = [base % f"e-{i}" for i in range(1, 7)]
    again = [
        # duplicates: key order, number spelling, offset spelling, whitespace, explicit defaults
        '{"occurred_at":"2026-11-02T11:00:00+01:00","quantity":1.5,"metric":"api_calls","org_id":"org-1","properties":{"b":[2],"a":1.0},"event_id":"e-1"}',
        '{"event_id":"e-2","org_id":"org-1","metric":"api_calls","quantity":15e-1,"occurred_at":"2026-11-02T10:00:00.000Z","properties":{"a":1,"b":[2.0]},"billable":true,"source":null}',
        # conflicts: one value differs
        (base % "e-3").replace("1.50", "1.51"),
        (base % "e-4").replace('"b":[2.0]', '"b":[2.0,3]'),
        (base % "e-5").replace("}}", '},"billable":false}'),
        (base % "e-6").replace("}}", '},"source":"api"}'),
    ]
    day_dir = tmp_path / "usage" / f"dt={DAY.isoformat()}"
    day_dir.mkdir(parents=True)
    (day_dir / "a.jsonl").write_text("\n".join(first) + "\n")
    ingest.ingest_day(DAY, RUN_END, landing_uri="file://" + str(tmp_path))
    (day_dir / "b.jsonl").write_text("\n".join(again) + "\n")
    s = ingest.ingest_day(DAY, RUN_END, landing_uri="file://" + str(tmp_path))
    b = next(f for f in s["files"] if f["path"].endswith("b.jsonl"))
    assert (b["mode"], b["accepted"], b["duplicate"], b["reasons"]) == (
        "fast",
        0,
        2,
        {"conflict": 4},
    )
    conflicts = pg.execute(
        "SELECT line_no FROM billing.usage_quarantine WHERE reason = 'conflict' ORDER BY line_no"
    ).fetchall()
    assert conflicts == [(3,), (4,), (5,), (6,)]
    # the registry's hash is the stored event's hash (what migration 0006 recomputes)
    assert pg.execute(
        """SELECT count(*) FROM billing.usage_event_ids r JOIN billing.usage_events e
               ON md5(e.event_id)::uuid = r.event_key
            WHERE r.payload_hash = billing.usage_payload_hash(e.event_id, e.org_id, e.metric,
                  e.quantity, e.occurred_at, e.billable, e.source, e.properties)"""
    ).fetchone() == (6,)
