"""A real SMTP server that refuses one recipient (aiosmtpd), and pointing billing_smtp at it."""

from __future__ import annotations

import dataclasses
import email
import socket


class RefusingHandler:
    """An SMTP server that refuses one recipient and keeps what it accepts."""

    def __init__(self, refuse: str):
        self.refuse, self.received = refuse, []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if address == self.refuse:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.received.append(email.message_from_bytes(envelope.original_content))
        return "250 Message accepted for delivery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def point_smtp_at(monkeypatch, port: int) -> None:
    from billing.platform import connections as conns

    c = dataclasses.replace(conns.get(conns.SMTP), port=port)
    monkeypatch.setenv(conns.env_var(conns.SMTP), c.to_json())
