"""Redis: parked writes for manual retry, and the Stripe read-only (outage) flag.

Parked writes are one hash (field = idempotency key, value = JSON with the payload and the
last error); the outbox row says ``parked`` too, so either side can rebuild the other.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import redis

from billing import connections
from billing.errors import ServiceError

PARKED = "billing:stripe:parked"
READ_ONLY = "billing:stripe:read_only"


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


@_guard
def park(r: redis.Redis, row: dict, error: str, error_class: str) -> None:
    record = {
        k: _jsonable(row.get(k))
        for k in (
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
    }
    record.update(
        last_error=error, error_class=error_class, parked_at=dt.datetime.now(dt.UTC).isoformat()
    )
    r.hset(PARKED, row["idempotency_key"], json.dumps(record, sort_keys=True))


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


@_guard
def is_read_only(r: redis.Redis) -> bool:
    return r.get(READ_ONLY) is not None


@_guard
def set_read_only(r: redis.Redis, on: bool, reason: str = "") -> None:
    if on:
        r.set(
            READ_ONLY, json.dumps({"since": dt.datetime.now(dt.UTC).isoformat(), "reason": reason})
        )
    else:
        r.delete(READ_ONLY)


@_guard
def read_only_info(r: redis.Redis) -> dict | None:
    raw = r.get(READ_ONLY)
    return json.loads(raw) if raw else None
