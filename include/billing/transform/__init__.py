"""Transform: the dbt project (invoice snapshot in Postgres, usage rollups in ClickHouse).

Playbook "Invoice lifecycle: internal snapshot" and "Usage metering: rollups". dbt runs in a
child process (``python -m billing.transform``); the DAG's Cosmos task groups come from
:func:`dbt_task_group`, the readers' snapshot from :func:`publish_snapshot`.

* ``project``: catalog check, dbt runs per target, manifests and docs, Cosmos task groups,
  the atomic snapshot publish.
"""

from __future__ import annotations

from billing.transform.project import (
    TARGETS,
    TransformError,
    dbt_env,
    dbt_task_group,
    docs_generate,
    docs_serve_argv,
    parse,
    prepare,
    publish_snapshot,
    published_seq,
    sync_catalog,
    transform_day,
)

__all__ = [
    "TARGETS",
    "TransformError",
    "dbt_env",
    "dbt_task_group",
    "docs_generate",
    "docs_serve_argv",
    "parse",
    "prepare",
    "publish_snapshot",
    "published_seq",
    "sync_catalog",
    "transform_day",
]
