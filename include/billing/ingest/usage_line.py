"""Typing clean usage lines in Python, the common case of ingest (contract: docs/USAGE_EVENTS.md).

Ingest's streaming pass hands blocks of lines here. A line that is plainly valid becomes a
typed staging row (``pre = 'valid'``) with its registry key computed here, so PostgreSQL only
stores it (and hashes its payload with ``billing.usage_payload_hash`` when registering it).
Every other line (anything unusual, not only bad lines) is left for SQL, which judges it and
names the reason of a bad one. The rule is one-sided: a line is typed here only when SQL would
accept it with exactly the same values, which ``tests/billing/ingest/test_ingest_paths.py`` checks
line by line against the SQL paths.

Lines left for SQL, by design: ``properties`` PostgreSQL might not parse (see
:func:`_properties`), a quantity with an exponent or a sign or more than 9 digits before or
after the point (the range: ``billing.pricing.catalog.QUANTITY_MAX``), a timestamp not in
``YYYY-MM-DDTHH:MM:SS[.ffffff](Z|±HH:MM)`` (offset at most 15:59), strings needing COPY
escapes, and anything invalid. Nothing PostgreSQL could reject reaches a typed row: one such
row would fail the file's COPY, on every retry.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass

import msgspec

from billing.pricing.catalog import QUANTITY_DECIMALS, QUANTITY_MAX

_DIGITS = frozenset(b"0123456789")
_INT_DIGITS = len(str(int(QUANTITY_MAX))) - 1  # 9: below QUANTITY_MAX = 10^9
_DECIMALS = QUANTITY_DECIMALS
_QUANTITY_CHARS = _INT_DIGITS + 1 + _DECIMALS
_COPY_SPECIAL = re.compile(r"[\\\t\n\r\x00]").search  # needs COPY escaping: left for SQL
_md5 = hashlib.md5
_fromisoformat = dt.datetime.fromisoformat

# Staging columns after (raw, pre): a raw line for SQL has NULL in all of them.
STAGE_COLUMNS = (
    "raw, pre, event_key, event_id, org_id, metric, quantity, occurred_at, billable, source, "
    "properties"
)
NULL = "\\N"
TYPED_NULLS = "\t\\N" * (len(STAGE_COLUMNS.split(",")) - 2)  # all but raw, pre


class Event(msgspec.Struct):
    """The fields a line must have, with strict JSON types (5 is not a string, "5" not a number)."""

    event_id: str
    org_id: str
    metric: str
    quantity: msgspec.Raw
    occurred_at: str
    billable: bool | None = None
    source: str | None = None
    properties: msgspec.Raw = msgspec.Raw()


_DECODER = msgspec.json.Decoder(Event)


def _timestamp_shape(t: str) -> bool:
    """``YYYY-MM-DDTHH:MM:SS[.f{1,6}](Z|±HH:MM)`` by position (the parse checks the digits)."""
    n = len(t)
    if (
        n < 20
        or n > 32
        or t[4] != "-"
        or t[7] != "-"
        or t[10] != "T"
        or t[13] != ":"
        or t[16] != ":"
    ):
        return False
    if t[-1] == "Z":
        tz = n - 1
    elif t[-6] in "+-" and t[-3] == ":" and t[-5:-3] <= "15":
        tz = n - 6  # PostgreSQL takes offsets up to 15:59 (Python up to 23:59)
    else:
        return False
    if tz == 19:
        return True
    return t[19] == "." and 1 <= tz - 20 <= 6 and t[20:tz].isdigit()


@dataclass(frozen=True)
class Typer:
    """Turns blocks of lines into staging rows. ``orgs``/``metrics``: the accepted values."""

    orgs: frozenset[str]
    metrics: frozenset[str]
    earliest: dt.datetime
    latest: dt.datetime
    earliest_z: str = ""  # the bounds as YYYY-MM-DDTHH:MM:SSZ when they are whole seconds
    latest_z: str = ""

    @classmethod
    def create(cls, orgs, metrics, earliest: dt.datetime, latest: dt.datetime) -> Typer:
        def z(at: dt.datetime) -> str:
            return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        whole = earliest.microsecond == 0 and latest.microsecond == 0
        return cls(
            # values that would need COPY escaping are left for SQL
            frozenset(o for o in orgs if o and not _COPY_SPECIAL(o)),
            frozenset(m for m in metrics if m and not _COPY_SPECIAL(m)),
            earliest,
            latest,
            z(earliest) if whole else "",
            z(latest) if whole else "",
        )

    def rows(self, block: bytes, n: int | None = None) -> tuple[str, int]:
        """Staging rows for ``block`` (``n`` complete lines, valid UTF-8, no NUL byte, none
        blank), one per line in order; returns (rows, how many were typed here)."""
        if n is None:
            n = block.count(b"\n")
        # JSON strings hold no raw control characters (msgspec rejects them), so a decoded
        # string can need COPY escaping only if the block has a backslash escape somewhere.
        escapes = b"\\" in block
        try:
            events = _DECODER.decode_lines(block)
        except (msgspec.DecodeError, RecursionError):  # some line is not a plain event:
            events = None  # decode one by one
        lines = None
        if events is None or len(events) != n:
            lines = block.split(b"\n")
            lines.pop()
            events = [_decode(line) for line in lines]
        out: list[str] = []
        typed = 0
        row = self.row
        for i, e in enumerate(events):
            r = row(e, escapes) if e is not None else None
            if r is None:
                if lines is None:
                    lines = block.split(b"\n")
                    lines.pop()
                out.append(raw_row(lines[i]))
            else:
                out.append(r)
                typed += 1
        return "".join(out), typed

    def row(self, e: Event, escapes: bool = True) -> str | None:
        """The typed staging row of a plainly valid event, else None (SQL judges the line).

        Hot path (once per line). The common timestamp form ``YYYY-MM-DDTHH:MM:SSZ`` is
        range-checked as text (that form sorts like the instants), any other as ``datetime``."""
        eid, org, metric, src = e.event_id, e.org_id, e.metric, e.source
        if not eid or org not in self.orgs or metric not in self.metrics:
            return None
        props = NULL
        if e.properties:
            p = bytes(e.properties)
            if p != b"null":
                props = _properties(p)
                if props is None:
                    return None
        q = bytes(e.quantity)
        # no sign or exponent; inside the range (billing.pricing.catalog.QUANTITY_MAX, _DECIMALS)
        # by its spelling: at most 9 digits before and 9 after the point (10^9 itself, or
        # trailing zeros past the 9th decimal, are in range too: left for SQL)
        if q[0] not in _DIGITS or b"e" in q or b"E" in q or len(q) > _QUANTITY_CHARS:
            return None
        dot = q.find(b".")
        if (dot if dot >= 0 else len(q)) > _INT_DIGITS or (
            dot >= 0 and len(q) - dot - 1 > _DECIMALS
        ):
            return None
        t = e.occurred_at
        if (
            len(t) == 20
            and t[19] == "Z"
            and t[10] == "T"
            and t[4] == "-"
            and t[7] == "-"
            and t[13] == ":"
            and t[16] == ":"
            and self.earliest_z
        ):
            try:
                _fromisoformat(t)  # a real date and time
            except ValueError:
                return None
            if not (self.earliest_z <= t <= self.latest_z):
                return None
        else:
            if not _timestamp_shape(t):
                return None
            try:
                at = _fromisoformat(t)
            except ValueError:
                return None
            if not (self.earliest <= at <= self.latest):
                return None
        if escapes and _COPY_SPECIAL(eid if src is None else eid + src):
            return None
        return (
            f"{NULL}\tvalid\t{_md5(eid.encode()).hexdigest()}\t{eid}\t{org}\t{metric}"
            f"\t{q.decode()}\t{t}\t{'f' if e.billable is False else 't'}"
            f"\t{NULL if src is None else src}\t{props}\n"
        )


_PROPERTIES_MAX = 4096  # bytes; longer objects are left for SQL
_EXPONENT = re.compile(rb"\d[eE]").search


def _properties(raw: bytes) -> str | None:
    """``properties`` (valid JSON, as msgspec checked) as the COPY text of a ``jsonb``, or None
    for SQL. Only an object PostgreSQL surely parses: no ``\\u`` escape (NUL, lone
    surrogates), no exponent (numeric range), shallow (stack depth), short."""
    if (
        raw[:1] != b"{"
        or len(raw) > _PROPERTIES_MAX
        or b"\\u" in raw
        or raw.count(b"{") + raw.count(b"[") > 64
        or _EXPONENT(raw)
    ):
        return None
    if b"\\" in raw or b"\t" in raw or b"\r" in raw:  # escapes in strings, tab/CR as spacing
        raw = escape(raw)
    return raw.decode()


def _decode(line: bytes) -> Event | None:
    try:
        return _DECODER.decode(line)
    except (msgspec.DecodeError, RecursionError):  # invalid, or nested too deep: for SQL
        return None


def escape(data: bytes) -> bytes:
    """COPY text format: escape backslash, tab and CR (newline is the row separator)."""
    return data.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\r", b"\\r")


def raw_row(line: bytes) -> str:
    """The staging row of a line left for SQL (valid UTF-8, no newline)."""
    return escape(line).decode() + "\t\\N" + TYPED_NULLS + "\n"
