"""SMTP sink for the embedded stack: every message becomes an ``.eml`` file.

Run as ``python -m billing_dev.stack.smtp_sink --port P --maildir DIR``. Files are written
atomically (temp file, then rename) so a reader never sees half a message.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
import uuid
from pathlib import Path

from aiosmtpd.controller import Controller


class MaildirHandler:
    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir
        maildir.mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd hook name
        name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.eml"
        tmp = self.maildir / f".{name}.tmp"
        header = (
            f"X-Sink-Mail-From: {envelope.mail_from}\r\n"
            f"X-Sink-Rcpt-To: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode()
        with open(tmp, "wb") as fh:
            fh.write(header + envelope.original_content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.maildir / name)
        return "250 Message accepted for delivery"


def serve(host: str, port: int, maildir: Path) -> None:
    controller = Controller(MaildirHandler(maildir), hostname=host, port=port)
    controller.start()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        loop.run_until_complete(stop.wait())
    finally:
        controller.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--maildir", type=Path, required=True)
    args = p.parse_args(argv)
    serve(args.host, args.port, args.maildir)


if __name__ == "__main__":
    main()
