"""Organisations: the customers we bill. Imported from CSV, upserted by org_id; their plans
over time are billing.subscriptions."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from billing.platform import csvfile
from billing.platform.errors import ConfigError

COLUMNS = ("org_id", "name", "email", "plan", "currency")
#: an org id (billing.organizations CHECK): the one pattern the CLI, imports and routes use
ORG_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
_ORG_ID = re.compile(ORG_ID_PATTERN)
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")


@dataclass(frozen=True)
class Org:
    org_id: str
    name: str
    email: str
    plan: str
    currency: str


def parse_csv(path: Path, catalog) -> list[Org]:
    """Validate the whole file first, so a bad row writes nothing."""
    orgs: dict[str, Org] = {}
    for where, values in csvfile.read(path, COLUMNS):
        org = Org(*values)
        org = Org(org.org_id, org.name, org.email, org.plan, org.currency.lower())
        _validate(org, catalog, where)
        orgs[org.org_id] = org
    return list(orgs.values())


def _validate(org: Org, catalog, where: str) -> None:
    if not _ORG_ID.match(org.org_id):
        raise ConfigError(f"{where}: org_id {org.org_id!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    if not org.name or len(org.name) > 200:
        raise ConfigError(f"{where}: name must be 1-200 characters")
    if not _EMAIL.match(org.email):
        raise ConfigError(f"{where}: email {org.email!r} is not an address")
    if org.plan not in catalog.plans:
        raise ConfigError(
            f"{where}: plan {org.plan!r} is not in the catalog ({', '.join(sorted(catalog.plans))})"
        )
    plan_currency = catalog.plans[org.plan].currency
    if org.currency != plan_currency:
        raise ConfigError(
            f"{where}: currency {org.currency!r} does not match plan {org.plan!r} currency {plan_currency!r}"
        )


def upsert(cx, orgs: Sequence[Org], actor: str | None = None) -> int:
    """Insert new orgs (each starts on its plan, since always: a trigger creates the first
    subscription) and update name, email and currency of known ones. The plan of a known org
    is not changed here: an org whose CSV plan differs from its latest subscription's refuses
    the whole file (plan changes keep their history: ``billing subscriptions change``).
    ``actor`` (e.g. ``cli:<login>``) is who the first subscriptions' change rows name."""
    if not orgs:
        return 0
    if actor:
        cx.execute("SELECT set_config('billing.actor', %s, true)", (actor,))
    latest = dict(
        cx.execute(
            """SELECT DISTINCT ON (org_id) org_id, plan FROM billing.subscriptions
                WHERE org_id = ANY(%s) ORDER BY org_id, starts_at DESC""",
            ([o.org_id for o in orgs],),
        ).fetchall()
    )
    for o in sorted(orgs, key=lambda o: o.org_id):
        if o.org_id in latest and latest[o.org_id] != o.plan:
            raise ConfigError(
                f"org {o.org_id!r} is on plan {latest[o.org_id]!r}; plan changes go through "
                "'billing subscriptions change' (history is kept)"
            )
    with cx.cursor() as cur:
        cur.executemany(
            """INSERT INTO billing.organizations (org_id, name, email, plan, currency)
               VALUES (%s, %s, %s, %s, %s)
               ON CONFLICT (org_id) DO UPDATE SET
                 name = EXCLUDED.name, email = EXCLUDED.email,
                 currency = EXCLUDED.currency, updated_at = now()
               WHERE (organizations.name, organizations.email, organizations.currency)
                     IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.email, EXCLUDED.currency)""",
            [(o.org_id, o.name, o.email, o.plan, o.currency) for o in orgs],
        )
    return len(orgs)


def write_csv(path: Path, orgs: Iterable[Org]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for o in orgs:
            w.writerow([o.org_id, o.name, o.email, o.plan, o.currency])
    return path
