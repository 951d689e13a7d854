"""Ingest's fast paths keep exactly the lines (and values) the safe SQL path keeps.

A line is typed in Python while streaming (``billing.ingest.usage_line``) or judged by SQL, first by a
fast statement (direct casts) and, if that gives up, by the safe one, the reference that names
every reason. Both fast paths exist for speed only: every line they keep must come out
identical to the safe path's. Checked line by line on a real Postgres, on edge cases and on
generated lines. Also: what counts as the same payload (duplicate) and what as a conflict.
"""

from __future__ import annotations

import datetime as dt
import io
import json

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing import pricing
from billing.ingest import loader as ingest
from billing.ingest import usage_line

DAY = dt.date(2026, 11, 2)
RUN_END = dt.datetime(2026, 11, 3, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def cx(stack):
    from billing.platform import db

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


_COLUMNS = """line_no, event_key, event_id, org_id, metric, quantity::text, occurred_at, billable,
               source, properties"""
LEFT = "left to SQL"


def kept(cx, ctx, raw: str, path: str):
    """What a path makes of one line: its typed staging row, None (not valid), 'cast error'
    (the fast SQL path gives up on the file) or LEFT (Python leaves the line to SQL)."""
    try:
        with cx.transaction():
            cx.execute(ingest._STAGE)
            if path == "python":
                p = ingest._params(ctx)
                orgs = [r[0] for r in cx.execute("SELECT org_id FROM billing.organizations")]
                typer = usage_line.Typer.create(orgs, ctx.metrics, p["earliest"], p["latest"])
                with cx.cursor().copy(
                    f"COPY ingest_stage ({usage_line.STAGE_COLUMNS}) FROM STDIN"
                ) as copy:
                    st = ingest._Stream(copy.write, ctx.max_line, typer)
                    ingest._pump(io.BytesIO(raw.encode() + b"\n"), st)
                pre = cx.execute("SELECT pre FROM ingest_stage").fetchone()[0]
            else:
                cx.execute("INSERT INTO ingest_stage (raw) VALUES (%s)", (raw,))
                ingest._mark_valid(cx, ctx, safe=path == "safe")
                pre = "valid"
            rows = cx.execute(f"SELECT {_COLUMNS} FROM ingest_stage WHERE pre = 'valid'").fetchall()
            raise psycopg.Rollback()
    except ingest._fast_gives_up():
        assert path == "fast", f"the {path} path raised on {raw!r}"
        return "cast error"
    if pre is None:
        return LEFT
    if pre != "valid":  # rejected while streaming (pre: reason<US>bytes<US>detail)
        return None
    assert len(rows) <= 1
    return rows[0] if rows else None


def same_on_all_paths(cx, ctx, raw: str):
    py, fast, safe = (kept(cx, ctx, raw, path) for path in ("python", "fast", "safe"))
    if fast != "cast error":
        assert fast == safe, raw
    if py != LEFT:  # typed in Python, or rejected while streaming
        assert py == safe, raw
    return py, fast, safe


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
    obj(properties={}),
    obj(properties={"k": "tab\tand \\ backslash", "n": [1, 2.50, -3], "b": True, "z": None}),
    obj(properties={"deep": [[[[{"a": 1}]]]]}),
    obj(properties={"e": 1e30}),
    obj(properties={"u": "\u00e9\u0000"}),
    obj(properties={"big": 10**40, "s": "x" * 5000}),
    obj(event_id="e-p1")[:-1] + ', "properties": {"a": 1, "a": 2}}',
    obj(event_id="e-p2")[:-1] + ', "properties": {\t"a" :\r1 }}',
    obj(event_id="e-p3")[:-1] + ', "properties": {"a": "\\u0041"}}',
    obj(event_id="e-p4")[:-1] + ', "properties": {"v1e5": "x1E9"}}',
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
    obj(occurred_at="2026-11-02T10:00:00+15:59"),
    obj(occurred_at="2026-11-02T10:00:00+16:00"),  # Python takes offsets < 24 h, PostgreSQL not
    obj(occurred_at="2026-11-02T10:00:00-23:59"),
    obj(occurred_at="2026-11-02T10:00:00.\u0661Z"),  # a non-ASCII digit
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
    # the quantity range (billing.pricing.catalog.QUANTITY_MAX = 10^9, QUANTITY_DECIMALS = 9)
    *(
        obj(quantity=...)[:-1] + f', "quantity": {q}}}'
        for q in (
            "1000000000",
            "1000000000.000000000000",
            "1000000000.000000001",
            "1000000001",
            "999999999.999999999",
            "0.000000001",
            "0.0000000001",
            "1.5000000000000",
            "1.0000000001",
            "18446744073709551615",
            "1e9",
            "1e308",
            "1E-9",
            "1e-10",
            "9" * 1000,
        )
    ),
    # values PostgreSQL cannot take: must never reach a typed COPY row (the file would fail)
    obj(quantity=...)[:-1] + ', "quantity": 0.' + "1" * 20000 + "}",
    obj(properties=...)[:-1] + ', "properties": ' + "[" * 30000 + "]" * 30000 + "}",
]


@pytest.mark.parametrize("raw", EDGE_LINES, ids=range(len(EDGE_LINES)))
def test_edge_lines_agree(cx, ctx, raw):
    same_on_all_paths(cx, ctx, raw)


def test_edge_lines_cover_every_outcome(cx, ctx):
    # The comparisons above must not pass vacuously: the list holds lines of every kind.
    outcomes = [same_on_all_paths(cx, ctx, raw) for raw in EDGE_LINES]
    assert sum(1 for p, f, s in outcomes if p not in (LEFT, None)) >= 12  # typed in Python
    assert sum(1 for p, f, s in outcomes if p == LEFT and s is not None) >= 8  # valid, by SQL
    assert sum(1 for p, f, s in outcomes if f not in (None, "cast error")) >= 20  # fast SQL
    assert sum(1 for p, f, s in outcomes if f is None and s is None) >= 20  # rejected
    assert sum(1 for p, f, s in outcomes if f == "cast error") >= 5  # fast SQL gives up


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
_FIELDS = (
    "event_id",
    "org_id",
    "metric",
    "quantity",
    "occurred_at",
    "billable",
    "source",
    "properties",
)


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


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=lines())
def test_generated_lines_agree(cx, ctx, raw):
    same_on_all_paths(cx, ctx, raw)


def test_payload_identity_is_by_value(clean_db, pg, tmp_path):
    """Equal values spelled differently are duplicates; any changed value is a conflict, on
    lines typed in Python (no properties) and on lines judged by SQL (with properties)."""
    pg.execute(
        """INSERT INTO billing.organizations (org_id, name, email, plan, currency)
           VALUES ('org-1', 'Org 1', 'o1@example.test', 'starter', 'usd')"""
    )
    pg.commit()
    props = '{"event_id":"%s","org_id":"org-1","metric":"api_calls","quantity":1.50,"occurred_at":"2026-11-02T10:00:00Z","properties":{"a":1,"b":[2.0]}}'
    plain = '{"event_id":"%s","org_id":"org-1","metric":"api_calls","quantity":1.50,"occurred_at":"2026-11-02T10:00:00Z"}'
    first = [props % f"e-{i}" for i in range(1, 5)] + [plain % f"p-{i}" for i in range(1, 5)]
    again = [
        # duplicates: key order, number spelling, offset spelling, whitespace, explicit defaults
        '{"occurred_at":"2026-11-02T11:00:00+01:00","quantity":1.5,"metric":"api_calls","org_id":"org-1","properties":{"b": [2], "a": 1.0},"event_id":"e-1"}',
        '{"event_id":"e-2","org_id":"org-1","metric":"api_calls","quantity":15e-1,"occurred_at":"2026-11-02T10:00:00.000Z","properties":{"a":1,"b":[2.0]},"billable":true,"source":null}',
        # conflicts: one value differs
        (props % "e-3").replace('"b":[2.0]', '"b":[2,2]'),
        (props % "e-4").replace("}}", '},"source":"api"}'),
        # the same, typed in Python
        '{"occurred_at":"2026-11-02T11:00:00.000000+01:00","quantity":1.5,"metric":"api_calls","org_id":"org-1","event_id":"p-1","x":1}',
        '{"event_id":"p-2","org_id":"org-1","metric":"api_calls","quantity":1.500,"occurred_at":"2026-11-02T10:00:00Z","billable":true}',
        (plain % "p-3").replace("1.50", "1.51"),
        (plain % "p-4").replace("}", ',"billable":false}'),
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
        4,
        {"conflict": 4},
    )
    conflicts = pg.execute(
        """SELECT line_no, raw, raw_bytes FROM billing.usage_quarantine
            WHERE reason = 'conflict' ORDER BY line_no"""
    ).fetchall()
    assert [(n, raw, size) for n, raw, size in conflicts] == [
        (n, again[n - 1], len(again[n - 1])) for n in (3, 4, 7, 8)
    ]
    # the registry's hash is the stored event's hash (what migration 0006 recomputes)
    assert pg.execute(
        """SELECT count(*) FROM billing.usage_event_ids r JOIN billing.usage_events e
               ON md5(e.event_id)::uuid = r.event_key
            WHERE r.payload_hash = billing.usage_payload_hash(e.event_id, e.org_id, e.metric,
                  e.quantity, e.occurred_at, e.billable, e.source, e.properties)"""
    ).fetchone() == (8,)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_read_lines_across_chunk_boundaries(monkeypatch, chunk):
    """The raw text of a conflicting line typed in Python is read back by line number."""
    monkeypatch.setattr(ingest, "CHUNK", chunk)
    lines = [b"first", b"", b"a somewhat longer third line", b"4", b"x" * 50, b"last, no newline"]
    data = b"\n".join(lines)
    wanted = [1, 2, 3, 5, 6]
    got = ingest._read_lines(io.BytesIO(data), wanted)
    assert got == {n: lines[n - 1] for n in wanted}
    assert ingest._read_lines(io.BytesIO(data + b"\n"), [6]) == {6: lines[5]}
    assert ingest._read_lines(io.BytesIO(data), [4]) == {4: b"4"}


def test_lines_postgres_cannot_parse_are_quarantined_not_fatal(clean_db, pg, tmp_path):
    """A line nested deeper than PostgreSQL's stack, or a number beyond numeric, is one bad
    line: the file loads, the line is quarantined (a failing file would fail on every retry)."""
    pg.execute(
        """INSERT INTO billing.organizations (org_id, name, email, plan, currency)
           VALUES ('org-1', 'Org 1', 'o1@example.test', 'starter', 'usd')"""
    )
    pg.commit()
    day_dir = tmp_path / "usage" / f"dt={DAY.isoformat()}"
    day_dir.mkdir(parents=True)
    deep = "[" * 30000 + "]" * 30000
    lines = [
        obj(event_id="ok-1"),
        obj(event_id="deep-1")[:-1] + ', "properties": ' + deep + "}",  # ends in }
        deep,  # does not end in }
        obj(event_id="num-1", quantity=...)[:-1] + ', "quantity": 0.' + "1" * 20000 + "}",
        obj(event_id="ok-2"),
    ]
    (day_dir / "a.jsonl").write_text("\n".join(lines) + "\n")
    s = ingest.ingest_day(DAY, RUN_END, landing_uri="file://" + str(tmp_path), workers_=1)
    f = s["files"][0]
    assert (f["status"], f["accepted"], f["reasons"]) == ("loaded", 2, {"malformed_json": 3})
    assert pg.execute(
        "SELECT line_no FROM billing.usage_quarantine ORDER BY line_no"
    ).fetchall() == [(2,), (3,), (4,)]
