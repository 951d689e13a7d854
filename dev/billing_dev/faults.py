"""A fault-injecting HTTP proxy: sits on 127.0.0.1 in front of the Stripe emulator.

Used by the Stripe sync tests (``tests/faultproxy.py`` re-exports it) and by the month-long
simulation (``billing simulate --faults stripe|all``). Rates and ``sticky_rate`` may be
changed while it runs (the simulator opens and closes fault windows day by day).

Deterministic for a seed: whether a write is faulted depends only on (seed, method, path,
Idempotency-Key, how many times that write was seen), never on timing or thread
interleaving (reads without a key are told apart by body hash and count, so with
concurrent clients their order matters). ``forced`` faults go to the first keyed requests,
so every kind is exercised whatever the seed. Faults:

* ``500``      -- a Stripe-shaped 500 ``api_error`` (not forwarded)
* ``429``      -- rate limited with ``Retry-After`` (not forwarded)
* ``409``      -- idempotency conflict "in flight" (not forwarded)
* ``reset``    -- the connection is reset before forwarding
* ``timeout``  -- the request is held past the client's timeout, then dropped (not forwarded)
* ``lost``     -- forwarded; the emulator commits; the response is dropped
* ``fault_paths`` limits faults to some endpoints.
* sticky keys  -- a share of idempotency keys fail with 503 on every attempt while
  ``sticky_rate`` > 0 (to force parking); set it to 0 to let them through.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
from collections import Counter

import aiohttp

FAULTS = ("500", "429", "409", "reset", "timeout", "lost")


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        seed: int = 0,
        rates: dict[str, float] | None = None,
        sticky_rate: float = 0.0,
        fault_paths: tuple[str, ...] | None = None,
        forced: tuple[str, ...] = (),
        normalize=None,
        hold_seconds: float = 1.0,
        retry_after: int = 3,
    ):
        self.upstream = upstream.rstrip("/")
        self.seed = seed
        self.fault_paths = fault_paths  # None: every path; else only paths with these prefixes
        # Faults given to the first keyed first attempts, so each kind is seen at least once.
        self.forced = list(forced)
        # Maps ids that differ between runs (e.g. random org ids) to stable names, so the
        # same seed faults the same writes every run.
        self.normalize = normalize or (lambda text: text)
        self.rates = dict(rates or {})
        self.sticky_rate = sticky_rate
        self.hold_seconds = hold_seconds
        self.retry_after = retry_after
        self.seen: Counter = Counter()
        self.injected: Counter = Counter()
        self.forwarded = 0
        self.forwarded_paths: Counter = Counter()
        self.port: int | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # ------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._session = aiohttp.ClientSession(auto_decompress=False)
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
        await self._session.close()

    # ------------------------------------------------------------ decisions
    def decide(self, method: str, path: str, headers: dict[str, str], body: bytes) -> str | None:
        ident = headers.get("idempotency-key") or hashlib.sha256(body).hexdigest()[:16]
        request_id = self.normalize(f"{method} {path.split('?')[0]} {ident}")
        with self._lock:
            n = self.seen[request_id]
            self.seen[request_id] += 1
        if self.fault_paths is not None and not path.startswith(self.fault_paths):
            return None
        key = headers.get("idempotency-key")
        if key and self.sticky_rate > 0:
            if (
                random.Random(f"{self.seed}:sticky:{self.normalize(key)}").random()
                < self.sticky_rate
            ):
                return "sticky"
        if key and n == 0 and self.forced:
            with self._lock:
                if self.forced:
                    return self.forced.pop(0)
        r = random.Random(f"{self.seed}:{request_id}:{n}").random()
        acc = 0.0
        for fault in FAULTS:
            acc += self.rates.get(fault, 0.0)
            if r < acc:
                return fault
        return None

    # ------------------------------------------------------------ HTTP
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, target, _ = line.decode("latin-1").split(" ", 2)
                raw_headers: list[tuple[str, str]] = []
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = h.decode("latin-1").partition(":")
                    raw_headers.append((name.strip(), value.strip()))
                headers = {k.lower(): v for k, v in raw_headers}
                length = int(headers.get("content-length", "0") or 0)
                body = await reader.readexactly(length) if length else b""
                fault = self.decide(method, target, headers, body)
                if fault:
                    with self._lock:
                        self.injected[fault] += 1
                if fault in ("reset",):
                    writer.transport.abort()
                    return
                if fault == "timeout":
                    await asyncio.sleep(self.hold_seconds)
                    writer.transport.abort()
                    return
                if fault in ("500", "429", "409", "sticky"):
                    await self._write(writer, *self._canned(fault))
                    continue
                status, resp_headers, resp_body = await self._forward(
                    method, target, raw_headers, body
                )
                if fault == "lost":
                    writer.transport.abort()
                    return
                await self._write(writer, status, resp_headers, resp_body)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            if not writer.transport.is_closing():
                writer.close()

    def _canned(self, fault: str) -> tuple[int, list[tuple[str, str]], bytes]:
        if fault == "429":
            status, err, extra = (
                429,
                {
                    "type": "invalid_request_error",
                    "code": "rate_limit",
                    "message": "Too many requests",
                },
                [("Retry-After", str(self.retry_after))],
            )
        elif fault == "409":
            status, err, extra = (
                409,
                {  # what Stripe (and the emulator) answer while the key is in flight
                    "type": "invalid_request_error",
                    "code": "idempotency_key_in_use",
                    "message": "There is currently another in-progress request "
                    "using this Idempotent Key",
                },
                [],
            )
        elif fault == "sticky":
            status, err, extra = 503, {"type": "api_error", "message": "sticky fault"}, []
        else:
            status, err, extra = (
                500,
                {"type": "api_error", "message": "injected fault"},
                [("Stripe-Should-Retry", "true")],
            )
        body = json.dumps({"error": err}).encode()
        return status, [("Content-Type", "application/json"), *extra], body

    async def _forward(self, method, target, raw_headers, body):
        skip = {"host", "content-length", "connection", "transfer-encoding", "accept-encoding"}
        headers = [(k, v) for k, v in raw_headers if k.lower() not in skip]
        async with self._session.request(
            method, self.upstream + target, headers=headers, data=body or None
        ) as resp:
            data = await resp.read()
            out = [
                (k, v)
                for k, v in resp.headers.items()
                if k.lower()
                not in ("content-length", "transfer-encoding", "connection", "content-encoding")
            ]
        with self._lock:
            self.forwarded += 1
            self.forwarded_paths[f"{method} {target.split('?')[0]}"] += 1
        return resp.status, out, data

    async def _write(
        self, writer, status: int, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        head = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers]
        head += [f"Content-Length: {len(body)}", "Connection: keep-alive", "", ""]
        writer.write("\r\n".join(head).encode("latin-1") + body)
        await writer.drain()
