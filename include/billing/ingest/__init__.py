"""Usage ingestion: the landing zone into ``billing.usage_events``, exactly once.

Playbook flow "Usage metering (online)". ``billing_nightly``'s ``ingest`` task and
``billing ingest run|report`` call :func:`ingest_day` and :func:`report`.

* ``loader``: one arrival day's files: stream, stage with COPY, judge in SQL, register and
  insert in one transaction per file; the manifest, quarantine and skipped-file records.
* ``usage_line``: typing plainly valid lines in Python (the common case), the rest goes to SQL.

Contract: docs/USAGE_EVENTS.md.
"""

from __future__ import annotations

from billing.ingest.loader import (
    FILE_STATUSES,
    REASONS,
    REJECT_REASONS,
    SKIP_REASONS,
    format_report,
    ingest_day,
    report,
)

__all__ = [
    "FILE_STATUSES",
    "REASONS",
    "REJECT_REASONS",
    "SKIP_REASONS",
    "format_report",
    "ingest_day",
    "report",
]
