"""Talking to Stripe: one SDK client built from ``stripe_default``, our retry policy, a rate limit.

The SDK's own retries are off (``max_network_retries=0``) so the policy here is the only
one: retryable failures (connection errors, timeouts, 409 ``idempotency_key_in_use``, 429,
5xx) back off 1, 2, 4, 8, 16 s (or the server's ``Retry-After`` when longer), then the
caller parks the write. A 400 ``idempotency_error`` (the key reused with other parameters)
is final. The secret key is read from the connection and
handed to the SDK; it is never logged or stored, and error texts are scrubbed of key-like
strings before they reach the outbox or Redis.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import stripe

from billing import observability as obs
from billing.platform import connections, settings
from billing.platform.errors import ServiceError

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"\b(sk|rk|pk)_(test|live)_[A-Za-z0-9*]+")


@dataclass(frozen=True)
class Policy:
    """Retry, rate and timeout settings (env overrides, for tests and production tuning)."""

    backoff_base: float = 1.0
    max_retries: int = 5
    max_rps: float = 25.0
    concurrency: int = 4
    timeout: float = 30.0
    days_until_due: int = 30

    @classmethod
    def from_env(cls) -> Policy:
        return cls(
            backoff_base=settings.stripe_backoff_base_s(),
            max_retries=settings.stripe_max_retries(),
            max_rps=settings.stripe_max_rps(),
            concurrency=settings.stripe_concurrency(),
            timeout=settings.stripe_timeout_s(),
            days_until_due=settings.stripe_days_until_due(),
        )

    def delays(self) -> list[float]:
        """The backoff schedule before each retry: base * 1, 2, 4, 8, 16."""
        return [self.backoff_base * 2**i for i in range(self.max_retries)]


class RateLimiter:
    """Spaces requests at most ``rate`` per second across threads (0 = unlimited)."""

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._clock, self._sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            self._sleep(slot - now)


# Every error class classify() returns, plus the engine's foreign_pending_items (a customer's
# pending items we did not create): the error_class labels of the outbox's error_counts and of
# billing_stripe_outbox_errors_total, exported from 0.
ERROR_CLASSES = (
    "connection",
    "timeout",
    "idempotency_conflict",
    "rate_limit",
    "server",
    "auth",
    "permission",
    "card",
    "not_found",
    "idempotency_mismatch",
    "invalid_request",
    "api",
    "foreign_pending_items",
)


@dataclass(frozen=True)
class Failure:
    error_class: str
    retryable: bool
    message: str
    http_status: int | None = None
    retry_after: float | None = None


class StripeAuthError(ServiceError):
    """The key is wrong or lacks a permission: stop, every other write would fail the same way."""


class GiveUp(Exception):
    """Raised by :meth:`Gateway.call` when the retry policy is exhausted or the error is final."""

    def __init__(self, failure: Failure, attempts: int):
        super().__init__(failure.message)
        self.failure, self.attempts = failure, attempts


def scrub(text: str) -> str:
    return _KEY_RE.sub(r"\1_\2_***", text)[:2000]


def _header(headers: Any, name: str) -> str | None:
    if not headers:
        return None
    for k, v in dict(headers).items():
        if k.lower() == name:
            return str(v)
    return None


def classify(exc: stripe.StripeError) -> Failure:
    """Map an SDK error to an error class and whether our policy retries it."""
    message = scrub(f"{type(exc).__name__}: {exc.user_message or exc}")
    if isinstance(exc, stripe.APIConnectionError):
        cls = "timeout" if "timeout" in str(exc).lower() else "connection"
        return Failure(cls, True, message)
    status = exc.http_status
    should_retry = _header(exc.headers, "stripe-should-retry")
    retry_after = _header(exc.headers, "retry-after")
    try:
        after = float(retry_after) if retry_after else None
    except ValueError:
        after = None
    if status == 409:
        # idempotency_key_in_use: a request with this key is still executing (e.g. the
        # attempt whose response was lost). Nothing was saved for this one: back off and
        # send it again; once the first finishes, Stripe replays its answer.
        cls, retryable = "idempotency_conflict", True
    elif status == 429:
        cls, retryable = "rate_limit", True
    elif status is not None and status >= 500:
        cls, retryable = "server", True
    elif status == 401:
        cls, retryable = "auth", False
    elif status == 403:
        cls, retryable = "permission", False
    elif status == 402:
        cls, retryable = "card", False
    elif status == 404:
        cls, retryable = "not_found", False
    elif isinstance(exc, stripe.IdempotencyError):
        cls, retryable = "idempotency_mismatch", False
    elif status == 400:
        cls, retryable = "invalid_request", False
    else:
        cls, retryable = "api", False
    if should_retry is not None and cls not in ("auth", "permission"):
        retryable = should_retry.lower() == "true"
    return Failure(cls, retryable, message, status, after)


def _client_from_connection(timeout: float) -> stripe.StripeClient:
    conn = connections.get(connections.STRIPE)
    if not conn.password:
        raise ServiceError(f"connection {connections.STRIPE} has no secret key (password)")
    base = {}
    if conn.host:
        host = conn.host if "://" in conn.host else f"https://{conn.host}"
        if conn.port and host.count(":") < 2:
            host = f"{host}:{conn.port}"
        base["api"] = host.rstrip("/")
    return stripe.StripeClient(
        conn.password,
        base_addresses=base,
        max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=timeout),
    )


class Gateway:
    """The one way this package calls Stripe: rate-limited, measured, retried by policy."""

    def __init__(
        self,
        policy: Policy | None = None,
        sleep: Callable[[float], None] | None = None,
        client: stripe.StripeClient | None = None,
    ):
        self.policy = policy or Policy.from_env()
        self.sleep = sleep or time.sleep
        self.stripe = client or _client_from_connection(self.policy.timeout)
        self.limiter = RateLimiter(self.policy.max_rps)

    @property
    def v1(self):
        return self.stripe.v1

    def once(self, op: str, fn: Callable[[], Any]) -> Any:
        """One rate-limited request; auth/permission errors become :class:`StripeAuthError`."""
        self.limiter.acquire()
        started = time.perf_counter()
        try:
            result = fn()
        except stripe.StripeError as exc:
            failure = classify(exc)
            obs.STRIPE_REQUESTS.labels(op, failure.error_class).inc()
            if failure.error_class in ("auth", "permission"):
                raise StripeAuthError(
                    f"Stripe rejected the key from {connections.STRIPE} ({failure.error_class}); "
                    "check the connection (docs/STRIPE_KEYS_ROTATION.md)"
                ) from None
            raise
        finally:
            obs.STRIPE_REQUEST_SECONDS.labels(op).observe(time.perf_counter() - started)
        obs.STRIPE_REQUESTS.labels(op, "ok").inc()
        return result

    def call(
        self,
        op: str,
        fn: Callable[[], Any],
        on_failure: Callable[[Failure, float | None], None] | None = None,
    ) -> tuple[Any, int]:
        """Run ``fn`` under the retry policy; return (result, attempts) or raise :class:`GiveUp`.

        ``on_failure(failure, next_delay)`` is called after every failed attempt (next_delay
        is None when giving up) so the caller can keep durable counters.
        """
        delays = self.policy.delays()
        for attempt in range(len(delays) + 1):
            try:
                return self.once(op, fn), attempt + 1
            except stripe.StripeError as exc:
                failure = classify(exc)
                obs.STRIPE_ERRORS.labels(failure.error_class).inc()
                final = not failure.retryable or attempt == len(delays)
                delay = None if final else max(delays[attempt], failure.retry_after or 0.0)
                if on_failure:
                    on_failure(failure, delay)
                if final:
                    raise GiveUp(failure, attempt + 1) from None
                obs.STRIPE_RETRIES.labels(failure.error_class).inc()
                log.info("stripe %s failed (%s), retry in %.3gs", op, failure.error_class, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")
