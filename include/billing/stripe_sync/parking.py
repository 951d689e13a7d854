"""Redis: the copy of parked writes for manual retry.

Parked writes are one hash (field = idempotency key, value = JSON with the payload and the
last error). The outbox row (``status = 'parked'``, attempts, last error, ``parked_at``) is
the source of truth: every reader (``billing parked``, the Billing page, the
``billing_stripe_parked_queue_depth`` metric, retries) reads Postgres, and :func:`mirror`
writes back a copy Redis lost (FLUSHALL, a restart without persistence), so the hash is
always rebuildable from the outbox and never the only record. The Stripe read-only
(outage) flag is not here any more: it is durable in Postgres (``billing.stripe_sync.mode``).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import redis

from billing.platform import connections
from billing.platform.errors import ServiceError

PARKED = "billing:stripe:parked"


def client() -> redis.Redis:
    return redis.Redis.from_url(
        connections.redis_url(), decode_responses=True, socket_timeout=10, socket_connect_timeout=10
    )


def _guard(fn):
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise ServiceError(f"Redis ({connections.REDIS}) unavailable: {exc}") from None

    wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
    return wrapped


def _jsonable(v: Any) -> Any:
    if isinstance(v, dt.date | dt.datetime):
        return v.isoformat()
    return v


RECORD_FIELDS = (
    "idempotency_key",
    "kind",
    "org_id",
    "period",
    "day",
    "metric",
    "amount_cents",
    "currency",
    "payload",
    "attempts",
    "first_attempt_at",
)


def record(
    row: dict,
    error: str | None = None,
    error_class: str | None = None,
    parked_at: dt.datetime | None = None,
) -> dict:
    """A parked write as JSON-able fields; error and time default to the outbox row's."""
    rec = {k: _jsonable(row.get(k)) for k in RECORD_FIELDS}
    rec.update(
        last_error=row.get("last_error") if error is None else error,
        error_class=row.get("last_error_class") if error_class is None else error_class,
        parked_at=_jsonable(parked_at or row.get("parked_at") or dt.datetime.now(dt.UTC)),
    )
    return rec


@_guard
def park(r: redis.Redis, row: dict, error: str, error_class: str) -> None:
    rec = record(row, error, error_class, dt.datetime.now(dt.UTC))
    r.hset(PARKED, row["idempotency_key"], json.dumps(rec, sort_keys=True))


@_guard
def mirror(r: redis.Redis, records: list[dict], settled: set[str]) -> dict[str, int]:
    """Bring the hash in line with the outbox: write back ``records`` (the outbox's parked
    rows) that Redis lost, drop entries whose write is ``settled`` (sent, cancelled or gone).

    Entries of rows that are pending again (a retry in progress) are left alone.
    """
    present = set(r.hkeys(PARKED))
    missing = {
        rec["idempotency_key"]: json.dumps(rec, sort_keys=True)
        for rec in records
        if rec["idempotency_key"] not in present
    }
    stale = sorted(present & settled)
    if missing:
        r.hset(PARKED, mapping=missing)
    if stale:
        r.hdel(PARKED, *stale)
    return {"restored": len(missing), "dropped": len(stale)}


@_guard
def keys(r: redis.Redis) -> set[str]:
    return set(r.hkeys(PARKED))


@_guard
def unpark(r: redis.Redis, key: str) -> None:
    r.hdel(PARKED, key)


@_guard
def parked(r: redis.Redis) -> dict[str, dict]:
    return {k: json.loads(v) for k, v in sorted(r.hgetall(PARKED).items())}


@_guard
def show(r: redis.Redis, key: str) -> dict | None:
    raw = r.hget(PARKED, key)
    return json.loads(raw) if raw else None
