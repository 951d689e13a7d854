"""Degraded is visible: the delivery verdict (nightly sentinel), the Billing page's Stripe
line and the RED tiles (retrying tasks, skipped sentinel, task-based durations).

Pure functions on data shaped as the outbox and Airflow's REST API return it.
"""

from __future__ import annotations

import datetime as dt

from billing.stripe_sync import delivery
from billing.web.page import red_tiles

T = dt.datetime(2026, 3, 4, 2, 15, tzinfo=dt.UTC)
NOTHING = {
    "parked": 0,
    "queued": 0,
    "parked_since": None,
    "queued_since": None,
    "last_error_class": None,
    "last_error": None,
    "last_error_at": None,
}
UNREACHABLE = {
    **NOTHING,
    "parked": 20,
    "parked_since": T,
    "last_error_class": "connection",
    "last_error": "APIConnectionError: connection refused",
    "last_error_at": T + dt.timedelta(minutes=1),
}
READ_ONLY = {"since": "2026-03-04T01:00:00+00:00", "reason": "incident 42"}


def test_verdict_delivered_only_when_nothing_is_open():
    assert delivery.verdict(NOTHING) == {
        "delivered": True,
        "parked": 0,
        "queued": 0,
        "message": "delivered: nothing parked or queued",
    }
    assert delivery.verdict(UNREACHABLE) == {
        "delivered": False,
        "parked": 20,
        "queued": 0,
        "message": "degraded: 20 parked, 0 queued (billing parked list); last error connection",
    }
    queued = delivery.verdict({**NOTHING, "queued": 7}, READ_ONLY)
    assert queued["delivered"] is False
    assert queued["message"] == (
        "degraded: 0 parked, 7 queued (billing parked list); "
        "Stripe read-only since 2026-03-04T01:00:00+00:00"
    )


def test_status_is_never_writable_while_writes_fail():
    assert delivery.status(NOTHING, None) == {
        "state": "writable",
        "text": "pushes go out normally",
    }
    assert delivery.status(UNREACHABLE, None) == {
        "state": "unreachable",
        "text": "20 writes parked since 2026-03-04T02:15:00+00:00 (last error connection at "
        "2026-03-04T02:16:00+00:00: APIConnectionError: connection refused)",
    }
    refused = {**UNREACHABLE, "parked": 1, "last_error_class": "card", "last_error": "declined"}
    assert delivery.status(refused, None)["state"] == "failing"
    unknown = {**UNREACHABLE, "parked": 1, "last_error_class": None, "last_error": None}
    assert delivery.status(unknown, None) == {
        "state": "failing",
        "text": "1 writes parked since 2026-03-04T02:15:00+00:00",
    }
    # Writes still pending after failed attempts (blocked behind a parked customer, or a
    # drain retrying right now) are not "normal" either.
    retrying = {**UNREACHABLE, "parked": 0, "queued": 3, "queued_since": T}
    assert delivery.status(retrying, None) == {
        "state": "unreachable",
        "text": "3 writes retrying since 2026-03-04T02:15:00+00:00 (last error connection at "
        "2026-03-04T02:16:00+00:00: APIConnectionError: connection refused)",
    }
    assert delivery.status({**NOTHING, "queued": 2}, None) == {
        "state": "queued",
        "text": "2 writes queued for the next push",
    }
    assert delivery.status({**NOTHING, "queued": 7}, READ_ONLY) == {
        "state": "read_only",
        "text": "since 2026-03-04T01:00:00+00:00 — incident 42 · 7 writes queued",
    }


DAGS = [{"dag_id": "billing_nightly", "is_paused": False}]


def _run(run_id, state, run_after, start=None, end=None, duration=None):
    return {
        "dag_id": "billing_nightly",
        "dag_run_id": run_id,
        "state": state,
        "run_after": run_after,
        "start_date": start,
        "end_date": end,
        "duration": duration,
    }


def _ti(run_id, task_id, state, start=None, end=None):
    return {
        "dag_id": "billing_nightly",
        "dag_run_id": run_id,
        "task_id": task_id,
        "state": state,
        "start_date": start,
        "end_date": end,
    }


def test_dags_test_run_duration_comes_from_its_tasks():
    # `airflow dags test` for an earlier day: the run's start is its logical date (Feb 4),
    # its end today, so the run itself says 714 h. Its tasks ran for 3 min 30 s.
    run = _run(
        "manual__2026-02-04T00:00:00+00:00",
        "success",
        "2026-02-04T00:00:00Z",
        start="2026-02-04T00:00:00Z",
        end="2026-03-05T18:05:00Z",
        duration=2570700.0,
    )
    tis = [
        _ti(run["dag_run_id"], "ingest", "success", "2026-03-05T18:01:30Z", "2026-03-05T18:02:00Z"),
        _ti(
            run["dag_run_id"],
            "stripe_push",
            "success",
            "2026-03-05T18:03:00Z",
            "2026-03-05T18:05:00Z",
        ),
        _ti(run["dag_run_id"], "stripe_close_period", "skipped"),  # never started
    ]
    (tile,) = red_tiles(DAGS, [run], 7, tis)
    assert (tile["duration_p50_s"], tile["duration_p95_s"]) == (210.0, 210.0)
    assert (tile["duration_p50"], tile["duration_p95"]) == ("3.5 min", "3.5 min")
    assert tile["health"] == "ok"
    # Without task instances, the run's own duration is all there is.
    (bare,) = red_tiles(DAGS, [run], 7, [])
    assert bare["duration_p95"] == "714.1 h"


def test_a_retrying_task_counts_as_an_error():
    ok = _run("scheduled__1", "success", "2026-03-03T00:00:00Z")
    retrying = _run("scheduled__2", "running", "2026-03-04T00:00:00Z")
    tis = [
        _ti("scheduled__1", "ingest", "success"),
        _ti("scheduled__2", "ingest", "success"),
        _ti("scheduled__2", "stripe_push", "up_for_retry"),
    ]
    (tile,) = red_tiles(DAGS, [ok, retrying], 7, tis)
    assert {k: tile[k] for k in ("failed", "retrying", "errors", "counted", "active")} == {
        "failed": 0,
        "retrying": 1,
        "errors": 1,
        "counted": 2,
        "active": 1,
    }
    assert (tile["error_rate"], tile["error_pct"], tile["health"]) == (0.5, "50%", "degraded")
    assert tile["last_run"]["outcome"] == "retrying"
    # The same running run without a retry is just active: not counted, not an error.
    (calm,) = red_tiles(DAGS, [ok, retrying], 7, tis[:2])
    assert (calm["errors"], calm["counted"], calm["active"], calm["health"]) == (0, 1, 1, "ok")


def test_a_skipped_delivery_sentinel_marks_the_run_degraded():
    run = _run("scheduled__3", "success", "2026-03-04T00:00:00Z")
    tis = [
        _ti("scheduled__3", "stripe_push", "success"),
        _ti("scheduled__3", delivery.SENTINEL_TASK_ID, "skipped"),
    ]
    (tile,) = red_tiles(DAGS, [run], 7, tis)
    assert (tile["degraded"], tile["errors"], tile["health"]) == (1, 0, "degraded")
    assert tile["last_run"]["outcome"] == "degraded"
    failed = _run("scheduled__4", "failed", "2026-03-05T00:00:00Z")
    (tile,) = red_tiles(DAGS, [run, failed], 7, tis)
    assert (tile["failed"], tile["errors"], tile["health"]) == (1, 1, "failing")
