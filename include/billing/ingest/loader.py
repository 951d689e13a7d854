"""Usage ingestion: landing zone -> validated, deduplicated ``billing.usage_events``, exactly once.

Contract: ``docs/USAGE_EVENTS.md``; numbers: ``docs/PERFORMANCE.md``.

Python streams each file in 1 MiB chunks and does per-chunk work on clean data (UTF-8 check,
line-length bound); it looks at single lines' bytes only in the rare irregular chunk. Blocks of
lines are decoded with msgspec and every plainly valid line is typed in Python
(``billing.ingest.usage_line``); everything else is left raw for SQL. One COPY stages one row per line
into a temp table; set-based SQL judges the raw lines, registers and inserts. One transaction
per file: the manifest row, the events and the quarantined lines commit together, so a file is
either fully loaded or not at all. Files load in forked worker processes.

SQL per file: lines left to SQL are marked valid in place by a fast statement (one
``jsonb_populate_record`` per line, direct casts; a cast error rolls back to a savepoint and the
safe statement, exception-catching casts, runs instead). The registry insert (keyed on
``md5(event_id)::uuid``, in key order, optimistically without ON CONFLICT, payload hashed by
``billing.usage_payload_hash``) then tells which are new; when every valid line registered,
the events are inserted from the staging table with no join. Only files with bad lines classify
those lines again with details, and only files with duplicates look their lines up in the
registry. Correctness never depends on the fast paths: each keeps exactly the lines the safe
SQL path keeps (``tests/billing/ingest/test_ingest_paths.py``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from decimal import Decimal

from billing.ingest import usage_line
from billing.platform import db, settings
from billing.platform.errors import BillingError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
BOM = b"\xef\xbb\xbf"
RAW_KEEP = 4096  # characters of a quarantined line kept in billing.usage_quarantine.raw
FUTURE_SLACK = dt.timedelta(minutes=5)
REASONS = (
    "malformed_json",
    "not_utf8",
    "line_too_long",
    "missing_field",
    "bad_type",
    "negative_quantity",
    "non_finite_quantity",
    "quantity_out_of_range",
    "bad_timestamp",
    "future_event",
    "too_late",
    "unknown_org",
    "unknown_metric",
    "conflict",
)
_OUTCOMES = ("accepted", "non_billable", "duplicate", "quarantined")
# Why a whole file was rejected (billing.usage_files.reject_reason): nothing of it is loaded.
REJECT_REASONS = ("corrupt_gzip",)
# billing.usage_files.status (migrations 0002, 0060): labels of billing_ingest_files_total.
FILE_STATUSES = ("loaded", "changed", "rejected")
# Why an entry of a day folder was not read (billing.usage_skipped.reason).
SKIP_REASONS = ("in_flight", "unsupported_extension", "directory", "symlink", "not_a_file")
# Loaded file names, matched case-insensitively (part.JSONL, part.jsonl.GZ).
EXTENSIONS = (".jsonl", ".jsonl.gz")


class IngestError(BillingError):
    """Some files could not be loaded (they were rolled back whole; a re-run retries them)."""

    exit_code = 4


class CorruptFile(Exception):
    """A file's bytes cannot be decoded (e.g. a broken gzip stream): it is rejected whole."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# --------------------------------------------------------------------------- entry points


def ingest_day(
    day: dt.date,
    run_end: dt.datetime,
    *,
    landing_uri: str | None = None,
    workers_: int | None = None,
) -> dict:
    """Load every file of arrival day ``day``; ``run_end`` is the end of the run's data interval.

    Returns (and logs) a JSON-serialisable summary. Files already loaded are skipped; a file
    that fails is rolled back whole and reported, and :class:`IngestError` is raised after
    the other files are done, so the task fails and its retry loads only what is missing.
    """
    from billing import observability as obs
    from billing import pricing

    if run_end.tzinfo is None:
        raise ValueError("run_end must be timezone-aware")
    started = time.perf_counter()
    root = _day_root(day, landing_uri)
    files, skipped = _scan(root)
    _record_skipped(day, run_end, skipped)
    ctx = _Context(
        day=day,
        run_end=run_end,
        metrics=sorted(pricing.load_catalog().metrics),
        lateness=dt.timedelta(days=settings.lateness_days()),
        max_line=settings.max_line_bytes(),
    )
    if files:
        _ensure_partitions(ctx)

    n = min(workers_ or settings.ingest_workers(), max(1, len(files)))
    if n == 1:
        results = [_load(p, ctx) for p in files]
    else:
        # Processes, not threads: typing lines is Python work, and each file is its own
        # transaction on its own connection. Forked, so nothing is imported twice; the
        # connections are resolved here, so a worker never talks to Airflow's task
        # supervisor (its channel belongs to this process).
        with ProcessPoolExecutor(
            n,
            mp_context=multiprocessing.get_context("fork"),
            initializer=os.environ.update,
            initargs=(_worker_env(),),
        ) as pool:
            results = list(pool.map(_load, files, [ctx] * len(files)))
    for s in skipped:
        obs.INGEST_SKIPPED.labels(s["reason"]).inc()
        (log.info if s["reason"] == "in_flight" else log.warning)(
            "usage entry %s not read (%s): %s", s["path"], s["reason"], s["detail"]
        )
    for res in results:
        if res["status"] == "rejected":
            obs.INGEST_REJECTED.labels(res["reason"]).inc()
            obs.INGEST_BYTES.inc(res["bytes"])
        if res["status"] == "loaded":
            for outcome in _OUTCOMES:
                obs.INGEST_EVENTS.labels(outcome).inc(res[outcome])
            for reason, k in res["reasons"].items():
                obs.INGEST_QUARANTINED.labels(reason).inc(k)
            obs.INGEST_BYTES.inc(res["bytes"])
            obs.INGEST_DURATION.observe(res["seconds"])
    summary = {
        "day": day.isoformat(),
        "run_end": run_end.isoformat(),
        "landing": str(root),
        "files": results,
        "skipped": skipped,
        "total": _totals(results, skipped),
        "seconds": round(time.perf_counter() - started, 3),
    }
    log.info("usage ingest summary: %s", json.dumps(summary, sort_keys=True))
    failed = [r["path"] for r in results if r["status"] == "failed"]
    if failed:
        raise IngestError(
            f"{len(failed)} usage file(s) failed and were rolled back: {', '.join(failed)}"
        )
    return summary


def _worker_env() -> dict[str, str]:
    """The connections a file worker uses (Postgres; Redis for durable error counts), as
    ``AIRFLOW_CONN_*`` values for its environment. Only in the forked workers' memory."""
    from billing.platform import connections as conns

    env = {conns.env_var(conns.POSTGRES): conns.get(conns.POSTGRES).to_json()}
    try:
        env[conns.env_var(conns.REDIS)] = conns.get(conns.REDIS).to_json()
    except BillingError:  # not configured: error counts stay in-process
        pass
    return env


def _load(path, ctx: _Context) -> dict:
    """Load one file in its own transaction; a failure is reported in the result, not raised."""
    import psycopg

    try:
        for attempt in range(3):
            try:
                with db.connect() as cx:
                    cx.execute("SET temp_buffers = '256MB'")  # staging stays in memory
                    return _ingest_file(cx, path, ctx)
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                # two files carrying the same event_id, loaded at once: the loser retries
                if attempt == 2:
                    raise
                log.warning("usage file %s: deadlock with a concurrent file; retrying", path)
    except Exception as exc:  # reported per file; the run fails at the end
        log.exception("usage file %s failed; rolled back", path)
        return {"path": str(path), "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    raise AssertionError("unreachable")


def report(day: dt.date) -> dict:
    """What the manifest and quarantine say about arrival day ``day`` (for on-call)."""
    with db.connect() as cx:
        cur = cx.execute(
            """SELECT path, size_bytes, checksum, status, lines, blank, accepted, non_billable,
                      duplicate, quarantined, reasons, seconds, loaded_at,
                      changed_size, changed_checksum, changed_seen_at,
                      reject_reason AS reason, reject_detail AS detail
                 FROM billing.usage_files WHERE arrival_day = %s ORDER BY path""",
            (day,),
        )
        cols = [c.name for c in cur.description]
        files = []
        for row in cur.fetchall():
            rec = dict(zip(cols, row, strict=True))
            rec["bytes"] = rec.pop("size_bytes")
            rec["seconds"] = float(rec["seconds"])
            for k in ("loaded_at", "changed_seen_at"):
                rec[k] = rec[k].isoformat() if rec[k] else None
            if rec["status"] != "rejected":
                del rec["reason"], rec["detail"]
            files.append(rec)
        skipped = [
            {"path": p, "reason": r, "detail": d}
            for p, r, d in cx.execute(
                """SELECT path, reason, detail FROM billing.usage_skipped
                    WHERE arrival_day = %s ORDER BY path""",
                (day,),
            ).fetchall()
        ]
        samples = [
            {"path": p, "line_no": n, "reason": r, "detail": d, "raw": raw}
            for p, n, r, d, raw in cx.execute(
                """SELECT f.path, q.line_no, q.reason, q.detail, left(q.raw, 200)
                     FROM (SELECT *, row_number() OVER (PARTITION BY reason ORDER BY file_id, line_no) AS k
                             FROM billing.usage_quarantine WHERE arrival_day = %s) q
                     JOIN billing.usage_files f USING (file_id)
                    WHERE q.k <= 3 ORDER BY q.reason, f.path, q.line_no""",
                (day,),
            ).fetchall()
        ]
    return {
        "day": day.isoformat(),
        "files": files,
        "skipped": skipped,
        "total": _totals(files, skipped),
        "samples": samples,
    }


def format_report(rep: dict) -> str:
    """A plain-text table of :func:`report` (or of an :func:`ingest_day` summary)."""
    head = ("file", "status", "lines", "accepted", "non_bill", "dup", "quar", "blank", "bytes")
    rows = [head]
    for f in rep["files"]:
        name = f["path"].rsplit("/", 1)[-1]
        rows.append(
            (
                name,
                f["status"],
                *(
                    str(f.get(k, ""))
                    for k in (
                        "lines",
                        "accepted",
                        "non_billable",
                        "duplicate",
                        "quarantined",
                        "blank",
                        "bytes",
                    )
                ),
            )
        )
    t = rep["total"]
    rows.append(
        (
            "TOTAL",
            "",
            *(
                str(t[k])
                for k in (
                    "lines",
                    "accepted",
                    "non_billable",
                    "duplicate",
                    "quarantined_total",
                    "blank",
                    "bytes",
                )
            ),
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    out = [f"usage ingest, arrival day {rep['day']}"]
    for i, r in enumerate(rows):
        out.append(
            "  ".join(
                c.ljust(w) if j < 2 else c.rjust(w)
                for j, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if i == 0 or i == len(rows) - 2:
            out.append("  ".join("-" * w for w in widths))
    if t["quarantined"]:
        out.append("")
        out.append(
            "quarantined by reason: "
            + ", ".join(f"{k}={v}" for k, v in sorted(t["quarantined"].items()))
        )
    for f in rep["files"]:
        if f["status"] == "changed":
            out.append(f"WARNING {f['path']}: changed after it was loaded; not reloaded")
        if f["status"] == "failed":
            out.append(f"FAILED {f['path']}: {f.get('error')}")
        if f["status"] == "rejected":
            out.append(f"REJECTED {f['path']}: {f['reason']}: {f['detail']}; nothing loaded")
    for e in rep.get("skipped", []):
        out.append(f"NOT READ {e['path']}: {e['reason']}: {e['detail']}")
    for s in rep.get("samples", []):
        out.append(
            f"  {s['reason']:<22} {s['path'].rsplit('/', 1)[-1]}:{s['line_no']}  {s['detail']}"
        )
    return "\n".join(out)


def _totals(files: list[dict], skipped: list[dict] = ()) -> dict:
    total = {k: 0 for k in ("files", "lines", "blank", *_OUTCOMES, "bytes")}
    reasons: Counter[str] = Counter()
    for f in files:
        total["files"] += 1
        if f["status"] in ("failed",):
            continue
        for k in ("lines", "blank", *_OUTCOMES, "bytes"):
            total[k] += f.get(k) or 0
        reasons.update(f.get("reasons") or {})
    total["quarantined_total"] = total.pop("quarantined")
    total["quarantined"] = dict(sorted(reasons.items()))
    total["status"] = dict(sorted(Counter(f["status"] for f in files).items()))
    total["rejected"] = dict(
        sorted(Counter(f["reason"] for f in files if f["status"] == "rejected").items())
    )
    total["skipped"] = dict(sorted(Counter(e["reason"] for e in skipped).items()))
    return total


# --------------------------------------------------------------------------- files


def _day_root(day: dt.date, landing_uri: str | None):
    from airflow.sdk import ObjectStoragePath

    return (
        ObjectStoragePath((landing_uri or settings.landing_uri()).rstrip("/"))
        / "usage"
        / f"dt={day.isoformat()}"
    )


def _list_files(root) -> list:
    """The day's files to load, in name order (see :func:`_scan`)."""
    return _scan(root)[0]


def _scan(root) -> tuple[list, list[dict]]:
    """The day folder's entries: (files to load in name order, entries not read with why).

    Loaded: regular files named ``*.jsonl`` / ``*.jsonl.gz``, case-insensitively. Not read:
    ``.``-names (in flight), other names, directories, symlinks (never followed, dangling or
    not, wherever they point) and other non-files. Locally (``file://``) the day folder itself
    must resolve to where it is named: a day folder reached through a symlink below the
    landing root is not read at all. Object stores have no links; the same rules apply."""
    fs = root.fs
    if not root.exists():
        return [], []
    if root.protocol in ("file", "local"):
        landing = os.path.realpath(root.parent.parent.path)
        where = os.path.realpath(root.path)
        if where != os.path.join(landing, "usage", root.name):
            detail = f"the day folder resolves to {where}, not below the landing root"
            return [], [{"path": str(root), "reason": "symlink", "detail": detail}]
    files, skipped = [], []
    for info in sorted(fs.ls(root.path, detail=True), key=lambda i: i["name"]):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        p = root / name
        kind = info.get("type")
        if name.startswith("."):
            why = ("in_flight", "a name starting with '.' is still being written")
        elif info.get("islink"):
            target = os.readlink(p.path) if root.protocol in ("file", "local") else "?"
            why = ("symlink", f"symlinks are never followed (it points to {target})")
        elif kind == "directory":
            why = ("directory", "a directory; files must sit directly in the day folder")
        elif kind != "file":
            why = ("not_a_file", f"not a regular file ({kind})")
        elif not name.lower().endswith(EXTENSIONS):
            why = ("unsupported_extension", "only *.jsonl and *.jsonl.gz files are loaded")
        else:
            files.append(p)
            continue
        skipped.append({"path": str(p), "reason": why[0], "detail": why[1]})
    return files, skipped


def _record_skipped(day: dt.date, run_end: dt.datetime, skipped: list[dict]) -> None:
    """Make billing.usage_skipped say what this listing of the day saw (idempotent)."""
    with db.connect() as cx, cx.transaction():
        cx.execute(
            "DELETE FROM billing.usage_skipped WHERE arrival_day = %s AND NOT (path = ANY(%s))",
            (day, [e["path"] for e in skipped]),
        )
        for e in skipped:
            cx.execute(
                """INSERT INTO billing.usage_skipped (path, arrival_day, reason, detail, run_end)
                   VALUES (%(path)s, %(day)s, %(reason)s, %(detail)s, %(run_end)s)
                   ON CONFLICT (path) DO UPDATE SET reason = excluded.reason,
                          detail = excluded.detail, run_end = excluded.run_end,
                          last_seen_at = now()""",
                {**e, "day": day, "run_end": run_end},
            )


class _HashingReader:
    """A raw file object that hashes and counts the bytes read through it."""

    def __init__(self, fh):
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        b = self.fh.read(n)
        self.sha.update(b)
        self.size += len(b)
        return b

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def _is_gzip(path) -> bool:
    return path.name.lower().endswith(".gz")


class _Gunzip:
    """The decompressed bytes of a gzip file (one or more members) read through ``raw``.

    Anything but a complete gzip stream raises :class:`CorruptFile` with the (compressed)
    byte offset: not gzip at all, corrupt data, truncated before the end marker, or other
    bytes after the last member. Output is bounded per read (a 1 MiB input chunk can
    inflate to far more)."""

    def __init__(self, raw):
        self.raw, self.buf, self.pos, self.members, self.eof = raw, b"", 0, 0, False
        self.d = None  # the current member's decompressor; None between members

    def read(self, n: int = -1) -> bytes:
        import zlib

        while not self.eof:
            if not self.buf or (self.d is None and len(self.buf) < 2):
                more = self.raw.read(CHUNK)
                if more:
                    self.buf += more
                    continue
                if self.d is not None:
                    raise CorruptFile(
                        "corrupt_gzip",
                        f"truncated at byte {self.pos + len(self.buf)}: the file ends "
                        "before the gzip end-of-stream marker",
                    )
                if self.buf:
                    self._not_gzip()
                self.eof = True
                break
            if self.d is None:
                if self.buf[:2] != b"\x1f\x8b":
                    self._not_gzip()
                self.d = zlib.decompressobj(31)
            try:
                out = self.d.decompress(self.buf, CHUNK)
            except zlib.error as exc:
                raise CorruptFile(
                    "corrupt_gzip", f"invalid gzip data at byte {self.pos} or later: {exc}"
                ) from None
            rest = self.d.unused_data if self.d.eof else self.d.unconsumed_tail
            if self.d.eof:
                self.d, self.members = None, self.members + 1
            self.pos += len(self.buf) - len(rest)
            self.buf = rest
            if out:
                return out
        return b""

    def _not_gzip(self):
        if self.members:
            raise CorruptFile(
                "corrupt_gzip",
                f"trailing garbage at byte {self.pos}: {len(self.buf)}+ byte(s) after the end "
                "of the gzip stream",
            )
        raise CorruptFile(
            "corrupt_gzip",
            f"not a gzip file at byte 0 (it starts with {self.buf[:8]!r})",
        )

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _checksum(path) -> tuple[int, str]:
    with path.open("rb") as fh:
        r = _HashingReader(fh)
        r.drain()
    return r.size, r.sha.hexdigest()


# --------------------------------------------------------------------------- streaming


@dataclass
class _Context:
    day: dt.date
    run_end: dt.datetime
    metrics: list[str]
    lateness: dt.timedelta
    max_line: int
    # set per file, in its transaction: no event before it is accepted (a month purged by
    # retention has no registry rows left to count its duplicates); None: nothing purged
    horizon: dt.datetime | None = None


@dataclass
class _Stream:
    """Cheap per-chunk work on clean data; single lines are looked at only in irregular chunks.

    Staging rows (``usage_line.STAGE_COLUMNS``) have ``pre`` = ``valid`` for a line typed in
    Python (``usage_line.Typer``; ``raw`` is then NULL), NULL for a line SQL must judge,
    ``blank`` for an empty line, or ``reason<US>bytes<US>detail`` for a line rejected here (its
    ``raw`` then holds the first 4096 characters). Nothing per line is kept in memory.
    """

    write: Callable[[bytes], None]
    max_line: int
    typer: usage_line.Typer
    line_no: int = 0
    blank: int = 0
    rejected: int = 0
    typed: int = 0
    bytes_in: int = 0

    def _emit(self, block: bytes, n: int | None = None) -> None:
        rows, typed = self.typer.rows(block, n)
        self.write(rows.encode())
        self.typed += typed

    def feed_lines(self, data: bytes) -> None:
        """``data``: complete lines, each ending in ``\\n``."""
        n = data.count(b"\n")
        odd_utf8 = not (data.isascii() or _utf8(data))
        odd_tokens = b"NaN" in data or b"Infinity" in data or b"\x00" in data
        long_lines = not self._short_lines(data)
        if data.count(b"}\n") == n and not (odd_utf8 or odd_tokens or long_lines):
            self._emit(data, n)
            self.line_no += n
            return
        lines = data.split(b"\n")
        lines.pop()
        suspects = {i for i, line in enumerate(lines) if line[-1:] != b"}"}
        if long_lines:
            suspects.update(i for i, line in enumerate(lines) if len(line) > self.max_line)
        if odd_tokens:
            suspects.update(
                i
                for i, line in enumerate(lines)
                if b"NaN" in line or b"Infinity" in line or b"\x00" in line
            )
        if odd_utf8:
            suspects.update(
                i for i, line in enumerate(lines) if not (line.isascii() or _utf8(line))
            )
        start = 0
        for i in sorted(suspects):
            verdict = self._check(lines[i])
            if verdict is None:
                continue  # fine after all: stays in the block
            if i > start:
                self._emit(b"\n".join(lines[start:i]) + b"\n")
            self.write(verdict)
            start = i + 1
        if start < len(lines):
            self._emit(b"\n".join(lines[start:]) + b"\n")
        self.line_no += n

    def _short_lines(self, data: bytes) -> bool:
        # Every aligned block of half the limit holds a newline <=> no line reaches the limit.
        half = max(1, self.max_line // 2)
        return all(data.find(b"\n", i, i + half) >= 0 for i in range(0, len(data) - half, half))

    def _check(self, line: bytes) -> bytes | None:
        """None: a line for SQL; else its staging row (blank, or rejected with a reason)."""
        body = line.removesuffix(b"\r")
        if not body.strip():
            self.blank += 1
            return _BLANK_ROW
        if len(body) > self.max_line:
            return self._reject(
                body[:RAW_KEEP],
                len(body),
                "line_too_long",
                f"line of {len(body)} bytes exceeds the {self.max_line}-byte limit",
            )
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return self._reject(
                body[:RAW_KEEP],
                len(body),
                "not_utf8",
                f"invalid UTF-8 at byte {exc.start} of the line",
            )
        if "\x00" in text:
            return self._reject(body, len(body), "malformed_json", "NUL byte in line")
        if body.rstrip().endswith(b"}") and b"NaN" not in body and b"Infinity" not in body:
            return None if body is line else usage_line.raw_row(body).encode()
        constants: list[str] = []
        try:
            obj = json.loads(text, parse_constant=lambda c: constants.append(c) or float(c))
        except ValueError as exc:
            return self._reject(body, len(body), "malformed_json", f"not valid JSON: {exc}")
        except RecursionError:
            return self._reject(
                body, len(body), "malformed_json", "not valid JSON: nested too deep"
            )
        if constants:
            q = obj.get("quantity") if isinstance(obj, dict) else None
            if isinstance(q, float) and not math.isfinite(q):
                return self._reject(
                    body, len(body), "non_finite_quantity", f"quantity {q} is not a finite number"
                )
            return self._reject(
                body,
                len(body),
                "malformed_json",
                f"not valid JSON: {constants[0]} is not a JSON value",
            )
        # valid JSON without a closing brace: SQL says what it is
        return usage_line.raw_row(body).encode()

    def _reject(self, raw: bytes, nbytes: int, reason: str, detail: str) -> bytes:
        self.rejected += 1
        pre = f"{reason}\x1f{nbytes}\x1f{detail}".encode()
        return _escape(_text(raw[:RAW_KEEP]).encode()) + b"\t" + _escape(pre) + _NULLS_EOL

    def too_long(self, prefix: bytes, nbytes: int) -> None:
        self.line_no += 1
        self.write(
            self._reject(
                prefix,
                nbytes,
                "line_too_long",
                f"line of {nbytes} bytes exceeds the {self.max_line}-byte limit",
            )
        )


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _text(b: bytes) -> str:
    """Bytes as storable text: invalid UTF-8 as \\x escapes, no NUL, at most RAW_KEEP characters."""
    return b.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")[:RAW_KEEP]


_escape = usage_line.escape
_NULLS_EOL = (usage_line.TYPED_NULLS + "\n").encode()  # a row that is not a typed event
_BLANK_ROW = b"\tblank" + _NULLS_EOL


def _pump(fh, st: _Stream) -> None:
    """Read ``fh`` in bounded chunks; a line over the limit is skipped, never held whole."""
    carry = b""
    skipping: list | None = None  # [prefix, nbytes]
    first = True
    while chunk := fh.read(CHUNK):
        st.bytes_in += len(chunk)
        if first:  # a UTF-8 byte-order mark (Windows tools) is not part of line 1
            chunk, first = chunk.removeprefix(BOM), False
        if skipping is not None:
            i = chunk.find(b"\n")
            if i < 0:
                skipping[1] += len(chunk)
                continue
            skipping[1] += i
            st.too_long(*skipping)
            skipping, chunk = None, chunk[i + 1 :]
        data = carry + chunk if carry else chunk
        cut = data.rfind(b"\n")
        if cut >= 0:
            st.feed_lines(data[: cut + 1])
            data = data[cut + 1 :]
        if len(data) > st.max_line:
            skipping, carry = [data[:RAW_KEEP], len(data)], b""
        else:
            carry = data
    if skipping is not None:
        st.too_long(*skipping)
    elif carry:
        st.feed_lines(carry + b"\n")


# --------------------------------------------------------------------------- SQL

# One row per line, in line order (line_no counts them). Typed columns are set for valid lines
# (pre = 'valid'): by Python while streaming, or by SQL (_MARK_VALID) for the lines left to it.
_STAGE = """
CREATE TEMP TABLE ingest_stage (
    line_no bigint GENERATED ALWAYS AS IDENTITY (CACHE 100000), raw text, pre text,
    event_key uuid, event_id text, org_id text, metric text, quantity numeric,
    occurred_at timestamptz, billable boolean, source text, properties jsonb
) ON COMMIT DROP"""

# RFC 3339 with offset, checked by position (a regex costs more than the whole parse); the
# cast then rejects any non-digit or out-of-range field.
_RFC3339 = (
    "length(f.t_text) BETWEEN 20 AND 35 AND substr(f.t_text, 5, 1) = '-' AND substr(f.t_text, 8, 1) = '-'"
    " AND substr(f.t_text, 11, 1) IN ('T', 't', ' ') AND substr(f.t_text, 14, 1) = ':'"
    " AND substr(f.t_text, 17, 1) = ':' AND (right(f.t_text, 1) IN ('Z', 'z')"
    " OR (substr(f.t_text, length(f.t_text) - 5, 1) IN ('+', '-') AND substr(f.t_text, length(f.t_text) - 2, 1) = ':'))"
)

# The safe path's per-line parse and reason (first that applies); reason IS NULL means valid.
# Casts catch their exceptions, so no line can fail the statement; {rows}: the staged lines.
_PARSE = """
  SELECT g.*,
    CASE
      WHEN g.j IS NULL THEN 'malformed_json'
      WHEN jsonb_typeof(g.j) <> 'object' THEN 'bad_type'
      WHEN coalesce(g.e_text, '') = '' OR coalesce(g.o_text, '') = '' OR coalesce(g.m_text, '') = ''
           OR coalesce(jsonb_typeof(g.q), 'null') = 'null' OR coalesce(g.t_text, '') = '' THEN 'missing_field'
      WHEN jsonb_typeof(g.e) <> 'string' OR jsonb_typeof(g.o) <> 'string' OR jsonb_typeof(g.m) <> 'string'
           OR jsonb_typeof(g.q) <> 'number' OR jsonb_typeof(g.t) <> 'string'
           OR jsonb_typeof(g.b) NOT IN ('boolean', 'null') OR jsonb_typeof(g.src) NOT IN ('string', 'null')
           OR jsonb_typeof(g.props) NOT IN ('object', 'null') THEN 'bad_type'
      WHEN g.quantity < 0 THEN 'negative_quantity'
      WHEN g.quantity > %(quantity_max)s OR min_scale(g.quantity) > %(quantity_decimals)s
           THEN 'quantity_out_of_range'
      WHEN g.occurred_at IS NULL THEN 'bad_timestamp'
      WHEN g.occurred_at > %(latest)s THEN 'future_event'
      WHEN g.occurred_at < %(earliest)s THEN 'too_late'
      WHEN g.metric IS NULL THEN 'unknown_metric'
      WHEN g.org_id IS NULL THEN 'unknown_org'
    END AS reason
  FROM (
    SELECT f.*,
      f.e_text AS event_id,
      o.org_id,
      CASE WHEN f.m_text = ANY(%(metrics)s) THEN f.m_text END AS metric,
      CASE WHEN jsonb_typeof(f.q) = 'number' THEN f.q::numeric END AS quantity,
      CASE WHEN jsonb_typeof(f.t) = 'string' AND {rfc3339} THEN billing.try_timestamptz(f.t_text) END AS occurred_at,
      CASE WHEN jsonb_typeof(f.b) = 'boolean' THEN f.b::boolean ELSE true END AS billable,
      CASE WHEN jsonb_typeof(f.src) = 'string' THEN f.src #>> '{{}}' END AS source,
      CASE WHEN jsonb_typeof(f.props) = 'object' THEN f.props END AS properties
    FROM (
      SELECT p.line_no, p.j, e, o, m, q, t, b, src, props,
             CASE WHEN jsonb_typeof(e) = 'string' THEN e #>> '{{}}' END AS e_text,
             CASE WHEN jsonb_typeof(o) = 'string' THEN o #>> '{{}}' END AS o_text,
             CASE WHEN jsonb_typeof(m) = 'string' THEN m #>> '{{}}' END AS m_text,
             CASE WHEN jsonb_typeof(t) = 'string' THEN t #>> '{{}}' END AS t_text
      FROM (SELECT s.line_no, billing.try_jsonb(s.raw) AS j FROM {rows} OFFSET 0) p,
           LATERAL (SELECT p.j -> 'event_id' AS e, p.j -> 'org_id' AS o, p.j -> 'metric' AS m,
                           p.j -> 'quantity' AS q, p.j -> 'occurred_at' AS t, p.j -> 'billable' AS b,
                           p.j -> 'source' AS src, p.j -> 'properties' AS props) x
      OFFSET 0
    ) f
    LEFT JOIN billing.organizations o ON o.org_id = f.o_text
    OFFSET 0
  ) g
  OFFSET 0
"""

# Valid lines, typed, with their registry key and payload hash: everything the writes need.
# Nothing is computed or stored per line for detail messages (only bad lines need them).
# The safe path: the per-reason parse above, with exception-catching casts.
_OK = """
SELECT c.line_no, md5(c.event_id)::uuid AS event_key, c.event_id, c.org_id, c.metric, c.quantity,
       c.occurred_at, c.billable, c.source, c.properties
  FROM ({parse}) c
 WHERE c.reason IS NULL
"""

# The fast path: the same set of valid lines as the safe path's ``reason IS NULL`` (tested
# line by line against it), from one jsonb_populate_record per line instead of a lookup per field.
# A cast error on any line (an impossible date, a \u0000) rolls back to the savepoint and the
# file takes the safe path.
_OK_FAST = """
SELECT x.line_no, md5(x.event_id)::uuid AS event_key, x.event_id, x.org_id, x.metric, x.quantity,
       x.occurred_at, x.billable, x.source, x.properties
  FROM (
    SELECT f.line_no, f.event_id, f.org_id, f.metric, f.te, f.t_o, f.tm, f.tq, f.tt, f.tb, f.ts, f.tp,
           CASE WHEN f.tq = 'number' THEN f.q::numeric END AS quantity,
           CASE WHEN f.tt = 'string' AND {rfc3339} THEN f.t_text::timestamptz END AS occurred_at,
           CASE WHEN f.tb = 'boolean' THEN (f.b #>> '{{}}')::boolean ELSE true END AS billable,
           CASE WHEN f.ts = 'string' THEN f.src #>> '{{}}' END AS source,
           CASE WHEN f.tp = 'object' THEN f.props END AS properties
      FROM (
        SELECT s.line_no, r.quantity AS q, r.billable AS b, r.source AS src, r.properties AS props,
               jsonb_typeof(r.event_id) AS te, jsonb_typeof(r.org_id) AS t_o, jsonb_typeof(r.metric) AS tm,
               jsonb_typeof(r.quantity) AS tq, jsonb_typeof(r.occurred_at) AS tt,
               coalesce(jsonb_typeof(r.billable), 'null') AS tb, coalesce(jsonb_typeof(r.source), 'null') AS ts,
               coalesce(jsonb_typeof(r.properties), 'null') AS tp,
               CASE WHEN jsonb_typeof(r.event_id) = 'string' THEN r.event_id #>> '{{}}' END AS event_id,
               CASE WHEN jsonb_typeof(r.org_id) = 'string' THEN r.org_id #>> '{{}}' END AS org_id,
               CASE WHEN jsonb_typeof(r.metric) = 'string' THEN r.metric #>> '{{}}' END AS metric,
               CASE WHEN jsonb_typeof(r.occurred_at) = 'string' THEN r.occurred_at #>> '{{}}' END AS t_text
          FROM ingest_stage s, jsonb_populate_record(NULL::billing.usage_event_json, s.raw::jsonb) r
         WHERE s.pre IS NULL
        OFFSET 0
      ) f
     WHERE f.te = 'string' AND f.t_o = 'string' AND f.tm = 'string' AND f.tq = 'number' AND f.tt = 'string'
       AND f.tb IN ('boolean', 'null') AND f.ts IN ('string', 'null') AND f.tp IN ('object', 'null')
       AND f.event_id <> '' AND f.org_id <> '' AND f.metric = ANY(%(metrics)s) AND f.org_id = ANY(%(orgs)s)
    OFFSET 0
  ) x
 WHERE x.quantity >= 0 AND x.quantity <= %(quantity_max)s
   AND min_scale(x.quantity) <= %(quantity_decimals)s
   AND x.occurred_at BETWEEN %(earliest)s AND %(latest)s
"""

# Staged lines for SQL that did not make it into ingest_ok: classified again (safe casts) with
# the human detail. Runs only when a file has such lines.
# Lines left to SQL are marked valid in place; the rest of them are the bad lines.
_MARK_VALID = """
UPDATE ingest_stage s
   SET pre = 'valid', event_key = v.event_key, event_id = v.event_id, org_id = v.org_id,
       metric = v.metric, quantity = v.quantity, occurred_at = v.occurred_at, billable = v.billable,
       source = v.source, properties = v.properties
  FROM ({valid}) v
 WHERE s.line_no = v.line_no
"""
_CLASSIFY_BAD = """
CREATE TEMP TABLE ingest_cls ON COMMIT DROP AS
SELECT c.line_no, c.reason, c.event_id,
       CASE c.reason
         WHEN 'malformed_json' THEN 'not valid JSON'
         WHEN 'bad_type' THEN concat_ws('; ',
              CASE WHEN jsonb_typeof(c.j) <> 'object' THEN 'line must be a JSON object, got ' || jsonb_typeof(c.j) END,
              CASE WHEN jsonb_typeof(c.e) <> 'string' THEN 'event_id must be a string, got ' || jsonb_typeof(c.e) END,
              CASE WHEN jsonb_typeof(c.o) <> 'string' THEN 'org_id must be a string, got ' || jsonb_typeof(c.o) END,
              CASE WHEN jsonb_typeof(c.m) <> 'string' THEN 'metric must be a string, got ' || jsonb_typeof(c.m) END,
              CASE WHEN jsonb_typeof(c.q) <> 'number' THEN 'quantity must be a number, got ' || jsonb_typeof(c.q) END,
              CASE WHEN jsonb_typeof(c.t) <> 'string' THEN 'occurred_at must be a string, got ' || jsonb_typeof(c.t) END,
              CASE WHEN jsonb_typeof(c.b) NOT IN ('boolean', 'null') THEN 'billable must be a boolean, got ' || jsonb_typeof(c.b) END,
              CASE WHEN jsonb_typeof(c.src) NOT IN ('string', 'null') THEN 'source must be a string, got ' || jsonb_typeof(c.src) END,
              CASE WHEN jsonb_typeof(c.props) NOT IN ('object', 'null') THEN 'properties must be an object, got ' || jsonb_typeof(c.props) END)
         WHEN 'missing_field' THEN 'missing required field(s): ' || concat_ws(', ',
              CASE WHEN coalesce(c.e_text, '') = '' THEN 'event_id' END,
              CASE WHEN coalesce(c.o_text, '') = '' THEN 'org_id' END,
              CASE WHEN coalesce(c.m_text, '') = '' THEN 'metric' END,
              CASE WHEN coalesce(jsonb_typeof(c.q), 'null') = 'null' THEN 'quantity' END,
              CASE WHEN coalesce(c.t_text, '') = '' THEN 'occurred_at' END)
         WHEN 'negative_quantity' THEN format('quantity %%s is negative', c.quantity)
         WHEN 'quantity_out_of_range' THEN format(
              'quantity %%s is outside the accepted range (0 to %%s, at most %%s decimal places)',
              CASE WHEN length(c.quantity::text) > 40
                   THEN left(c.quantity::text, 24) || '... (' || length(c.quantity::text) || ' characters)'
                   ELSE c.quantity::text END,
              %(quantity_max)s, %(quantity_decimals)s)
         WHEN 'bad_timestamp' THEN format('occurred_at %%s is not an RFC 3339 timestamp with offset', c.t_text)
         WHEN 'future_event' THEN format('occurred_at %%s is more than 5 minutes after the run end %%s',
                                         c.t_text, %(run_end)s::timestamptz)
         WHEN 'too_late' THEN format('occurred_at %%s is %%s (before %%s)',
                                     c.t_text, %(too_late)s::text, %(earliest)s::timestamptz)
         WHEN 'unknown_metric' THEN format('metric %%s is not in the pricing catalog', c.m_text)
         WHEN 'unknown_org' THEN format('org_id %%s is not in billing.organizations', c.o_text)
       END AS detail
  FROM ({parse}) c
"""

# ORDER BY event_key, line_no: within a file the first line of an event_id wins (later ones
# conflict with it), and inserting in key order walks the primary-key index from left to right
# instead of at random (about a third cheaper per row than line order, measured).
# A file is first registered optimistically with a plain INSERT (about 40% cheaper per row than
# ON CONFLICT's speculative insertion, measured). The first already-registered event_id raises
# unique_violation and the savepoint rolls it back; the file then finds its already-seen lines
# (_SEEN_FIRST) and registers the rest with a plain INSERT again ({where} = _NOT_SEEN). Only when
# a concurrent file registers one of its event_ids in between does it fall back to ON CONFLICT
# for every line, and to _SEEN afterwards.
_PAYLOAD_HASH = """billing.usage_payload_hash({t}.event_id, {t}.org_id, {t}.metric, {t}.quantity,
                {t}.occurred_at, {t}.billable, {t}.source, {t}.properties)"""
_REGISTER = f"""
INSERT INTO billing.usage_event_ids (event_key, payload_hash, occurred_at, file_id, line_no)
SELECT o.event_key, {_PAYLOAD_HASH.format(t="o")}, o.occurred_at, %(file_id)s, o.line_no
  FROM ingest_stage o
 WHERE o.pre = 'valid' {{where}}
 ORDER BY o.event_key, o.line_no
{{on_conflict}}
"""

# Valid lines whose event_id is registered by another line (earlier in this file, an earlier file
# or run, or a concurrent file that committed first): duplicate (same payload) or conflict.
# _SEEN runs after registering (it skips the lines this file registered itself); _SEEN_FIRST
# before, so it adds the repeats within this file (the first line of an event_id wins).
_SEEN_REGISTERED = f"""
SELECT o.line_no, o.event_id, f.path AS first_path, r.line_no AS first_line,
       coalesce(r.payload_hash = {_PAYLOAD_HASH.format(t="o")}, false) AS same
  FROM ingest_stage o
  JOIN billing.usage_event_ids r USING (event_key)
  LEFT JOIN billing.usage_files f ON f.file_id = r.file_id
 WHERE o.pre = 'valid'"""
_SEEN = f"""
CREATE TEMP TABLE ingest_seen ON COMMIT DROP AS{_SEEN_REGISTERED}
   AND (r.file_id <> %(file_id)s OR r.line_no <> o.line_no)
"""
_SEEN_FIRST = f"""
CREATE TEMP TABLE ingest_seen ON COMMIT DROP AS{_SEEN_REGISTERED}
UNION ALL
SELECT d.line_no, d.event_id, NULL, d.first_line, d.h = d.first_h
  FROM (SELECT o.line_no, o.event_id, {_PAYLOAD_HASH.format(t="o")} AS h,
               first_value(o.line_no) OVER w AS first_line,
               first_value({_PAYLOAD_HASH.format(t="o")}) OVER w AS first_h
          FROM ingest_stage o
         WHERE o.pre = 'valid'
           AND o.event_key IN (SELECT event_key FROM ingest_stage WHERE pre = 'valid'
                                GROUP BY event_key HAVING count(*) > 1)
           AND NOT EXISTS (SELECT 1 FROM billing.usage_event_ids r WHERE r.event_key = o.event_key)
        WINDOW w AS (PARTITION BY o.event_key ORDER BY o.line_no)) d
 WHERE d.line_no <> d.first_line
"""

# {where}: empty when every valid line registered (no join at all), else skips ingest_seen.
_INSERT_EVENTS = """
WITH ev AS (
INSERT INTO billing.usage_events (event_id, org_id, metric, quantity, occurred_at, billable, source,
                                  properties, arrival_day, file_id, line_no)
SELECT o.event_id, o.org_id, o.metric, o.quantity, o.occurred_at, o.billable, o.source, o.properties,
       %(day)s, %(file_id)s, o.line_no
  FROM ingest_stage o WHERE o.pre = 'valid' {where}
RETURNING billable)
SELECT count(*), count(*) FILTER (WHERE NOT billable) FROM ev
"""
_NOT_SEEN = "AND NOT EXISTS (SELECT 1 FROM ingest_seen x WHERE x.line_no = o.line_no)"

_QUARANTINE = f"""
INSERT INTO billing.usage_quarantine (file_id, line_no, arrival_day, reason, detail, event_id, raw, raw_bytes)
SELECT %(file_id)s, c.line_no, %(day)s, c.reason, c.detail, c.event_id, left(s.raw, {RAW_KEEP}), octet_length(s.raw)
  FROM ingest_cls c JOIN ingest_stage s USING (line_no)
"""

# Lines Python rejected while streaming: pre = reason<US>bytes<US>detail, raw = the line's start.
_QUARANTINE_PRE = """
INSERT INTO billing.usage_quarantine (file_id, line_no, arrival_day, reason, detail, raw, raw_bytes)
SELECT %(file_id)s, line_no, %(day)s, split_part(pre, E'\\x1f', 1), split_part(pre, E'\\x1f', 3),
       raw, split_part(pre, E'\\x1f', 2)::bigint
  FROM ingest_stage WHERE pre NOT IN ('blank', 'valid')
"""

_QUARANTINE_CONFLICTS = f"""
INSERT INTO billing.usage_quarantine (file_id, line_no, arrival_day, reason, detail, event_id, raw, raw_bytes)
SELECT %(file_id)s, x.line_no, %(day)s, 'conflict',
       format('event_id %%s was first seen in %%s line %%s with a different payload',
              x.event_id, coalesce(x.first_path, 'this file'), x.first_line),
       x.event_id, left(s.raw, {RAW_KEEP}), octet_length(s.raw)
  FROM ingest_seen x JOIN ingest_stage s USING (line_no) WHERE NOT x.same
"""


def _ensure_partitions(ctx: _Context) -> None:
    """Create the month partitions the run's acceptance window can touch, before any file
    transaction (DDL on the parent takes a strong lock: keep it short and separate)."""
    with db.connect(autocommit=True) as cx:
        # no partition for a month purged by retention (each file checks again, under lock)
        (horizon,) = cx.execute("SELECT billing.usage_registry_horizon()").fetchone()
        lo = _params(replace(ctx, horizon=horizon))["earliest"].date().replace(day=1)
        hi = (ctx.run_end + FUTURE_SLACK).date()
        while lo <= hi:
            cx.execute("SELECT billing.ensure_usage_partition(%s)", (lo,))
            lo = (lo + dt.timedelta(days=32)).replace(day=1)


def _lock_key(uri: str) -> int:
    return int.from_bytes(
        hashlib.sha256(b"usage-file:" + uri.encode()).digest()[:8], "big", signed=True
    )


def _params(ctx: _Context) -> dict:
    from billing.pricing.catalog import QUANTITY_DECIMALS, QUANTITY_MAX

    earliest, too_late = ctx.run_end - ctx.lateness, "older than the lateness window"
    if ctx.horizon is not None and ctx.horizon > earliest:
        earliest, too_late = ctx.horizon, "in or before a month purged by retention"
    return {
        "run_end": ctx.run_end,
        "latest": ctx.run_end + FUTURE_SLACK,
        "earliest": earliest,
        "too_late": too_late,
        "metrics": ctx.metrics,
        "quantity_max": QUANTITY_MAX,
        "quantity_decimals": QUANTITY_DECIMALS,
    }


def _parse_sql(rows: str = "ingest_stage s WHERE s.pre IS NULL") -> str:
    return _PARSE.format(rfc3339=_RFC3339, rows=rows)


def _fast_gives_up() -> tuple[type[Exception], ...]:
    """Errors of the fast SQL path that send the file to the safe path: a value it cannot
    cast, or JSON nested deeper than the server's stack allows."""
    import psycopg

    return (
        psycopg.errors.DataError,
        psycopg.errors.StatementTooComplex,  # "stack depth limit exceeded"
        psycopg.errors.ProgramLimitExceeded,
    )


def _mark_valid(cx, ctx: _Context, *, safe: bool) -> int:
    """Mark the valid ones of the lines left to SQL (``pre IS NULL``) with the fast or the
    safe path; returns how many. The fast path raises ``psycopg.DataError`` on a line it
    cannot cast."""

    params = _params(ctx)
    if safe:
        valid = _OK.format(parse=_parse_sql())
    else:
        valid = _OK_FAST.format(rfc3339=_RFC3339)
        # a constant array: hashed membership, never a nested loop on a misestimate
        (orgs,) = cx.execute("SELECT array_agg(org_id) FROM billing.organizations").fetchone()
        params["orgs"] = orgs or []
    sql = _MARK_VALID.format(valid=valid)
    if safe:
        return cx.execute(sql, params).rowcount
    return db.execute_expecting(cx, _fast_gives_up(), sql, params).rowcount


def _classify(cx, ctx: _Context, sql_lines: int) -> tuple[str, int]:
    """Judge the lines Python left to SQL; returns (mode, how many of them are valid)."""

    if not sql_lines:
        return "python", 0
    try:
        with cx.transaction():
            return "fast", _mark_valid(cx, ctx, safe=False)
    except _fast_gives_up() as exc:
        log.info("fast path failed (%s); classifying with safe casts", str(exc).splitlines()[0])
    return "safe", _mark_valid(cx, ctx, safe=True)


def _open(path):
    """The file opened for reading, and its bytes (decompressed for ``.gz``)."""
    raw_fh = path.open("rb")
    return raw_fh, (_Gunzip(raw_fh) if _is_gzip(path) else raw_fh)


def _read_lines(fh, wanted: list[int]) -> dict[int, bytes]:
    """Lines ``wanted`` (sorted line numbers, each line short) of a stream, read in chunks."""
    out: dict[int, bytes] = {}
    line_no, k, carry = 1, 0, b""
    while k < len(wanted) and (chunk := fh.read(CHUNK)):
        last = line_no + chunk.count(b"\n")  # the line this chunk ends in
        if wanted[k] > last:
            line_no, carry = last, b""
            continue
        start = 0
        while k < len(wanted):
            i = chunk.find(b"\n", start)
            if line_no == wanted[k]:
                if i < 0:
                    carry += chunk[start:]
                    break
                out[line_no] = carry + chunk[start:i]
                k += 1
            carry = b""
            if i < 0:
                break
            line_no, start = line_no + 1, i + 1
    if k < len(wanted) and carry:
        out[wanted[k]] = carry
    return out


def _fill_raw(cx, path, line_nos: list[int]) -> None:
    """Staged rows typed in Python keep no raw text; put it back for the lines quarantined."""
    raw_fh, fh = _open(path)
    with raw_fh, fh:
        lines = _read_lines(fh, sorted(line_nos))
    if 1 in lines:
        lines[1] = lines[1].removeprefix(BOM)
    cx.execute("CREATE TEMP TABLE ingest_raw (line_no bigint, raw text) ON COMMIT DROP")
    with cx.cursor().copy("COPY ingest_raw (line_no, raw) FROM STDIN") as copy:
        for n, line in lines.items():
            copy.write_row((n, line.decode("utf-8")))
    cx.execute(
        "UPDATE ingest_stage s SET raw = r.raw FROM ingest_raw r WHERE s.line_no = r.line_no"
    )


def _register(cx, p: dict) -> tuple[int, str]:
    """Register the file's valid lines. Returns how many event_ids were new, and how:
    ``plain`` (all new), ``lookup`` (``ingest_seen`` holds the lines that were not) or
    ``on_conflict`` (_SEEN must find them)."""
    import psycopg

    unique = (psycopg.errors.UniqueViolation,)
    try:
        with cx.transaction():
            sql = _REGISTER.format(where="", on_conflict="")
            return db.execute_expecting(cx, unique, sql, p).rowcount, "plain"
    except psycopg.errors.UniqueViolation:
        pass  # some event_id is registered already, or repeats in this file
    try:
        with cx.transaction():
            cx.execute(_SEEN_FIRST)
            sql = _REGISTER.format(where=_NOT_SEEN, on_conflict="")
            return db.execute_expecting(cx, unique, sql, p).rowcount, "lookup"
    except psycopg.errors.UniqueViolation:
        pass  # a concurrent file registered one of the others in between
    sql = _REGISTER.format(where="", on_conflict="ON CONFLICT (event_key) DO NOTHING")
    return cx.execute(sql, p).rowcount, "on_conflict"


def _reject(cx, file_id: int, uri: str, ctx: _Context, raw, exc: CorruptFile, started) -> dict:
    """Record a file that cannot be decoded: a manifest row, nothing of its lines."""
    log.warning("usage file %s rejected, nothing loaded: %s: %s", uri, exc.reason, exc.detail)
    seconds = round(time.perf_counter() - started, 3)
    checksum = raw.sha.hexdigest()
    cx.execute(
        """INSERT INTO billing.usage_files (file_id, path, arrival_day, size_bytes, checksum,
               status, lines, blank, accepted, non_billable, duplicate, quarantined, seconds,
               run_end, reject_reason, reject_detail)
           VALUES (%s, %s, %s, %s, %s, 'rejected', 0, 0, 0, 0, 0, 0, %s, %s, %s, %s)""",
        (
            file_id,
            uri,
            ctx.day,
            raw.size,
            checksum,
            Decimal(str(seconds)),
            ctx.run_end,
            exc.reason,
            exc.detail,
        ),
    )
    zeros = dict.fromkeys(("lines", "blank", *_OUTCOMES), 0)
    return {
        "path": uri,
        "status": "rejected",
        "file_id": file_id,
        "reason": exc.reason,
        "detail": exc.detail,
        **zeros,
        "reasons": {},
        "bytes": raw.size,
        "checksum": checksum,
        "seconds": seconds,
    }


def _ingest_file(cx, path, ctx: _Context) -> dict:
    uri = str(path)
    started = time.perf_counter()
    with cx.transaction():
        cx.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(uri),))
        cx.execute("SET LOCAL work_mem = '256MB'")
        cx.execute("SET LOCAL TimeZone = 'UTC'")
        known = _known_file(cx, path, uri)
        if known is not None:
            return {"path": uri, **known, "seconds": round(time.perf_counter() - started, 3)}

        file_id = cx.execute(
            "SELECT nextval(pg_get_serial_sequence('billing.usage_files', 'file_id'))"
        ).fetchone()[0]
        (horizon,) = cx.execute("SELECT billing.usage_registry_horizon()").fetchone()
        ctx = replace(ctx, horizon=horizon)
        params = _params(ctx)
        typer = usage_line.Typer.create(
            (r[0] for r in cx.execute("SELECT org_id FROM billing.organizations")),
            ctx.metrics,
            params["earliest"],
            params["latest"],
        )
        raw, st, corrupt = _stage(cx, path, ctx, typer)
        if corrupt is not None:
            return _reject(cx, file_id, uri, ctx, raw, corrupt, started)
        t_copy = time.perf_counter()
        candidates = st.line_no - st.blank - st.rejected  # lines that may be events
        mode, marked = _classify(cx, ctx, candidates - st.typed)
        valid = st.typed + marked
        t_cls = time.perf_counter()

        p = {"file_id": file_id, "day": ctx.day}
        if valid != candidates:  # some are bad: classify just those, with details
            cx.execute(_CLASSIFY_BAD.format(parse=_parse_sql()), params)
        new, registry = _register(cx, p)
        t_reg = time.perf_counter()
        duplicate, non_billable = _write_events(
            cx, path, p, st, candidates=candidates, valid=valid, new=new, registry=registry
        )
        reasons = dict(
            cx.execute(
                "SELECT reason, count(*) FROM billing.usage_quarantine WHERE file_id = %s GROUP BY reason ORDER BY reason",
                (file_id,),
            ).fetchall()
        )
        result = {
            "path": uri,
            "status": "loaded",
            "file_id": file_id,
            "lines": st.line_no,
            "blank": st.blank,
            "accepted": new - non_billable,
            "non_billable": non_billable,
            "duplicate": duplicate,
            "quarantined": sum(reasons.values()),
            "reasons": reasons,
            "bytes": raw.size,
            "uncompressed_bytes": st.bytes_in,
            "checksum": raw.sha.hexdigest(),
            "mode": mode,
            "registry": registry,
            "seconds": round(time.perf_counter() - started, 3),
            "timings": {
                "copy": round(t_copy - started, 3),
                "classify": round(t_cls - t_copy, 3),
                "register": round(t_reg - t_cls, 3),
                "write": round(time.perf_counter() - t_reg, 3),
            },
        }
        _record_loaded(cx, ctx, result)
    return result


def _known_file(cx, path, uri: str) -> dict | None:
    """The outcome for a file the manifest already has (skipped or changed); None: load it."""
    seen = cx.execute(
        "SELECT file_id, size_bytes, checksum, status FROM billing.usage_files WHERE path = %s",
        (uri,),
    ).fetchone()
    if seen is None:
        return None
    file_id, loaded_size, loaded_checksum, status = seen
    size, checksum = _checksum(path)
    if checksum == loaded_checksum:
        return {"status": "skipped", "bytes": size, "checksum": checksum}
    if status == "rejected":
        # nothing of a rejected file was loaded: new bytes under its name load afresh
        log.warning("rejected usage file %s was replaced; loading its new bytes", uri)
        cx.execute("DELETE FROM billing.usage_files WHERE file_id = %s", (file_id,))
        return None
    cx.execute(
        """UPDATE billing.usage_files SET status = 'changed', changed_size = %s,
                  changed_checksum = %s, changed_seen_at = now() WHERE file_id = %s""",
        (size, checksum, file_id),
    )
    log.warning(
        "usage file %s changed after it was loaded (size %s -> %s); not reloaded",
        uri,
        loaded_size,
        size,
    )
    return {
        "status": "changed",
        "bytes": size,
        "checksum": checksum,
        "loaded_checksum": loaded_checksum,
    }


def _stage(cx, path, ctx: _Context, typer) -> tuple:
    """COPY the file's lines into ingest_stage: (hashing reader, stream, CorruptFile or None)."""
    corrupt = st = None
    with path.open("rb") as raw_fh:
        raw = _HashingReader(raw_fh)
        fh = _Gunzip(raw) if _is_gzip(path) else raw
        try:
            with cx.transaction():  # a corrupt file leaves nothing staged
                cx.execute(_STAGE)
                with cx.cursor().copy(
                    f"COPY ingest_stage ({usage_line.STAGE_COLUMNS}) FROM STDIN"
                ) as copy:
                    st = _Stream(copy.write, ctx.max_line, typer)
                    _pump(fh, st)
        except CorruptFile as exc:
            corrupt = exc
        raw.drain()  # hash the whole file, also what a decoder did not read
    return raw, st, corrupt


def _write_events(
    cx, path, p: dict, st: _Stream, *, candidates: int, valid: int, new: int, registry: str
) -> tuple[int, int]:
    """Store the staged file's new events, quarantine the rest: (duplicate, non_billable)."""
    uri = str(path)
    duplicate = conflict = 0
    if new != valid:
        if registry == "on_conflict":
            cx.execute("ANALYZE ingest_stage")  # row estimates for the registry join
            cx.execute(_SEEN, p)
        duplicate, conflict = cx.execute(
            "SELECT count(*) FILTER (WHERE same), count(*) FILTER (WHERE NOT same) FROM ingest_seen"
        ).fetchone()
    if duplicate + conflict != valid - new:  # an event_id registered and purged in between
        raise RuntimeError(
            f"{uri}: {valid - new} unregistered lines but {duplicate + conflict} found registered"
        )
    stored, non_billable = cx.execute(
        _INSERT_EVENTS.format(where=_NOT_SEEN if new != valid else ""), p
    ).fetchone()
    if stored != new:
        raise RuntimeError(f"{uri}: {new} events registered but {stored} stored")
    if valid != candidates:
        bad = cx.execute(_QUARANTINE, p).rowcount
        if bad != candidates - valid:
            raise RuntimeError(f"{uri}: {candidates - valid} invalid lines but {bad} classified")
    if conflict:
        typed_conflicts = cx.execute(
            """SELECT x.line_no FROM ingest_seen x JOIN ingest_stage s USING (line_no)
                WHERE NOT x.same AND s.raw IS NULL"""
        ).fetchall()
        if typed_conflicts:
            _fill_raw(cx, path, [n for (n,) in typed_conflicts])
        cx.execute(_QUARANTINE_CONFLICTS, p)
    if st.rejected:
        cx.execute(_QUARANTINE_PRE, p)
    return duplicate, non_billable


def _record_loaded(cx, ctx: _Context, result: dict) -> None:
    """The loaded file's manifest row: its checksum is what later runs skip by."""
    cx.execute(
        """INSERT INTO billing.usage_files (file_id, path, arrival_day, size_bytes, checksum, lines, blank,
               accepted, non_billable, duplicate, quarantined, reasons, seconds, run_end)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
        (
            result["file_id"],
            result["path"],
            ctx.day,
            result["bytes"],
            result["checksum"],
            result["lines"],
            result["blank"],
            result["accepted"],
            result["non_billable"],
            result["duplicate"],
            result["quarantined"],
            json.dumps(result["reasons"]),
            Decimal(str(result["seconds"])),
            ctx.run_end,
        ),
    )
