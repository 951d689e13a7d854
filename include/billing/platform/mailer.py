"""Outgoing email through the ``billing_smtp`` connection (a real SMTP server, or the sink)."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from email.utils import make_msgid

from billing.platform import connections as conns


def addresses() -> dict[str, str]:
    """Sender and the team addresses configured on the SMTP connection's extra."""
    extra = conns.get(conns.SMTP).extra
    return {
        "from": extra.get("from_email", "billing@example.test"),
        "finance": extra.get("finance_email", "finance@example.test"),
        "engineering": extra.get("engineering_email", "oncall@example.test"),
    }


def build(
    to: str | list[str],
    subject: str,
    text: str,
    html: str | None = None,
    message_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = addresses()["from"]
    msg["To"] = to if isinstance(to, str) else ", ".join(to)
    msg["Subject"] = subject
    msg["Message-ID"] = message_id or make_msgid(domain="billing.local")
    for key, value in (headers or {}).items():
        msg[key] = value
    msg.set_content(text)
    if html:
        msg.add_alternative(html, subtype="html")
    return msg


def send(msg: EmailMessage) -> str:
    """Deliver ``msg``; returns its Message-ID. Credentials come only from the connection."""
    c = conns.get(conns.SMTP)
    use_ssl = not _flag(c.extra.get("disable_ssl", True))
    use_tls = not _flag(c.extra.get("disable_tls", True))
    cls = smtplib.SMTP_SSL if use_ssl else smtplib.SMTP
    with cls(c.host or "127.0.0.1", c.port or (465 if use_ssl else 25), timeout=30) as smtp:
        if use_tls and not use_ssl:
            smtp.starttls()
        if c.login:
            smtp.login(c.login, c.password or "")
        smtp.send_message(msg)
    return msg["Message-ID"]


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
