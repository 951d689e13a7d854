"""Reading a CSV file a person wrote (``billing orgs import``, ``billing subscriptions
import``): a header naming the columns, UTF-8, every problem one line naming the file."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from billing.platform.errors import ConfigError


def read(path: Path, columns: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """``(where, values)`` per data line: ``where`` is ``path:line``, ``values`` the line's
    ``columns`` stripped ('' when empty). Header names are stripped; other columns are
    ignored. A file that cannot be read, lacks a column or is not CSV: :class:`ConfigError`."""
    try:
        fh = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    with fh:
        reader = csv.DictReader(fh)
        try:
            header = [h.strip() for h in (reader.fieldnames or ())]
            missing = [c for c in columns if c not in header]
            if missing:
                raise ConfigError(
                    f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(columns)}"
                )
            reader.fieldnames = header
            return [
                (f"{path}:{lineno}", tuple((row.get(c) or "").strip() for c in columns))
                for lineno, row in enumerate(reader, start=2)
            ]
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}:{reader.line_num}: unreadable CSV: {exc}") from None
