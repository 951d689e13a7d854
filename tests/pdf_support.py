"""Reading invoice PDFs in tests the way a person reads them."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def pdf_text(pdf: bytes, tmp_path) -> str:
    """The PDF's text as a reader sees it (poppler's pdftotext, installed by make test)."""

    if not shutil.which("pdftotext"):
        if os.environ.get("CI"):
            pytest.fail("pdftotext missing: scripts/install-system-deps.sh installs poppler-utils")
        pytest.skip("pdftotext not installed (apt-get install poppler-utils)")
    path = tmp_path / "invoice.pdf"
    path.write_bytes(pdf)
    return subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, check=True
    ).stdout
