"""A hostile-input corpus for usage ingest, written into a landing zone with its expectations.

:func:`write_corpus` lays out one arrival day of files, lines and folder entries that producers,
tools and attackers get wrong, next to plain good events for four orgs (one per plan). Every
line carries the outcome ingest must give it, every file its status, every entry that is not
read its reason, so a test can check all of them exactly; :attr:`Corpus.good` lists the events
that must be billed, for computing invoices from the catalog.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

DAY = dt.date(2026, 11, 10)
RUN_END = dt.datetime(2026, 11, 11, tzinfo=dt.UTC)
AT = "2026-11-10T10:00:00Z"
ORGS = (  # org_id, plan, currency
    ("hx-starter", "starter", "usd"),
    ("hx-growth", "growth", "usd"),
    ("hx-enterprise", "enterprise", "eur"),
    ("hx-tokyo", "tokyo", "jpy"),
)
BLANK, ACCEPTED, NON_BILLABLE, DUPLICATE = "blank", "accepted", "non_billable", "duplicate"


@dataclass
class Corpus:
    root: Path  # the day folder
    lines: dict[str, list[str]] = field(default_factory=dict)  # file name -> outcome per line
    rejected: dict[str, str] = field(default_factory=dict)  # file name -> detail prefix
    skipped: dict[str, str] = field(default_factory=dict)  # entry name -> reason
    good: list[tuple[str, str, Decimal]] = field(default_factory=list)  # org, metric, quantity

    def monthly(self) -> dict[str, dict[str, Decimal]]:
        out: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
        for org, metric, q in self.good:
            out[org][metric] += q
        return out


def raw_event(eid: str, org: str = "hx-starter", metric: str = "api_calls", q="7", **extra) -> str:
    """One event line with ``q`` spelled exactly as given (the JSON text of the number)."""
    body = {"event_id": eid, "org_id": org, "metric": metric, "quantity": "@Q@", "occurred_at": AT}
    body.update(extra)
    return json.dumps(body).replace('"@Q@"', q)


class _File:
    def __init__(self, corpus: Corpus, name: str, eid: str):
        self.c, self.name, self.eid, self.n, self.data = corpus, name, eid, 0, []
        corpus.lines[name] = []

    def add(self, line: str | bytes, outcome: str, good: tuple | None = None) -> None:
        self.data.append(line.encode() if isinstance(line, str) else line)
        self.c.lines[self.name].append(outcome)
        if good is not None and outcome == ACCEPTED:
            self.c.good.append(good)

    def event(self, org="hx-starter", metric="api_calls", q="7", outcome=ACCEPTED, **extra):
        self.n += 1
        eid = extra.pop("event_id", f"{self.eid}-{self.n}")
        good = (org, metric, Decimal(q)) if outcome == ACCEPTED else None
        self.add(raw_event(eid, org, metric, q, **extra), outcome, good)
        return eid

    def bytes(self, newline: bytes = b"\n") -> bytes:
        return b"".join(line + newline for line in self.data)


def write_corpus(landing: Path) -> Corpus:
    root = landing / "usage" / f"dt={DAY.isoformat()}"
    root.mkdir(parents=True)
    c = Corpus(root)

    # plain good usage for every org, spread over two files (one gzipped)
    a = _File(c, "a-good.jsonl", "a")
    for i, (org, _plan, _cur) in enumerate(ORGS):
        a.event(org, "api_calls", str(120_000 + 1_111 * i))
        a.event(org, "storage_gb", "250.5")
        a.event(org, "compute_minutes", "1234.25")
        a.event(org, "emails_sent", str(100_100 + i))
    (root / a.name).write_bytes(a.bytes())
    g = _File(c, "b-good.jsonl.gz", "b")
    for org, _plan, _cur in ORGS:
        g.event(org, "api_calls", "900000")
        g.event(org, "storage_gb", "0.000000001")  # the smallest step of the range
    g.event("hx-growth", "api_calls", "5", billable=False, outcome=NON_BILLABLE)
    (root / g.name).write_bytes(gzip.compress(g.bytes(), mtime=0))

    # quantities: the range is 0 .. 10^9 with at most 9 decimal places
    q = _File(c, "c-quantities.jsonl", "c")
    q.event(q="0")
    q.event(q="-0")  # minus zero is zero
    q.event(q="1000000000")  # the top of the range itself
    q.event(q="999999999.999999999")
    q.event(q="1.500000000000")  # trailing zeros past the 9th decimal: 1.5
    q.event(q="1E2")
    q.event(q="25e-1")
    for big in (
        "1000000001",
        "1000000000.000000001",
        "18446744073709551615",
        "1e308",
        "9" * 1000,
        "0.0000000001",
        "1.0000000001",
        "1e10",
    ):
        q.event(q=big, outcome="quantity_out_of_range")
    q.event(q="1e400000", outcome="malformed_json")  # beyond PostgreSQL's numeric: not JSON to it
    q.event(q="NaN", outcome="non_finite_quantity")
    q.event(q="Infinity", outcome="non_finite_quantity")
    q.event(q="-Infinity", outcome="non_finite_quantity")
    q.event(q="-1", outcome="negative_quantity")
    q.event(q="-0.000000001", outcome="negative_quantity")
    q.event(q='"12"', outcome="bad_type")
    q.event(q='"\u0661\u0662"', outcome="bad_type")  # Arabic-Indic digits, as a string
    q.event(q="\u0661\u0662", outcome="malformed_json")  # ... and bare
    q.event(q='"\uff11\uff12"', outcome="bad_type")  # full-width digits
    q.event(q="true", outcome="bad_type")
    q.event(q="null", outcome="missing_field")
    q.event(q="[1]", outcome="bad_type")
    q.event(q='{"v": 1}', outcome="bad_type")
    (root / q.name).write_bytes(q.bytes())

    # every other kind of bad line, mixed with good ones
    h = _File(c, "d-hostile.jsonl", "d")
    first = h.event()
    h.add(raw_event(first), DUPLICATE)
    h.add(raw_event(first, q="8"), "conflict")
    h.add(b"", BLANK)
    h.add(b"   \t ", BLANK)
    h.add(b"not json at all", "malformed_json")
    h.add(b'{"event_id": "d-x", "org_id": "hx-starter"', "malformed_json")
    h.add(b'{"event_id": "d-\xff\xfe", "org_id": "hx-starter"}', "not_utf8")
    h.add(b"\xc3\x28", "not_utf8")
    h.add(raw_event("d-nul").replace('"d-nul"', '"d-\x00"').encode(), "malformed_json")
    h.add(b"[" * 5000 + b"]" * 4999, "malformed_json")  # nested garbage, unbalanced
    h.add(b'{"a": ' * 3000 + b"1" + b"}" * 3000, "missing_field")  # nested, no fields
    h.add(raw_event("d-long", properties={"pad": "x" * 70_000}), "line_too_long")
    h.add(b"[1, 2]", "bad_type")
    h.add(b"null", "bad_type")
    h.add(b"5", "bad_type")
    h.add(b'"text"', "bad_type")
    h.add(b"{}", "missing_field")
    h.event(event_id="", outcome="missing_field")
    h.event(event_id=5, outcome="missing_field")  # not a string: no event_id
    h.event(org=None, outcome="missing_field")
    h.event(org="hx-nobody", outcome="unknown_org")
    h.event(metric="teleportations", outcome="unknown_metric")
    h.event(billable="yes", outcome="bad_type")
    h.event(source=7, outcome="bad_type")
    h.event(properties="x", outcome="bad_type")
    h.event(occurred_at="yesterday", outcome="bad_timestamp")
    h.event(occurred_at="2026-02-30T10:00:00Z", outcome="bad_timestamp")
    h.event(occurred_at="2026-11-10T10:00:00", outcome="bad_timestamp")  # no offset
    h.event(occurred_at="2026-11-11T00:05:01Z", outcome="future_event")
    h.event(occurred_at="2026-10-06T23:59:59Z", outcome="too_late")
    h.event(occurred_at=1762077600, outcome="missing_field")
    h.event(properties={"ok": True, "n": [1, 2.5]})  # good, with properties
    h.event("hx-tokyo", "api_calls", "3", source="tab\there")  # good, needs COPY escaping
    (root / h.name).write_bytes(h.bytes())

    # a byte-order mark and CRLF line ends, as Windows tools write them
    w = _File(c, "e-windows.jsonl", "e")
    w.event("hx-enterprise", "api_calls", "11")
    w.event("hx-enterprise", "emails_sent", "3")
    (root / w.name).write_bytes(b"\xef\xbb\xbf" + w.bytes(b"\r\n"))

    # upper-case extension: loaded (names match case-insensitively)
    u = _File(c, "f-upper.JSONL", "f")
    u.event("hx-growth", "compute_minutes", "61")
    (root / u.name).write_bytes(u.bytes())

    # files that cannot be decoded: rejected whole, nothing of them loaded
    bad = _File(c, "x", "x")  # lines that would be good, to prove none of them is loaded
    for _ in range(50):
        bad.event()
    del c.lines["x"]
    c.good = c.good[:-50]  # none of them is billed
    payload = gzip.compress(bad.bytes(), mtime=0)
    (root / "g-truncated.jsonl.gz").write_bytes(payload[: len(payload) // 2])
    c.rejected["g-truncated.jsonl.gz"] = f"truncated at byte {len(payload) // 2}"
    (root / "h-trailing.jsonl.gz").write_bytes(payload + b"\x00\x00garbage")
    c.rejected["h-trailing.jsonl.gz"] = f"trailing garbage at byte {len(payload)}"
    (root / "i-plain.jsonl.gz").write_bytes(bad.bytes())
    c.rejected["i-plain.jsonl.gz"] = "not a gzip file at byte 0"
    flipped = bytearray(payload)
    flipped[len(flipped) // 2] ^= 0xFF
    (root / "j-flipped.jsonl.gz").write_bytes(bytes(flipped))
    c.rejected["j-flipped.jsonl.gz"] = "invalid gzip data at byte"
    (root / "k-empty.jsonl.gz").write_bytes(b"")  # an empty file is an empty file
    c.lines["k-empty.jsonl.gz"] = []

    # entries that are never read
    (root / "x.json").write_bytes(raw_event("never-1").encode() + b"\n")
    c.skipped["x.json"] = "unsupported_extension"
    (root / "x.jsonl.bak").write_bytes(raw_event("never-2").encode() + b"\n")
    c.skipped["x.jsonl.bak"] = "unsupported_extension"
    (root / ".y.jsonl.tmp").write_bytes(raw_event("never-3").encode() + b"\n")
    c.skipped[".y.jsonl.tmp"] = "in_flight"
    (root / "d.jsonl").mkdir()
    (root / "d.jsonl" / "inner.jsonl").write_bytes(raw_event("never-4").encode() + b"\n")
    c.skipped["d.jsonl"] = "directory"
    os.symlink(root / "gone.jsonl", root / "dangling.jsonl")
    c.skipped["dangling.jsonl"] = "symlink"
    os.symlink("/etc/passwd", root / "passwd.jsonl")
    c.skipped["passwd.jsonl"] = "symlink"
    other = landing / "usage" / "dt=2026-11-09"
    other.mkdir(parents=True)
    (other / "yesterday.jsonl").write_bytes(raw_event("never-5").encode() + b"\n")
    os.symlink(other / "yesterday.jsonl", root / "from-yesterday.jsonl")
    c.skipped["from-yesterday.jsonl"] = "symlink"
    os.mkfifo(root / "pipe.jsonl")  # opening it would block: it must not even be opened
    c.skipped["pipe.jsonl"] = "not_a_file"
    return c
