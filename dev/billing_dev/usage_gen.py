"""Synthetic, deterministic usage files for demos, tests and benchmarks.

The same seed, day and sizes always give the same bytes. On request the files carry
duplicates, late events and malformed lines, so every path of ingestion is exercised.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import random
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from billing.orgs import Org

_NAMES = [
    "Acme Analytics",
    "Zürich Datenwerk GmbH",
    "東京データ株式会社",
    "Globex",
    "Initech",
    "Umbrella Labs",
    "Ñandú Software",
    "Stark Industries",
    "Wayne Data",
    "Hooli",
]
_SOURCES = {
    "api_calls": "api-gateway",
    "storage_gb": "storage-svc",
    "compute_minutes": "scheduler",
    "emails_sent": "mailer",
}
_BAD_KINDS = (
    "malformed_json",
    "missing_field",
    "negative_quantity",
    "bad_timestamp",
    "unknown_metric",
    "unknown_org",
    "bad_type",
    "non_finite_quantity",
)


def org_id(i: int) -> str:
    return f"org-{i:04d}"


def demo_orgs(n: int, catalog) -> list[Org]:
    plans = sorted(catalog.plans)
    out = []
    for i in range(1, n + 1):
        plan = catalog.plans[plans[(i - 1) % len(plans)]]
        name = _NAMES[(i - 1) % len(_NAMES)] + ("" if i <= len(_NAMES) else f" {i}")
        out.append(
            Org(org_id(i), name, f"billing+{org_id(i)}@example.test", plan.name, plan.currency)
        )
    return out


@dataclass(frozen=True)
class UsageSpec:
    day: dt.date
    orgs: int
    events: int
    seed: int = 0
    bad_ratio: float = 0.0
    dup_ratio: float = 0.0
    late_ratio: float = 0.0
    late_days: int = 3


def _quantity(rng: random.Random, metric: str) -> int | float:
    if metric == "ai_tokens":
        return rng.randint(100, 20_000)
    if metric == "active_users":
        return 1
    if metric == "storage_gb":
        return rng.randint(1, 5000) / 100  # two decimals; parsed as Decimal from the JSON text
    if metric == "compute_minutes":
        return rng.randint(1, 120)
    return rng.randint(1, 400)


def _properties(rng: random.Random, metric: str) -> dict | None:
    """The event properties the catalog's dimensioned and unique_count metrics read."""
    if metric == "ai_tokens":  # dimensions: model, token_type
        return {
            "model": rng.choice(("small", "large")),
            "token_type": rng.choice(("input", "output")),
        }
    if metric == "active_users":  # unique_count of user_id
        return {"user_id": f"user-{rng.randint(1, 40):02d}"}
    return None


def events(spec: UsageSpec, metrics: Sequence[str]) -> Iterator[str]:
    """Yield JSON lines (without newline) for one arrival day."""
    rng = random.Random(f"{spec.seed}:{spec.day.isoformat()}")
    ns = uuid.UUID(int=spec.seed)
    start = dt.datetime.combine(spec.day, dt.time(), tzinfo=dt.UTC)
    recent: list[str] = []
    for i in range(spec.events):
        r = rng.random()
        if recent and r < spec.dup_ratio:
            yield rng.choice(recent)
            continue
        if r < spec.dup_ratio + spec.bad_ratio:
            yield _bad_line(rng, i, spec, metrics, start)
            continue
        metric = metrics[i % len(metrics)] if rng.random() < 0.3 else rng.choice(metrics)
        occurred = start + dt.timedelta(seconds=rng.randrange(86_400))
        if rng.random() < spec.late_ratio:
            occurred -= dt.timedelta(days=rng.randint(1, spec.late_days))
        event = {
            "event_id": str(uuid.uuid5(ns, f"{spec.day}:{i}")),
            "org_id": org_id(rng.randint(1, spec.orgs)),
            "metric": metric,
            "quantity": _quantity(rng, metric),
            "occurred_at": occurred.isoformat().replace("+00:00", "Z"),
            "billable": rng.random() >= 0.03,
            "source": _SOURCES.get(metric, "backend"),
        }
        if props := _properties(rng, metric):
            event["properties"] = props
        line = json.dumps(event, separators=(",", ":"))
        if len(recent) < 1000:
            recent.append(line)
        else:
            recent[rng.randrange(1000)] = line
        yield line


def _bad_line(
    rng: random.Random, i: int, spec: UsageSpec, metrics: Sequence[str], start: dt.datetime
) -> str:
    kind = _BAD_KINDS[i % len(_BAD_KINDS)]
    base = {
        "event_id": f"bad-{spec.seed}-{spec.day}-{i}",
        "org_id": org_id(rng.randint(1, spec.orgs)),
        "metric": rng.choice(metrics),
        "quantity": 1,
        "occurred_at": (start + dt.timedelta(seconds=rng.randrange(86_400))).isoformat(),
    }
    if kind == "malformed_json":
        return json.dumps(base)[:-7]
    if kind == "missing_field":
        base.pop("org_id")
    elif kind == "negative_quantity":
        base["quantity"] = -5
    elif kind == "bad_timestamp":
        base["occurred_at"] = "yesterday at noon"
    elif kind == "unknown_metric":
        base["metric"] = "teleportations"
    elif kind == "unknown_org":
        base["org_id"] = "org-unknown"
    elif kind == "bad_type":
        base["quantity"] = "lots"
    elif kind == "non_finite_quantity":
        return json.dumps(base).replace('"quantity": 1', '"quantity": NaN')
    return json.dumps(base)


def write_day(
    spec: UsageSpec,
    metrics: Sequence[str],
    landing_uri: str,
    files: int = 1,
    compress: bool = False,
) -> list[str]:
    """Write the day's events into ``<landing>/usage/dt=DAY/`` and return the file URIs."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(landing_uri.rstrip("/") + f"/usage/dt={spec.day.isoformat()}")
    fs.makedirs(root, exist_ok=True)
    lines = list(events(spec, metrics)) if files > 1 else None
    written = []
    for part in range(files):
        name = f"part-{spec.seed:04d}-{part:04d}.jsonl" + (".gz" if compress else "")
        final, tmp = f"{root}/{name}", f"{root}/.{name}.tmp"
        chunk = lines[part::files] if lines is not None else events(spec, metrics)
        with fs.open(tmp, "wb") as raw:
            out = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if compress else raw
            for line in chunk:
                out.write(line.encode() + b"\n")
            if compress:
                out.close()
        fs.mv(tmp, final)
        written.append(final)
    return written
