"""The Stripe emulator (billing_dev.stack.stripe_emulator), run as a real subprocess on a loopback
port and driven through the official ``stripe`` SDK, plus raw HTTP where the SDK hides
headers or status codes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import stripe

API_KEY = "sk_test_emulatorSecret0123456789"
ROLLED_KEY = "sk_test_rolledSameAccount9876543210"  # another key of the same account
START_TIMEOUT = 20.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _uid() -> str:
    return uuid.uuid4().hex[:12]


class Emulator:
    """One emulator process (restartable on the same port and state dir)."""

    def __init__(self, base: Path, port: int) -> None:
        self.state_dir = base / "state"
        self.log_path = base / "emulator.log"
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "billing_dev.stack.stripe_emulator",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--state-dir",
                    str(self.state_dir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"emulator exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/_emulator/health", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)  # poll interval, bounded by the deadline
        self.proc.kill()
        pytest.fail(f"emulator not ready after {START_TIMEOUT}s:\n{self.log()}")

    def kill9(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=10)

    def terminate(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, key: str = API_KEY) -> stripe.StripeClient:
        return stripe.StripeClient(key, base_addresses={"api": self.url})

    def admin(self, method: str, path: str, **params: Any) -> dict[str, Any]:
        """A test hook under /_emulator/ (no key); fails the test on an error status."""
        query = "?" + urllib.parse.urlencode(params) if method == "GET" and params else ""
        data = {k: str(v) for k, v in params.items()} if method == "POST" else None
        status, _, body = self.http(method, f"/_emulator/{path}{query}", data, key=None)
        assert status == 200, body
        return body

    def http(
        self,
        method: str,
        path: str,
        data: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        key: str | None = API_KEY,
    ) -> tuple[int, dict[str, str], Any]:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        if key is not None:
            request.add_header("Authorization", f"Bearer {key}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                status, raw, hdrs = resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as err:
            status, raw, hdrs = err.code, err.read(), err.headers
        assert hdrs.get_content_type() == "application/json", raw
        return status, {k.lower(): v for k, v in hdrs.items()}, json.loads(raw)


def _headers(obj: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in obj.last_response.headers.items()}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Emulator:
    emu = Emulator(tmp_path_factory.mktemp("stripe-emulator"), _free_port())
    emu.start()
    yield emu
    assert emu.terminate() == 0, emu.log()


@pytest.fixture(scope="module")
def client(emulator: Emulator) -> stripe.StripeClient:
    return emulator.client()


def _customer(client: stripe.StripeClient, **params: Any) -> Any:
    return client.v1.customers.create(params={"email": f"{_uid()}@example.com", **params})


def _item(client: stripe.StripeClient, customer: str, amount: int, **params: Any) -> Any:
    return client.v1.invoice_items.create(
        params={"customer": customer, "amount": amount, "currency": "usd", **params}
    )


def _invoice(client: stripe.StripeClient, customer: str, *amounts: int, **params: Any) -> Any:
    for amount in amounts:
        _item(client, customer, amount)
    return client.v1.invoices.create(
        params={"customer": customer, "pending_invoice_items_behavior": "include", **params}
    )


# ----------------------------------------------------------------------------- idempotency


def test_idempotent_replay_returns_original_response_and_creates_one_object(
    emulator: Emulator, client: stripe.StripeClient
) -> None:
    email = f"idem-{_uid()}@example.com"
    key = f"create-customer-{_uid()}"
    params = {"email": email, "metadata": {"org_id": "idem"}}

    first = client.v1.customers.create(params=params, options={"idempotency_key": key})
    second = client.v1.customers.create(params=params, options={"idempotency_key": key})

    assert second.id == first.id
    assert second.last_response.code == first.last_response.code == 200
    assert second.last_response.body == first.last_response.body
    assert _headers(second)["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in _headers(first)
    assert _headers(second)["idempotency-key"] == key
    assert [c.id for c in client.v1.customers.list(params={"email": email}).data] == [first.id]


def test_idempotency_is_per_account_so_a_rolled_key_shares_it(emulator: Emulator) -> None:
    """Stripe scopes idempotency keys to the account and mode, not to the API key: after a
    key roll, a retry with the new key replays the old key's request (never a second write),
    and reusing the key with other parameters is refused whichever key sends it."""
    old, new = emulator.client(API_KEY), emulator.client(ROLLED_KEY)
    email = f"roll-{_uid()}@example.com"
    key = f"roll-{_uid()}"
    params = {"email": email, "metadata": {"org_id": "roll"}}
    first = old.v1.customers.create(params=params, options={"idempotency_key": key})

    retried = new.v1.customers.create(params=params, options={"idempotency_key": key})
    assert retried.id == first.id
    assert _headers(retried)["idempotent-replayed"] == "true"
    assert retried.last_response.body == first.last_response.body
    with pytest.raises(stripe.IdempotencyError) as excinfo:
        new.v1.customers.create(params={"email": "x" + email}, options={"idempotency_key": key})
    assert excinfo.value.http_status == 400
    assert excinfo.value.json_body["error"]["type"] == "idempotency_error"
    assert [c.id for c in new.v1.customers.list(params={"email": email}).data] == [first.id]
    assert new.v1.customers.list(params={"email": "x" + email}).data == []

    # A write first sent with the new key replays for the old one too (the overlap window).
    key2 = f"roll-{_uid()}"
    second = new.v1.customers.create(
        params={"email": "2" + email}, options={"idempotency_key": key2}
    )
    again = old.v1.customers.create(
        params={"email": "2" + email}, options={"idempotency_key": key2}
    )
    assert (again.id, _headers(again)["idempotent-replayed"]) == (second.id, "true")


def test_idempotency_records_expire_after_24_hours(emulator: Emulator) -> None:
    """Stripe may prune a key once it is at least 24 hours old; reusing it then is a new
    request. The emulator clock is advanced instead of waiting."""
    client = emulator.client()
    email = f"ttl-{_uid()}@example.com"
    key = f"ttl-{_uid()}"
    first = client.v1.customers.create(params={"email": email}, options={"idempotency_key": key})
    emulator.admin("POST", "clock/advance", seconds=24 * 3600 - 60)
    replay = client.v1.customers.create(params={"email": email}, options={"idempotency_key": key})
    assert (replay.id, _headers(replay)["idempotent-replayed"]) == (first.id, "true")
    emulator.admin("POST", "clock/advance", seconds=61)
    later = client.v1.customers.create(params={"email": email}, options={"idempotency_key": key})
    assert later.id != first.id and "idempotent-replayed" not in _headers(later)
    listed = client.v1.customers.list(params={"email": email}).data
    assert sorted(c.id for c in listed) == sorted([first.id, later.id])


def _held_request(
    emulator: Emulator, key: str, form: dict[str, str]
) -> tuple[threading.Thread, list]:
    """Start a POST /v1/customers with ``key`` in a thread and return once the emulator holds
    it in flight (a hook event, not a sleep)."""
    emulator.admin("POST", "holds", idempotency_key=key)
    answer: list = []
    thread = threading.Thread(
        target=lambda: answer.append(
            emulator.http("POST", "/v1/customers", form, {"Idempotency-Key": key})
        )
    )
    thread.start()
    assert emulator.admin("GET", "holds/wait", idempotency_key=key, timeout=20)["held"] is True
    return thread, answer


def test_same_key_while_the_first_request_is_in_flight_is_409(emulator: Emulator) -> None:
    key = f"inflight-{_uid()}"
    form = {"email": f"inflight-{_uid()}@example.com"}
    thread, answer = _held_request(emulator, key, form)
    try:
        status, headers, body = emulator.http(
            "POST", "/v1/customers", form, {"Idempotency-Key": key}
        )
        assert status == 409
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["code"] == "idempotency_key_in_use"
        assert "another in-progress request" in body["error"]["message"]
        assert "idempotent-replayed" not in headers
        # Another key is not blocked by the held request.
        status, _, other = emulator.http(
            "POST", "/v1/customers", {"email": "x" + form["email"]}, {"Idempotency-Key": key + "x"}
        )
        assert status == 200 and other["email"] == "x" + form["email"]
        assert emulator.admin("GET", "health")["in_flight"] == 1
    finally:
        emulator.admin("POST", "holds/release", idempotency_key=key)
        thread.join(timeout=20)
    ((status, _, created),) = answer
    assert status == 200
    # The 409 saved nothing: the key now replays the first request's answer.
    status, headers, replayed = emulator.http(
        "POST", "/v1/customers", form, {"Idempotency-Key": key}
    )
    assert (status, headers["idempotent-replayed"], replayed) == (200, "true", created)
    assert [c.id for c in emulator.client().v1.customers.list(params=form).data] == [created["id"]]


def test_gateway_backs_off_on_idempotency_key_in_use_then_gets_the_first_answer(
    emulator: Emulator,
) -> None:
    """Our client treats 409 idempotency_key_in_use as retryable with backoff: two real
    concurrent requests, the first held in flight by the emulator until the backoff."""
    from billing.stripe_sync.client import Gateway, Policy

    key = f"gw-{_uid()}"
    form = {"email": f"gw-{_uid()}@example.com"}
    thread, answer = _held_request(emulator, key, form)
    slept: list[float] = []
    failures: list[tuple[str, float | None]] = []

    def sleep(delay: float) -> None:  # the backoff: let the first request finish meanwhile
        slept.append(delay)
        emulator.admin("POST", "holds/release", idempotency_key=key)
        thread.join(timeout=20)

    sdk = stripe.StripeClient(API_KEY, base_addresses={"api": emulator.url}, max_network_retries=0)
    gw = Gateway(Policy(max_rps=0), sleep=sleep, client=sdk)
    try:
        customer, attempts = gw.call(
            "create_customer",
            lambda: gw.v1.customers.create(params=form, options={"idempotency_key": key}),
            lambda f, delay: failures.append((f.error_class, delay)),
        )
    finally:
        if thread.is_alive():
            emulator.admin("POST", "holds/release", idempotency_key=key)
            thread.join(timeout=20)
    ((status, _, first),) = answer
    assert status == 200
    assert (attempts, slept, failures) == (2, [1.0], [("idempotency_conflict", 1.0)])
    assert customer.id == first["id"]
    assert _headers(customer)["idempotent-replayed"] == "true"
    assert [c.id for c in sdk.v1.customers.list(params=form).data] == [first["id"]]


def test_idempotency_key_reused_with_other_parameters_is_rejected(
    client: stripe.StripeClient,
) -> None:
    email = f"idem-{_uid()}@example.com"
    key = f"reuse-{_uid()}"
    original = client.v1.customers.create(params={"email": email}, options={"idempotency_key": key})

    with pytest.raises(stripe.IdempotencyError) as excinfo:
        client.v1.customers.create(
            params={"email": f"other-{email}"}, options={"idempotency_key": key}
        )
    assert excinfo.value.http_status == 400
    error = excinfo.value.json_body["error"]
    assert error["type"] == "idempotency_error"
    assert error["message"].startswith(
        "Keys for idempotent requests can only be used with the same parameters they were "
        "first used with."
    )
    assert client.v1.customers.list(params={"email": f"other-{email}"}).data == []

    # Same key on another endpoint is rejected too; nothing is created there either.
    with pytest.raises(stripe.IdempotencyError) as excinfo:
        client.v1.invoice_items.create(
            params={"customer": original.id, "amount": 100, "currency": "usd"},
            options={"idempotency_key": key},
        )
    assert "same endpoint" in excinfo.value.json_body["error"]["message"]
    assert client.v1.invoice_items.list(params={"customer": original.id}).data == []


def test_idempotent_invoice_creation_does_not_create_a_second_invoice(
    emulator: Emulator, client: stripe.StripeClient
) -> None:
    cus = _customer(client)
    _item(client, cus.id, 700)
    form = {"customer": cus.id, "metadata[run]": "r1", "pending_invoice_items_behavior": "include"}
    headers = {"Idempotency-Key": f"invoice-{_uid()}"}

    status1, headers1, body1 = emulator.http("POST", "/v1/invoices", form, headers)
    _item(client, cus.id, 50)  # a replay must not sweep this new pending item
    status2, headers2, body2 = emulator.http("POST", "/v1/invoices", form, headers)

    assert (status1, status2) == (200, 200)
    assert body2 == body1
    assert body1["total"] == 700
    assert headers2["idempotent-replayed"] == "true"
    assert headers2["original-request"] == headers1["request-id"]
    invoices = client.v1.invoices.list(params={"customer": cus.id}).data
    assert [inv.id for inv in invoices] == [body1["id"]]
    pending = client.v1.invoice_items.list(params={"customer": cus.id, "pending": True}).data
    assert [ii.amount for ii in pending] == [50]


# ----------------------------------------------------------------------------- invoices


def test_invoice_collects_pending_items_with_exact_totals(client: stripe.StripeClient) -> None:
    cus = _customer(client, name="Acme Corp")
    other = _customer(client)
    other_item = _item(client, other.id, 9_999)
    fee = _item(
        client,
        cus.id,
        1500,
        description="Platform fee",
        metadata={"meter": "platform", "org_id": "acme"},
        period={"start": 1_790_000_000, "end": 1_792_592_000},
    )
    seats = client.v1.invoice_items.create(
        params={
            "customer": cus.id,
            "currency": "usd",
            "quantity": 3,
            "unit_amount_decimal": "250",
            "description": "Seats",
        }
    )
    credit = _item(client, cus.id, -300, description="Goodwill credit")

    assert (seats.amount, seats.quantity, seats.unit_amount_decimal) == (750, 3, "250")
    assert client.v1.invoice_items.retrieve(fee.id).metadata.to_dict() == {
        "meter": "platform",
        "org_id": "acme",
    }

    inv = client.v1.invoices.create(
        params={
            "customer": cus.id,
            "pending_invoice_items_behavior": "include",
            "collection_method": "send_invoice",
            "days_until_due": 14,
            "auto_advance": False,
            "metadata": {"org_id": "acme", "period": "2026-10"},
        }
    )

    assert inv.object == "invoice"
    assert inv.status == "draft"
    assert inv.number is None
    assert inv.customer == cus.id
    assert inv.currency == "usd"
    assert inv.collection_method == "send_invoice"
    assert inv.auto_advance is False
    assert inv.due_date == inv.created + 14 * 86400
    assert inv.metadata.to_dict() == {"org_id": "acme", "period": "2026-10"}
    assert (inv.subtotal, inv.total, inv.amount_due) == (1950, 1950, 1950)
    assert (inv.amount_paid, inv.amount_remaining) == (0, 1950)
    assert [(line.amount, line.description) for line in inv.lines.data] == [
        (1500, "Platform fee"),
        (750, "Seats"),
        (-300, "Goodwill credit"),
    ]
    assert inv.lines.data[0].metadata.to_dict() == {"meter": "platform", "org_id": "acme"}
    assert inv.lines.data[0].period.to_dict() == {"start": 1_790_000_000, "end": 1_792_592_000}

    on_invoice = client.v1.invoice_items.list(params={"invoice": inv.id}).data
    assert sorted(ii.id for ii in on_invoice) == sorted([fee.id, seats.id, credit.id])
    assert {ii.invoice for ii in on_invoice} == {inv.id}
    assert client.v1.invoice_items.list(params={"customer": cus.id, "pending": True}).data == []
    assert [
        ii.id for ii in client.v1.invoice_items.list(params={"customer": other.id, "pending": True})
    ] == [other_item.id]

    lines = client.v1.invoices.line_items.list(inv.id, params={"limit": 2})
    assert [line.amount for line in lines.data] == [1500, 750]
    assert lines.has_more is True


def test_exclude_pending_items_and_zero_invoice_is_paid_on_finalize(
    client: stripe.StripeClient,
) -> None:
    cus = _customer(client)
    item = _item(client, cus.id, 400)

    empty = client.v1.invoices.create(
        params={"customer": cus.id, "pending_invoice_items_behavior": "exclude"}
    )
    assert (empty.total, empty.amount_due, len(empty.lines.data)) == (0, 0, 0)
    assert client.v1.invoice_items.retrieve(item.id).invoice is None

    finalized = client.v1.invoices.finalize_invoice(empty.id)
    assert finalized.status == "paid"
    assert finalized.paid is True
    assert finalized.amount_paid == 0
    assert finalized.status_transitions.paid_at is not None

    euro = client.v1.invoice_items.create(
        params={"customer": cus.id, "amount": 250, "currency": "eur"}
    )
    in_eur = client.v1.invoices.create(
        params={"customer": cus.id, "currency": "eur", "pending_invoice_items_behavior": "include"}
    )
    assert (in_eur.currency, in_eur.total) == ("eur", 250)
    assert [line.invoice_item for line in in_eur.lines.data] == [euro.id]

    included = client.v1.invoices.create(
        params={"customer": cus.id, "pending_invoice_items_behavior": "include"}
    )
    assert (included.currency, included.total) == ("usd", 400)
    assert client.v1.invoice_items.retrieve(item.id).invoice == included.id


def test_new_invoice_takes_no_pending_item_by_default_and_add_lines_is_strict(
    client: stripe.StripeClient,
) -> None:
    """Stripe's default since 2022-08-01 is pending_invoice_items_behavior=exclude: a later
    month's pending item never lands on an invoice unless attached explicitly."""
    cus = _customer(client)
    other = _customer(client)
    october = _item(client, cus.id, 400, metadata={"period": "2026-10"})
    november = _item(client, cus.id, 900, metadata={"period": "2026-11"})
    foreign = _item(client, other.id, 100)
    euro = client.v1.invoice_items.create(
        params={"customer": cus.id, "amount": 250, "currency": "eur"}
    )

    inv = client.v1.invoices.create(params={"customer": cus.id, "currency": "usd"})
    assert (inv.total, len(inv.lines.data)) == (0, 0)
    assert client.v1.invoice_items.retrieve(november.id).invoice is None

    def refused(item_id: str, invoice_id: str = inv.id) -> str:
        with pytest.raises(stripe.InvalidRequestError) as err:
            client.v1.invoices.add_lines(
                invoice_id,
                params={"lines": [{"invoice_item": october.id}, {"invoice_item": item_id}]},
            )
        return str(err.value.user_message)

    assert "another customer" in refused(foreign.id)
    assert "must match the invoice currency" in refused(euro.id)
    assert "No such invoiceitem" in refused("ii_missing")
    # All or nothing: the valid first line of each refused request was not attached.
    assert client.v1.invoice_items.retrieve(october.id).invoice is None

    added = client.v1.invoices.add_lines(inv.id, params={"lines": [{"invoice_item": october.id}]})
    assert (added.total, [line.invoice_item for line in added.lines.data]) == (400, [october.id])
    assert "already on invoice" in refused(november.id)  # october is on it now
    assert client.v1.invoice_items.retrieve(november.id).invoice is None

    client.v1.invoices.finalize_invoice(inv.id)
    with pytest.raises(stripe.InvalidRequestError, match="draft"):
        client.v1.invoices.add_lines(inv.id, params={"lines": [{"invoice_item": november.id}]})
    assert client.v1.invoices.retrieve(inv.id).amount_due == 400


def test_items_added_updated_and_deleted_on_a_draft_change_its_totals(
    client: stripe.StripeClient,
) -> None:
    cus = _customer(client)
    inv = _invoice(client, cus.id, 1000)
    extra = _item(client, cus.id, 250, invoice=inv.id)
    assert client.v1.invoices.retrieve(inv.id).total == 1250

    client.v1.invoice_items.update(extra.id, params={"amount": 300, "metadata": {"k": "v"}})
    refreshed = client.v1.invoices.retrieve(inv.id)
    assert refreshed.total == 1300
    assert refreshed.lines.data[1].metadata.to_dict() == {"k": "v"}

    deleted = client.v1.invoice_items.delete(extra.id)
    assert deleted.deleted is True
    assert client.v1.invoices.retrieve(inv.id).total == 1000

    first_item = client.v1.invoice_items.list(params={"invoice": inv.id}).data[0]
    client.v1.invoices.finalize_invoice(inv.id)
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.invoice_items.update(first_item.id, params={"amount": 1})
    assert excinfo.value.http_status == 400
    assert excinfo.value.code == "invoice_not_editable"


def test_finalize_then_pay_out_of_band(client: stripe.StripeClient) -> None:
    cus = _customer(client)
    inv = _invoice(client, cus.id, 1200, 800)

    opened = client.v1.invoices.finalize_invoice(inv.id)
    assert opened.status == "open"
    assert re.fullmatch(rf"{cus.invoice_prefix}-0001", opened.number)
    assert opened.status_transitions.finalized_at >= inv.created
    assert (opened.amount_due, opened.amount_paid, opened.paid) == (2000, 0, False)
    assert opened.hosted_invoice_url

    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.invoices.finalize_invoice(inv.id)
    assert excinfo.value.http_status == 400
    assert excinfo.value.json_body["error"]["type"] == "invalid_request_error"
    assert "already finalized" in excinfo.value.json_body["error"]["message"]

    paid = client.v1.invoices.pay(inv.id, params={"paid_out_of_band": True})
    assert paid.status == "paid"
    assert (paid.amount_paid, paid.amount_remaining, paid.paid) == (2000, 0, True)
    assert paid.paid_out_of_band is True
    assert paid.status_transitions.paid_at >= paid.status_transitions.finalized_at

    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.invoices.void_invoice(inv.id)
    assert excinfo.value.http_status == 400
    assert client.v1.invoices.retrieve(inv.id).status == "paid"

    second = client.v1.invoices.finalize_invoice(_invoice(client, cus.id, 10).id)
    assert second.number == f"{cus.invoice_prefix}-0002"


def test_void_and_mark_uncollectible_transitions(client: stripe.StripeClient) -> None:
    cus = _customer(client)
    to_void = _invoice(client, cus.id, 500)
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.void_invoice(to_void.id)  # drafts are deleted, not voided
    client.v1.invoices.finalize_invoice(to_void.id)
    voided = client.v1.invoices.void_invoice(to_void.id)
    assert voided.status == "void"
    assert voided.status_transitions.voided_at is not None
    for action in (client.v1.invoices.pay, client.v1.invoices.mark_uncollectible):
        with pytest.raises(stripe.InvalidRequestError) as excinfo:
            action(to_void.id)
        assert excinfo.value.http_status == 400
    assert client.v1.invoices.retrieve(to_void.id).status == "void"

    bad_debt = _invoice(client, cus.id, 900)
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.mark_uncollectible(bad_debt.id)
    client.v1.invoices.finalize_invoice(bad_debt.id)
    uncollectible = client.v1.invoices.mark_uncollectible(bad_debt.id)
    assert uncollectible.status == "uncollectible"
    assert uncollectible.status_transitions.marked_uncollectible_at is not None
    assert uncollectible.amount_remaining == 900
    recovered = client.v1.invoices.pay(bad_debt.id, params={"paid_out_of_band": True})
    assert (recovered.status, recovered.amount_paid) == ("paid", 900)


def test_pay_with_card_and_declined_card(client: stripe.StripeClient) -> None:
    cus = _customer(client)
    visa = client.v1.payment_methods.attach("pm_card_visa", params={"customer": cus.id})
    inv = _invoice(client, cus.id, 4200)
    paid = client.v1.invoices.pay(inv.id, params={"payment_method": visa.id})
    assert (paid.status, paid.amount_paid, paid.attempt_count) == ("paid", 4200, 1)
    assert paid.payment_intent.startswith("pi_")

    failing = client.v1.payment_methods.attach(
        "pm_card_chargeCustomerFail", params={"customer": cus.id}
    )
    declined = _invoice(client, cus.id, 1000)
    with pytest.raises(stripe.CardError) as excinfo:
        client.v1.invoices.pay(declined.id, params={"payment_method": failing.id})
    assert excinfo.value.http_status == 402
    assert excinfo.value.code == "card_declined"
    after = client.v1.invoices.retrieve(declined.id)
    assert (after.status, after.attempt_count, after.amount_paid) == ("open", 1, 0)


# ----------------------------------------------------------------------------- search and lists


def test_search_is_eventually_consistent(emulator: Emulator, client: stripe.StripeClient) -> None:
    """Like Stripe, new objects are not searchable at once (default lag 60 s, the documented
    bound); lists and retrieves are. The emulator clock moves instead of the test sleeping."""
    assert emulator.admin("GET", "health")["search_lag_seconds"] == 60
    org = f"lag-{_uid()}"
    query = {"query": f"metadata['org_id']:'{org}'"}
    cus = _customer(client, metadata={"org_id": org})
    inv = _invoice(client, cus.id, 100, metadata={"org_id": org})
    assert client.v1.customers.search(params=query).data == []
    assert client.v1.invoices.search(params=query).data == []
    assert [c.id for c in client.v1.customers.list(params={"email": cus.email}).data] == [cus.id]
    assert client.v1.customers.retrieve(cus.id).metadata["org_id"] == org
    assert [i.id for i in client.v1.invoices.list(params={"customer": cus.id}).data] == [inv.id]
    emulator.admin("POST", "clock/advance", seconds=58)
    assert client.v1.customers.search(params=query).data == []
    emulator.admin("POST", "clock/advance", seconds=3)
    assert [c.id for c in client.v1.customers.search(params=query).data] == [cus.id]
    assert [i.id for i in client.v1.invoices.search(params=query).data] == [inv.id]

    # search/flush indexes what is pending now; search/lag changes it for new objects.
    late = _customer(client, metadata={"org_id": org})
    assert [c.id for c in client.v1.customers.search(params=query).data] == [cus.id]
    assert emulator.admin("POST", "search/flush")["indexed"] == 1
    assert sorted(c.id for c in client.v1.customers.search(params=query).data) == sorted(
        [cus.id, late.id]
    )
    try:
        assert emulator.admin("POST", "search/lag", seconds=0)["search_lag_seconds"] == 0
        now = _customer(client, metadata={"org_id": org})
        assert now.id in {c.id for c in client.v1.customers.search(params=query).data}
    finally:
        emulator.admin("POST", "search/lag", seconds=60)


def test_customer_list_filters_created_and_email_newest_first(client: stripe.StripeClient) -> None:
    email = f"list-{_uid()}@example.com"
    made = [_customer(client, email=email) for _ in range(3)]
    newest_first = [c.id for c in reversed(made)]
    assert [c.id for c in client.v1.customers.list(params={"email": email}).data] == newest_first
    since = {"gte": made[0].created}
    page = client.v1.customers.list(params={"email": email, "created": since, "limit": 2})
    assert ([c.id for c in page.data], page.has_more) == (newest_first[:2], True)
    rest = client.v1.customers.list(
        params={"email": email, "limit": 2, "starting_after": page.data[-1].id}
    )
    assert ([c.id for c in rest.data], rest.has_more) == (newest_first[2:], False)
    future = {"gt": made[-1].created + 3600}
    assert client.v1.customers.list(params={"email": email, "created": future}).data == []
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.customers.list(params={"colour": "blue"})


def test_customer_search_by_metadata(emulator: Emulator, client: stripe.StripeClient) -> None:
    acme, globex = f"acme-{_uid()}", f"globex-{_uid()}"
    a1 = _customer(client, name="Acme One", metadata={"org_id": acme, "tier": "gold"})
    a2 = _customer(client, name="Acme Two", metadata={"org_id": acme})
    g1 = _customer(client, name="Globex", metadata={"org_id": globex})
    emulator.admin("POST", "search/flush")  # past the search lag

    result = client.v1.customers.search(params={"query": f"metadata['org_id']:'{acme}'"})
    assert result.object == "search_result"
    assert sorted(c.id for c in result.data) == sorted([a1.id, a2.id])
    assert (result.has_more, result.next_page) == (False, None)

    both = f"metadata['org_id']:'{acme}' AND metadata['tier']:'gold'"
    assert [c.id for c in client.v1.customers.search(params={"query": both}).data] == [a1.id]
    either = f"metadata['org_id']:'{acme}' OR metadata['org_id']:'{globex}'"
    found = client.v1.customers.search(params={"query": either}).data
    assert sorted(c.id for c in found) == sorted([a1.id, a2.id, g1.id])
    negated = f"metadata['org_id']:'{acme}' AND -name:'acme one'"
    assert [c.id for c in client.v1.customers.search(params={"query": negated}).data] == [a2.id]

    page1 = client.v1.customers.search(params={"query": either, "limit": 2})
    assert (len(page1.data), page1.has_more) == (2, True)
    page2 = client.v1.customers.search(
        params={"query": either, "limit": 2, "page": page1.next_page}
    )
    assert (len(page2.data), page2.has_more, page2.next_page) == (1, False, None)
    assert {c.id for c in page1.data} | {c.id for c in page2.data} == {a1.id, a2.id, g1.id}

    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.customers.search(params={"query": "favourite_colour:'blue'"})
    assert excinfo.value.http_status == 400


def test_invoice_search_by_customer_status_and_metadata(
    emulator: Emulator, client: stripe.StripeClient
) -> None:
    cus = _customer(client)
    run = f"run-{_uid()}"
    draft = _invoice(client, cus.id, 100, metadata={"run": run})
    opened = _invoice(client, cus.id, 2500, metadata={"run": run})
    client.v1.invoices.finalize_invoice(opened.id)
    emulator.admin("POST", "search/flush")  # past the search lag

    def ids(query: str) -> list[str]:
        return [inv.id for inv in client.v1.invoices.search(params={"query": query}).data]

    assert ids(f"customer:'{cus.id}' AND status:'open'") == [opened.id]
    assert sorted(ids(f"metadata['run']:'{run}'")) == sorted([draft.id, opened.id])
    assert ids(f"metadata['run']:'{run}' AND total>1000") == [opened.id]
    assert ids(f"metadata['run']:'{run}' AND status:'paid'") == []


def test_invoice_items_list_filters_and_pagination(client: stripe.StripeClient) -> None:
    cus = _customer(client)
    items = [_item(client, cus.id, amount) for amount in (100, 200, 300, 400, 500)]
    newest_first = [ii.id for ii in reversed(items)]

    page1 = client.v1.invoice_items.list(params={"customer": cus.id, "limit": 2})
    assert [ii.id for ii in page1.data] == newest_first[:2]
    assert page1.has_more is True
    page2 = client.v1.invoice_items.list(
        params={"customer": cus.id, "limit": 2, "starting_after": page1.data[-1].id}
    )
    assert [ii.id for ii in page2.data] == newest_first[2:4]
    page3 = client.v1.invoice_items.list(
        params={"customer": cus.id, "limit": 2, "starting_after": page2.data[-1].id}
    )
    assert ([ii.id for ii in page3.data], page3.has_more) == (newest_first[4:], False)
    back = client.v1.invoice_items.list(
        params={"customer": cus.id, "limit": 2, "ending_before": page3.data[0].id}
    )
    assert [ii.id for ii in back.data] == newest_first[2:4]
    auto = client.v1.invoice_items.list(params={"customer": cus.id, "limit": 2})
    assert [ii.id for ii in auto.auto_paging_iter()] == newest_first

    pending = client.v1.invoice_items.list(params={"customer": cus.id, "pending": True})
    assert len(pending.data) == 5
    inv = client.v1.invoices.create(
        params={"customer": cus.id, "pending_invoice_items_behavior": "include"}
    )
    assert inv.total == 1500
    assert client.v1.invoice_items.list(params={"customer": cus.id, "pending": True}).data == []
    attached = client.v1.invoice_items.list(params={"customer": cus.id, "pending": False})
    assert [ii.id for ii in attached.data] == newest_first
    assert len(client.v1.invoice_items.list(params={"invoice": inv.id, "limit": 10}).data) == 5


# ----------------------------------------------------------------------------- errors and process


def test_unknown_endpoints_and_auth_errors_are_stripe_json(
    emulator: Emulator, client: stripe.StripeClient
) -> None:
    for method in ("GET", "POST", "DELETE"):
        data = {"x": "1"} if method == "POST" else None
        status, headers, body = emulator.http(method, "/v1/definitely_not_here", data)
        assert status == 404
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["message"].startswith(
            f"Unrecognized request URL ({method}: /v1/definitely_not_here)."
        )
        assert headers["request-id"].startswith("req_")

    status, _, body = emulator.http("GET", "/v1/customers", key=None)
    assert status == 401
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("You did not provide an API key.")

    status, _, body = emulator.http("GET", "/v1/customers", key="sk_live_notallowed12345")
    assert status == 401
    status, _, body = emulator.http("GET", "/v1/customers", key="pk_test_publishablekey1234")
    assert status == 401
    assert body["error"]["message"].startswith("Invalid API Key provided: ")
    assert "publishablekey" not in body["error"]["message"]

    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.invoices.retrieve("in_doesnotexist")
    assert excinfo.value.http_status == 404
    assert excinfo.value.code == "resource_missing"


def test_internal_errors_are_api_error_json(tmp_path: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from billing_dev.stack import stripe_emulator as emulator_module

    async def boom(request: Any) -> Any:
        raise RuntimeError("kaboom")

    async def scenario() -> tuple[int, str, dict]:
        state = emulator_module.EmulatorState(tmp_path)
        app = emulator_module.build_app(state)
        app.router.add_get("/v1/_boom", boom)
        async with TestClient(TestServer(app)) as http:
            resp = await http.get("/v1/_boom", headers={"Authorization": f"Bearer {API_KEY}"})
            return resp.status, resp.content_type, await resp.json()

    status, content_type, body = asyncio.run(scenario())
    assert (status, content_type) == (500, "application/json")
    assert body["error"]["type"] == "api_error"
    assert "kaboom" not in body["error"]["message"]


def _listening_addresses(port: int) -> set[str]:
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:  # 0A = LISTEN
                addresses.add(address)
    return addresses


def test_binds_loopback_only_and_logs_without_secrets(
    emulator: Emulator, client: stripe.StripeClient
) -> None:
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs /proc/net/tcp")
    assert _listening_addresses(emulator.port) == {"0100007F"}  # 127.0.0.1
    _customer(client)
    emulator.http("GET", "/v1/definitely_not_here")
    client.v1.customers.search(params={"query": "metadata['secret']:'s3cr3t'"})
    log = emulator.log()
    assert re.search(r"POST /v1/customers 200 [\d.]+ms", log)
    assert re.search(r"GET /v1/definitely_not_here 404 ", log)
    assert API_KEY not in log
    assert "GET /v1/customers/search 200" in log
    assert "s3cr3t" not in log


def test_refuses_to_bind_all_interfaces(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "billing_dev.stack.stripe_emulator",
            "--host",
            "0.0.0.0",
            "--port",
            str(_free_port()),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "refusing to bind" in result.stderr


def test_state_survives_kill_9_and_restart(emulator: Emulator, client: stripe.StripeClient) -> None:
    email = f"durable-{_uid()}@example.com"
    key = f"durable-{_uid()}"
    cus = client.v1.customers.create(
        params={"email": email, "metadata": {"org_id": "durable"}},
        options={"idempotency_key": key},
    )
    inv = client.v1.invoices.finalize_invoice(_invoice(client, cus.id, 1234, -34).id)

    assert emulator.kill9() == -signal.SIGKILL
    assert (emulator.state_dir / "state.pickle").is_file()
    emulator.start()

    again = client.v1.customers.retrieve(cus.id)
    assert (again.email, again.metadata.to_dict()) == (email, {"org_id": "durable"})
    reloaded = client.v1.invoices.retrieve(inv.id)
    assert (reloaded.status, reloaded.number, reloaded.total) == ("open", inv.number, 1200)

    replay = client.v1.customers.create(
        params={"email": email, "metadata": {"org_id": "durable"}},
        options={"idempotency_key": key},
    )
    assert replay.id == cus.id
    assert _headers(replay)["idempotent-replayed"] == "true"
    assert [c.id for c in client.v1.customers.list(params={"email": email}).data] == [cus.id]
    with pytest.raises(stripe.IdempotencyError):
        client.v1.customers.create(params={"email": "x" + email}, options={"idempotency_key": key})

    assert client.v1.invoices.pay(inv.id, params={"paid_out_of_band": True}).status == "paid"
    assert list(emulator.state_dir.glob(".state-*.tmp")) == []


def test_sigterm_shuts_down_cleanly(tmp_path: Path) -> None:
    emu = Emulator(tmp_path, _free_port())
    emu.start()
    cus = emu.client().v1.customers.create(params={"email": "bye@example.com"})
    assert emu.terminate() == 0
    assert "shutting down" in emu.log()

    emu.start()  # the state written before SIGTERM is loaded again
    assert emu.client().v1.customers.retrieve(cus.id).email == "bye@example.com"
    assert emu.terminate() == 0


# ----------------------------------------------------------------------------- credit notes


def _error(excinfo: Any) -> dict[str, Any]:
    return excinfo.value.json_body["error"]


def test_credit_note_only_on_finalized_invoices_and_strict_params(
    client: stripe.StripeClient,
) -> None:
    cus = _customer(client)
    draft = _invoice(client, cus.id, 5000)
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.credit_notes.create(params={"invoice": draft.id, "amount": 100})
    assert excinfo.value.http_status == 400
    assert _error(excinfo)["type"] == "invalid_request_error"
    assert "'draft'" in _error(excinfo)["message"]

    inv = client.v1.invoices.finalize_invoice(draft.id)
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.credit_notes.create(params={"amount": 100})
    assert (_error(excinfo)["code"], _error(excinfo)["param"]) == ("parameter_missing", "invoice")
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.credit_notes.create(params={"invoice": inv.id, "amount": 100, "colour": "red"})
    assert (_error(excinfo)["code"], _error(excinfo)["param"]) == ("parameter_unknown", "colour")
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.credit_notes.create(params={"invoice": inv.id, "amount": 100, "reason": "oops"})
    assert _error(excinfo)["param"] == "reason"
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.credit_notes.create(params={"invoice": inv.id})
    assert "amount" in _error(excinfo)["message"]
    with pytest.raises(stripe.InvalidRequestError) as excinfo:  # more than amount_remaining
        client.v1.credit_notes.create(params={"invoice": inv.id, "amount": 5001})
    assert "5000" in _error(excinfo)["message"]
    with pytest.raises(stripe.InvalidRequestError) as excinfo:  # post-payment split on open
        client.v1.credit_notes.create(
            params={"invoice": inv.id, "amount": 100, "credit_amount": 100}
        )
    assert _error(excinfo)["param"] == "credit_amount"
    with pytest.raises(stripe.InvalidRequestError) as excinfo:  # amount != sum of lines
        client.v1.credit_notes.create(
            params={
                "invoice": inv.id,
                "amount": 99,
                "lines": [
                    {
                        "type": "custom_line_item",
                        "unit_amount": 50,
                        "quantity": 2,
                        "description": "x",
                    }
                ],
            }
        )
    assert _error(excinfo)["param"] == "amount"
    assert client.v1.credit_notes.list(params={"invoice": inv.id}).data == []
    assert client.v1.invoices.retrieve(inv.id).amount_due == 5000


def test_pre_payment_credit_note_reduces_amount_due_and_voids_back(
    client: stripe.StripeClient,
) -> None:
    cus = _customer(client)
    inv = client.v1.invoices.finalize_invoice(_invoice(client, cus.id, 3000, 2000).id)
    preview = client.v1.credit_notes.preview(params={"invoice": inv.id, "amount": 700})
    assert (preview.total, preview.type, preview.pre_payment_amount) == (700, "pre_payment", 700)
    assert client.v1.invoices.retrieve(inv.id).amount_due == 5000  # a preview changes nothing

    note = client.v1.credit_notes.create(
        params={
            "invoice": inv.id,
            "lines": [
                {
                    "type": "custom_line_item",
                    "unit_amount": 250,
                    "quantity": 3,
                    "description": "Correction for 2026-03: api_calls",
                },
            ],
            "reason": "order_change",
            "memo": "late events",
            "metadata": {"period": "2026-03"},
        },
        options={"idempotency_key": f"cn-{_uid()}"},
    )
    assert note.id.startswith("cn_") and note.object == "credit_note"
    assert (note.total, note.amount, note.subtotal, note.currency) == (750, 750, 750, "usd")
    assert (note.type, note.status, note.reason, note.memo) == (
        "pre_payment",
        "issued",
        "order_change",
        "late events",
    )
    assert (note.invoice, note.customer, note.metadata["period"]) == (inv.id, cus.id, "2026-03")
    assert note.number == f"{inv.number}-CN-01"
    assert [(li.type, li.amount, li.quantity) for li in note.lines.data] == [
        ("custom_line_item", 750, 3)
    ]
    after = client.v1.invoices.retrieve(inv.id)
    assert (after.total, after.amount_due, after.amount_remaining) == (5000, 4250, 4250)
    assert (after.pre_payment_credit_notes_amount, after.post_payment_credit_notes_amount) == (
        750,
        0,
    )
    assert client.v1.credit_notes.retrieve(note.id).total == 750
    assert [cn.id for cn in client.v1.credit_notes.list(params={"invoice": inv.id}).data] == [
        note.id
    ]
    with pytest.raises(stripe.InvalidRequestError) as excinfo:  # 4250 left to credit
        client.v1.credit_notes.create(params={"invoice": inv.id, "amount": 4251})
    assert "4250" in _error(excinfo)["message"]

    voided = client.v1.credit_notes.void_credit_note(note.id)
    assert (voided.status, voided.voided_at is not None) == ("void", True)
    assert client.v1.invoices.retrieve(inv.id).amount_due == 5000
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.credit_notes.void_credit_note(note.id)

    full = client.v1.credit_notes.create(params={"invoice": inv.id, "amount": 5000})
    assert full.number == f"{inv.number}-CN-02"
    paid = client.v1.invoices.retrieve(inv.id)  # fully credited: Stripe marks it paid
    assert (paid.status, paid.amount_due, paid.amount_paid, paid.amount_remaining) == (
        "paid",
        0,
        0,
        0,
    )


def test_post_payment_credit_note_needs_the_split_to_add_up(client: stripe.StripeClient) -> None:
    cus = _customer(client)
    inv = client.v1.invoices.finalize_invoice(_invoice(client, cus.id, 4000).id)
    client.v1.invoices.pay(inv.id, params={"paid_out_of_band": True})
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.credit_notes.create(params={"invoice": inv.id, "amount": 1000})
    assert "must equal the credit note total (1000)" in _error(excinfo)["message"]
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.credit_notes.create(
            params={
                "invoice": inv.id,
                "amount": 1000,
                "credit_amount": 600,
                "out_of_band_amount": 300,
            }
        )
    assert "(900)" in _error(excinfo)["message"]
    note = client.v1.credit_notes.create(
        params={"invoice": inv.id, "amount": 1000, "credit_amount": 600, "out_of_band_amount": 400}
    )
    assert (note.type, note.post_payment_amount, note.pre_payment_amount) == (
        "post_payment",
        1000,
        0,
    )
    assert note.out_of_band_amount == 400
    after = client.v1.invoices.retrieve(inv.id)
    assert (after.status, after.amount_paid, after.post_payment_credit_notes_amount) == (
        "paid",
        4000,
        1000,
    )
    with pytest.raises(stripe.InvalidRequestError) as excinfo:  # 3000 left
        client.v1.credit_notes.create(
            params={"invoice": inv.id, "amount": 3001, "out_of_band_amount": 3001}
        )
    assert "(3000)" in _error(excinfo)["message"]


def test_credit_note_idempotency(client: stripe.StripeClient) -> None:
    cus = _customer(client)
    inv = client.v1.invoices.finalize_invoice(_invoice(client, cus.id, 2500).id)
    key = f"cn-idem-{_uid()}"
    first = client.v1.credit_notes.create(
        params={"invoice": inv.id, "amount": 300}, options={"idempotency_key": key}
    )
    again = client.v1.credit_notes.create(
        params={"invoice": inv.id, "amount": 300}, options={"idempotency_key": key}
    )
    assert again.id == first.id
    assert _headers(again)["idempotent-replayed"] == "true"
    with pytest.raises(stripe.IdempotencyError) as excinfo:
        client.v1.credit_notes.create(
            params={"invoice": inv.id, "amount": 301}, options={"idempotency_key": key}
        )
    assert _error(excinfo)["type"] == "idempotency_error"
    assert len(client.v1.credit_notes.list(params={"invoice": inv.id}).data) == 1
    assert client.v1.invoices.retrieve(inv.id).amount_due == 2200
