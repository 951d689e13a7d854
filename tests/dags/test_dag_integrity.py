"""Every DAG imports fast and cleanly, and follows the house policy."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

DAGS_DIR = Path(__file__).resolve().parents[2] / "dags"
DAG_FILES = sorted(p for p in DAGS_DIR.glob("*.py") if not p.name.startswith("_"))


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_DIR))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert len(dagbag.dags) >= len(DAG_FILES)


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_file_name_is_dag_id(dagbag, path):
    assert path.stem in dagbag.dags


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_parses_fast_without_db_or_network(path, tmp_path):
    """Parse each file in a fresh interpreter with connections pointing nowhere."""
    code = (
        "import time, runpy, airflow.sdk\n"
        "t = time.perf_counter()\n"
        f"runpy.run_path({str(path)!r})\n"
        "print(time.perf_counter() - t)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env["AIRFLOW_CONN_BILLING_POSTGRES"] = "postgres://nobody:x@192.0.2.1:1/none"
    env["BILLING_LOCAL_DIR"] = str(tmp_path)
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    parse_seconds = float(out.stdout.strip().splitlines()[-1])
    assert parse_seconds < 1.0, f"{path.name} took {parse_seconds:.2f}s to parse"
    assert time.perf_counter() - start < 60


def test_policy(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert "billing" in dag.tags
        assert dag.doc_md and "Triage notes" in dag.doc_md, (
            f"{dag_id} needs doc_md with Triage notes"
        )
        for t in dag.tasks:
            assert t.owner == "platform", f"{dag_id}.{t.task_id} owner"
            assert t.retries >= 2, f"{dag_id}.{t.task_id} retries"
            assert t.on_failure_callback, f"{dag_id}.{t.task_id} needs a failure alert"


def test_no_logic_or_cross_imports_in_dag_files():
    for path in DAG_FILES:
        text = path.read_text()
        assert "from dags" not in text and "import dags" not in text, path.name
        assert len(text.splitlines()) <= 150, f"{path.name} is not thin"
