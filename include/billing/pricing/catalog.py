"""The pricing catalog and the exact money rules.

Pure Python: no database, no Airflow. The dbt models, the Stripe sync and the invoice
PDFs all mirror these rules, so they are stated once here and documented in
``docs/PRICING.md``.

Money rules, in one paragraph: the billing period is the calendar month in UTC. For an
org, a metric and day ``d`` of the period, ``Q(d)`` is the cumulative quantity from the
start of the month through the end of ``d`` and ``A(q)`` the exact Decimal price of a
quantity ``q`` (:func:`price`). The cumulative charge is
``C(d) = round_half_up(A(Q(d)) in minor units)`` and the day's charge is
``C(d) - C(d-1)`` with ``C(0) = 0``; the daily charges telescope to ``C(last day)``.
An invoice is the base fee plus, for each metric, ``C(last day)``, in integer minor units.

No float is ever used: prices are parsed from quoted decimal strings and all arithmetic runs
in a local Decimal context of 50 digits that traps inexact results, so a result that would
need rounding (other than the one deliberate ROUND_HALF_UP into minor units) raises instead
of being silently wrong.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import (
    ROUND_HALF_UP,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
    localcontext,
)
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from billing.platform import settings
from billing.platform.errors import ConfigError
from billing.pricing.aggregation import AGGREGATIONS, SUM, UNIQUE_COUNT
from billing.pricing.aggregation import dimension_key as price_key

__all__ = [
    "AMOUNT_MAX_MINOR",
    "CURRENCIES",
    "MODES",
    "MONTHLY_QUANTITY_MAX",
    "QUANTITY_DECIMALS",
    "QUANTITY_MAX",
    "Catalog",
    "Metric",
    "MetricPrice",
    "Plan",
    "Tier",
    "catalog_tables",
    "catalog_version",
    "charges",
    "MINIMUM_COMMITMENT",
    "MINIMUM_SPEND",
    "charge_label",
    "cumulative_charges",
    "daily_charges",
    "format_money",
    "invoice_total",
    "load_catalog",
    "minor_exponent",
    "parse_catalog",
    "price",
    "price_key",
    "to_minor",
    "true_up_label",
]

#: Supported currencies (lower-case ISO 4217, as Stripe spells them) -> minor-unit exponent.
CURRENCIES: Mapping[str, int] = MappingProxyType(
    {"usd": 2, "eur": 2, "gbp": 2, "cad": 2, "aud": 2, "chf": 2, "jpy": 0, "krw": 0}
)

_SYMBOLS: Mapping[str, str] = MappingProxyType(
    {
        "usd": "$",
        "eur": "€",
        "gbp": "£",
        "cad": "CA$",
        "aud": "A$",
        "chf": "CHF ",
        "jpy": "¥",
        "krw": "₩",
    }
)

GRADUATED = "graduated"
VOLUME = "volume"
PACKAGE = "package"
TIERED_PACKAGE = "tiered_package"
MODES = (GRADUATED, VOLUME, PACKAGE, TIERED_PACKAGE)
# How a package (tiered_package: a block) that is only started is counted, as Stripe's
# transform_quantity[round]: up charges it in full, down charges complete ones only.
ROUND_UP = "up"
ROUND_DOWN = "down"
ROUNDINGS = (ROUND_UP, ROUND_DOWN)
# The keys only package and tiered_package take (docs/PRICING.md "Package options").
_PACKAGE_OPTIONS = frozenset({"rounding", "free_units"})

_ZERO = Decimal(0)
_ONE = Decimal(1)

# Exact arithmetic: 50 significant digits and any rounding is an error (Inexact is trapped).
_EXACT = Context(
    prec=50,
    rounding=ROUND_HALF_UP,
    traps=[InvalidOperation, DivisionByZero, Overflow, Inexact],
)
# The one deliberate rounding: exact amount -> integer minor units, ROUND_HALF_UP.
_ROUNDING = Context(
    prec=50,
    rounding=ROUND_HALF_UP,
    traps=[InvalidOperation, DivisionByZero, Overflow],
)

# The quantity range (docs/USAGE_EVENTS.md "Quantity range", docs/PRICING.md "Range").
# One event: 0 <= quantity <= QUANTITY_MAX with at most QUANTITY_DECIMALS decimal places, so
# every event fits Decimal(18, 9) exactly (ClickHouse reads Postgres numeric as Decimal(38, 19):
# more decimals would be cut there, and a sum past 10^19 wraps). Ingest quarantines anything
# else as quantity_out_of_range. One org's month of one metric: every plan must price
# MONTHLY_QUANTITY_MAX units (1,000 maximal events) at no more than AMOUNT_MAX_MINOR minor
# units, so a base fee plus 90 such lines stays inside the bigint of the invoice snapshot.
QUANTITY_MAX = Decimal(10**9)
QUANTITY_DECIMALS = 9
MONTHLY_QUANTITY_MAX = Decimal(10**12)
AMOUNT_MAX_MINOR = 10**17

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# An event property a metric reads (``properties ->> name``): a JSON key without surprises.
_PROPERTY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,62}$")
_MAX_DIMENSIONS = 5
_PLAIN_DECIMAL_RE = re.compile(r"^[0-9]+(\.[0-9]+)?$")


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Tier:
    """One price tier. ``up_to`` is inclusive; ``None`` means no upper limit.

    ``flat_amount`` (Stripe's ``flat_amount``, Lago's and OpenMeter's flat fee) is charged
    once when the month's quantity reaches into the tier: graduated, every tier reached;
    volume, the one tier the quantity falls in. A quantity of 0 reaches no tier."""

    up_to: Decimal | None
    unit_price: Decimal
    flat_amount: Decimal = Decimal(0)
    #: tiered_package only: the tier's units are counted in blocks of ``block_size`` units,
    #: each charged ``block_price`` (``unit_price`` and ``flat_amount`` are then 0)
    block_size: Decimal | None = None
    block_price: Decimal | None = None


@dataclass(frozen=True)
class MetricPrice:
    """How a plan prices one metric: ``graduated`` / ``volume`` tiers, ``package`` or
    ``tiered_package`` (tiers of blocks)."""

    metric: str
    mode: str
    tiers: tuple[Tier, ...] = ()
    package_size: Decimal | None = None
    package_price: Decimal | None = None
    #: package and tiered_package: ``up`` charges a started package (block) in full,
    #: ``down`` only complete ones
    rounding: str = ROUND_UP
    #: package and tiered_package: units of the month subtracted before packaging
    free_units: Decimal = Decimal(0)
    #: any mode: the most a month of the metric costs, ``min(A(q), max_spend)``; None: no cap
    max_spend: Decimal | None = None
    #: any mode, metrics without dimensions: the least the period of the metric costs; the
    #: shortfall is a true-up line once the period is over (docs/PRICING.md "Minimum spend")
    min_spend: Decimal | None = None


@dataclass(frozen=True)
class Plan:
    name: str
    currency: str
    base_fee: Decimal
    metrics: Mapping[str, MetricPrice] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    #: the least the period's usage costs in total (after each metric's min_spend); the
    #: shortfall is a true-up line once the period is over (docs/PRICING.md "Minimum spend")
    minimum_commitment: Decimal | None = None
    #: metric -> price key (:func:`price_key`) -> the price of that combination of dimension
    #: values; ``metrics[metric]`` is the default for the combinations not listed
    values: Mapping[str, Mapping[str, MetricPrice]] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )

    def price_for(self, metric: str, key: str = "") -> MetricPrice | None:
        """The plan's price for ``metric`` (and the dimension values of ``key``), or None:
        usage of an unpriced metric costs 0. A listed combination of values has its own
        price; any other combination the metric's default."""
        listed = self.values.get(metric, {}).get(key) if key else None
        return listed if listed is not None else self.metrics.get(metric)

    @property
    def base_fee_minor(self) -> int:
        return to_minor(self.base_fee, self.currency)


@dataclass(frozen=True)
class Metric:
    """A metered metric. ``aggregation`` turns its events into the priced quantity
    (:mod:`billing.pricing.aggregation`); ``property`` names the event property that
    ``unique_count`` counts distinct values of."""

    name: str
    unit: str
    description: str
    aggregation: str = SUM
    property: str | None = None
    #: event properties whose values price and invoice the metric separately (docs/PRICING.md
    #: "Dimensions"); () for none
    dimensions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Catalog:
    metrics: Mapping[str, Metric] = field(hash=False)
    plans: Mapping[str, Plan] = field(hash=False)
    #: the UTC day its prices take effect (docs/SUBSCRIPTIONS.md "Catalog versions"); None:
    #: from the first day no closed period covers
    effective_from: dt.date | None = None

    def plan(self, name: str) -> Plan:
        try:
            return self.plans[name]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self.plans)) or "none"
            raise ConfigError(f"unknown plan {name!r} (catalog plans: {known})") from None


#: invoice line types of the true-ups (docs/PRICING.md "Minimum spend and commitment")
MINIMUM_SPEND = "minimum_spend"
MINIMUM_COMMITMENT = "minimum_commitment"


#: charge labels that are not a metric's (base fee adjustments, true-ups, prepaid credits):
#: no metric may take these names
RESERVED_LABELS = frozenset({"base_fee", MINIMUM_SPEND, MINIMUM_COMMITMENT, "credit"})


def is_metric_label(label: str) -> bool:
    """Whether a charge label (``billing.stripe_outbox.metric``) is a metric's usage: not
    ``base_fee``, a true-up (``minimum_spend.<metric>``, ``minimum_commitment``) or a credit,
    with or without a segment's `` from YYYY-MM-DD``."""
    head = label.split(" ", 1)[0]
    return head.split(".", 1)[0] not in RESERVED_LABELS


def true_up_label(line_type: str, metric: str | None = None) -> str:
    """A true-up's charge label: ``minimum_spend.api_calls`` or ``minimum_commitment``."""
    return f"{line_type}.{metric}" if metric else line_type


def charge_label(metric: str, key: str) -> str:
    """One priced charge: the metric, plus its dimension key when it has one. It names the
    Stripe items (metadata ``metric``) and the reconciliation's lines."""
    return f"{metric} {key}" if key else metric


# --------------------------------------------------------------------------- money


def minor_exponent(currency: str) -> int:
    """Number of decimal places of the currency's minor unit (2 for usd, 0 for jpy)."""
    try:
        return CURRENCIES[currency.lower()]
    except (KeyError, AttributeError):
        supported = ", ".join(CURRENCIES)
        raise ConfigError(f"unsupported currency {currency!r} (supported: {supported})") from None


def to_minor(amount: Decimal, currency: str) -> int:
    """Exact major-unit amount -> integer minor units, ROUND_HALF_UP (half away from zero)."""
    amount = _as_decimal(amount, "amount")
    exponent = minor_exponent(currency)
    with localcontext(_ROUNDING):
        scaled = amount.scaleb(exponent)
        return int(scaled.quantize(_ONE, rounding=ROUND_HALF_UP))


def format_money(minor: int, currency: str) -> str:
    """``123450, "usd"`` -> ``"$1,234.50"``; ``1200, "jpy"`` -> ``"¥1,200"``."""
    if isinstance(minor, bool) or not isinstance(minor, int):
        raise TypeError(f"minor units must be an int, got {type(minor).__name__}")
    exponent = minor_exponent(currency)
    symbol = _SYMBOLS[currency.lower()]
    sign = "-" if minor < 0 else ""
    major, frac = divmod(abs(minor), 10**exponent)
    text = f"{major:,}"
    if exponent:
        text += f".{frac:0{exponent}d}"
    return f"{sign}{symbol}{text}"


def _as_decimal(value: Any, what: str) -> Decimal:
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int) and not isinstance(value, bool):
        result = Decimal(value)
    else:
        raise TypeError(f"{what} must be a Decimal (never a float), got {type(value).__name__}")
    if not result.is_finite():
        raise ValueError(f"{what} must be finite, got {result}")
    return result


def _quantity(value: Any) -> Decimal:
    q = _as_decimal(value, "quantity")
    if q < 0:
        raise ValueError(f"quantity must not be negative, got {q}")
    return q


def price(mp: MetricPrice | None, quantity: Decimal) -> Decimal:
    """The exact price ``A(q)`` of a month's cumulative ``quantity``, in major units.

    ``mp=None`` (a metric the plan does not price) costs 0. A ``max_spend`` caps the
    amount: ``min(A(q), max_spend)``; it is a cap on the cumulative amount, so the daily
    charges still telescope (docs/PRICING.md "Maximum spend").
    """
    amount = _uncapped_price(mp, quantity)
    if mp is None or mp.max_spend is None:
        return amount
    return min(amount, mp.max_spend)


def _billable(mp: MetricPrice, q: Decimal) -> Decimal:
    """The quantity left to package once the metric's free units are taken off."""
    return max(_ZERO, q - mp.free_units)


def _packages(units: Decimal, size: Decimal, rounding: str) -> Decimal:
    """Packages (blocks) of ``size`` in ``units``: the complete ones, plus the started one
    when rounding up. Exact: ``//`` and ``%`` on Decimals never round."""
    packages = units // size
    if rounding == ROUND_UP and units % size:
        packages += 1
    return packages


def _tiered_package_price(mp: MetricPrice, q: Decimal) -> Decimal:
    """Graduated over the billable quantity, each tier counting its own units in its own
    blocks from its lower bound: a block never straddles a tier boundary. Runs in the
    caller's exact context."""
    billable = _billable(mp, q)
    total = _ZERO
    lower = _ZERO
    for tier in mp.tiers:
        if tier.block_size is None or tier.block_price is None or tier.block_size <= 0:
            raise ValueError(f"metric {mp.metric!r}: tiered_package needs positive block sizes")
        upper = billable if tier.up_to is None else min(billable, tier.up_to)
        if upper > lower:
            total += _packages(upper - lower, tier.block_size, mp.rounding) * tier.block_price
        if tier.up_to is None or billable <= tier.up_to:
            break
        lower = tier.up_to
    return total


def _uncapped_price(mp: MetricPrice | None, quantity: Decimal) -> Decimal:
    """``A(q)`` before the metric's ``max_spend``."""
    q = _quantity(quantity)
    if mp is None:
        return _ZERO
    with localcontext(_EXACT):
        if mp.mode == GRADUATED:
            total = _ZERO
            lower = _ZERO
            for tier in mp.tiers:
                upper = q if tier.up_to is None else min(q, tier.up_to)
                if upper > lower:
                    total += (upper - lower) * tier.unit_price + tier.flat_amount
                if tier.up_to is None or q <= tier.up_to:
                    break
                lower = tier.up_to
            return total
        if mp.mode == VOLUME:
            for tier in mp.tiers:
                if tier.up_to is None or q <= tier.up_to:
                    return q * tier.unit_price + (tier.flat_amount if q > 0 else _ZERO)
            raise ValueError(f"metric {mp.metric!r}: volume tiers have no open last tier")
        if mp.mode == PACKAGE:
            if mp.package_size is None or mp.package_price is None or mp.package_size <= 0:
                raise ValueError(f"metric {mp.metric!r}: package mode needs a positive size")
            packages = _packages(_billable(mp, q), mp.package_size, mp.rounding)
            return packages * mp.package_price
        if mp.mode == TIERED_PACKAGE:
            return _tiered_package_price(mp, q)
    raise ValueError(f"metric {mp.metric!r}: unknown pricing mode {mp.mode!r}")


def charges(mp: MetricPrice | None, currency: str, period_to_date: Sequence[Decimal]) -> list[int]:
    """``[C(d) for each Q(d)]``: the rounded charge of each period-to-date quantity, minor
    units. ``Q`` comes from the metric's aggregation (:mod:`billing.pricing.aggregation`)."""
    minor_exponent(currency)  # fail early on an unsupported currency
    return [to_minor(price(mp, q), currency) for q in period_to_date]


def cumulative_charges(
    mp: MetricPrice | None, currency: str, daily_quantities: Sequence[Decimal]
) -> list[int]:
    """``[C(1), ..., C(n)]`` of a ``sum`` metric from each day's own quantity, minor units."""
    cumulative = _ZERO
    running: list[Decimal] = []
    for i, daily in enumerate(daily_quantities):
        d = _as_decimal(daily, f"daily quantity [{i}]")
        if d < 0:
            raise ValueError(f"daily quantity [{i}] must not be negative, got {d}")
        with localcontext(_EXACT):
            cumulative += d
        running.append(cumulative)
    return charges(mp, currency, running)


def daily_charges(
    mp: MetricPrice | None, currency: str, daily_quantities: Sequence[Decimal]
) -> list[int]:
    """``[C(d) - C(d-1)]`` for each day; sums to ``C(last)``. Volume tiers may go negative."""
    cumulative = cumulative_charges(mp, currency, daily_quantities)
    return [c - p for c, p in zip(cumulative, [0, *cumulative], strict=False)]


def invoice_total(plan: Plan, monthly_quantities: Mapping[str, Decimal]) -> int:
    """Base fee + sum over metrics of ``C(last day)``, in integer minor units."""
    total = plan.base_fee_minor
    for metric, quantity in monthly_quantities.items():
        total += to_minor(price(plan.price_for(metric), quantity), plan.currency)
    return total


# --------------------------------------------------------------------------- parsing


class _Invalid(Exception):
    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


def _check_keys(value: Any, where: str, required: set[str], optional: set[str]) -> dict:
    if not isinstance(value, dict):
        raise _Invalid(where, f"must be a mapping, got {_describe(value)}")
    sep = "." if where.endswith("]") else " "
    for key in value:
        if key not in required | optional:
            allowed = ", ".join(sorted(required | optional))
            raise _Invalid(
                f"{where}{sep}{key}" if where else str(key), f"unknown key (allowed: {allowed})"
            )
    for key in sorted(required):
        if key not in value:
            hint = " (use null for the last, open tier)" if key == "up_to" else ""
            raise _Invalid(f"{where}{sep}{key}" if where else key, f"missing{hint}")
    return value


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"YAML boolean {value!r}"
    if isinstance(value, float):
        return f"YAML float {value!r}"
    if isinstance(value, int):
        return f"YAML integer {value!r}"
    return f"{type(value).__name__} {value!r}"


def _parse_plain_decimal(text: str, where: str) -> Decimal:
    try:
        value = Decimal(text)
    except (InvalidOperation, ValueError):
        raise _Invalid(where, f"not a decimal number: {text!r}") from None
    if not value.is_finite():
        raise _Invalid(where, f"must be a finite decimal, got {text!r}")
    if value < 0 or text.strip().startswith("-"):
        raise _Invalid(where, f"must not be negative, got {text!r}")
    if not _PLAIN_DECIMAL_RE.match(text):
        raise _Invalid(
            where,
            f'must be a plain decimal like "0.0002" (no sign, exponent or spaces), got {text!r}',
        )
    return value


def _money(value: Any, where: str) -> Decimal:
    """A price: a quoted, non-negative decimal string ("0", "29.00", "0.0002")."""
    if not isinstance(value, str):
        hint = (
            f' (write it quoted: "{value}")'
            if isinstance(value, int | float) and not isinstance(value, bool)
            else ""
        )
        raise _Invalid(
            where, f"money must be a quoted decimal string, got {_describe(value)}{hint}"
        )
    return _parse_plain_decimal(value, where)


def _amount(value: Any, where: str) -> Decimal:
    """A quantity bound: a YAML integer or a quoted decimal string, never a float."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _Invalid(where, f"must not be negative, got {value}")
        return Decimal(value)
    if isinstance(value, str):
        return _parse_plain_decimal(value, where)
    hint = f' (write it quoted: "{value}")' if isinstance(value, float) else ""
    raise _Invalid(
        where, f"must be an integer or a quoted decimal string, got {_describe(value)}{hint}"
    )


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise _Invalid(where, f"name must match {_NAME_RE.pattern}, got {value!r}")
    return value


def _text(value: Any, where: str, *, required: bool) -> str:
    if not isinstance(value, str) or (required and not value.strip()):
        raise _Invalid(where, f"must be a non-empty string, got {_describe(value)}")
    return value


def _parse_metric(name: str, spec: Any) -> Metric:
    where = f"metric {name!r}"
    spec = _check_keys(
        spec, where, {"unit"}, {"description", "aggregation", "property", "dimensions"}
    )
    unit = _text(spec["unit"], f"{where} unit", required=True)
    description = _text(spec.get("description", ""), f"{where} description", required=False)
    aggregation = spec.get("aggregation", SUM)
    if aggregation not in AGGREGATIONS:
        raise _Invalid(
            f"{where} aggregation",
            f"unknown aggregation {aggregation!r} (expected one of: {', '.join(AGGREGATIONS)})",
        )
    prop = spec.get("property")
    if aggregation == UNIQUE_COUNT:
        if prop is None:
            raise _Invalid(
                f"{where} property",
                "missing (unique_count counts distinct values of an event property)",
            )
        if not isinstance(prop, str) or not _PROPERTY_RE.match(prop):
            raise _Invalid(f"{where} property", f"must match {_PROPERTY_RE.pattern}, got {prop!r}")
    elif prop is not None:
        raise _Invalid(
            f"{where} property",
            f"only a unique_count metric reads a property (this one aggregates {aggregation})",
        )
    dims_raw = spec.get("dimensions", [])
    if not isinstance(dims_raw, list) or len(dims_raw) > _MAX_DIMENSIONS:
        raise _Invalid(
            f"{where} dimensions",
            f"must be a list of at most {_MAX_DIMENSIONS} event properties, got {_describe(dims_raw)}",
        )
    for i, dim in enumerate(dims_raw):
        if not isinstance(dim, str) or not _PROPERTY_RE.match(dim):
            raise _Invalid(
                f"{where} dimensions[{i}]", f"must match {_PROPERTY_RE.pattern}, got {dim!r}"
            )
        if dim in dims_raw[:i]:
            raise _Invalid(f"{where} dimensions[{i}]", f"{dim!r} is listed twice")
    return Metric(
        name=name,
        unit=unit,
        description=description,
        aggregation=aggregation,
        property=prop,
        dimensions=tuple(dims_raw),
    )


def _parse_tiers(value: Any, where: str, *, blocks: bool = False) -> tuple[Tier, ...]:
    if not isinstance(value, list) or not value:
        raise _Invalid(f"{where} tiers", f"must be a non-empty list, got {_describe(value)}")
    tiers: list[Tier] = []
    last = len(value) - 1
    previous: Decimal = _ZERO
    for i, raw in enumerate(value):
        tw = f"{where} tiers[{i}]"
        if blocks:  # tiered_package: the tier's units in blocks (docs/PRICING.md)
            raw = _check_keys(raw, tw, {"up_to", "block_size", "block_price"}, set())
            size = _amount(raw["block_size"], f"{tw}.block_size")
            if size <= 0:
                raise _Invalid(f"{tw}.block_size", f"must be positive, got {size}")
            block_price = _money(raw["block_price"], f"{tw}.block_price")
            prices = {"unit_price": _ZERO, "block_size": size, "block_price": block_price}
        else:
            raw = _check_keys(raw, tw, {"up_to", "unit_price"}, {"flat_amount"})
            unit_price = _money(raw["unit_price"], f"{tw}.unit_price")
            flat = _money(raw.get("flat_amount", "0"), f"{tw}.flat_amount")
            prices = {"unit_price": unit_price, "flat_amount": flat}
        up_to_raw = raw["up_to"]
        if up_to_raw is None:
            if i != last:
                raise _Invalid(f"{tw}.up_to", "only the last tier may be open (up_to: null)")
            tiers.append(Tier(up_to=None, **prices))
            continue
        up_to = _amount(up_to_raw, f"{tw}.up_to")
        if up_to <= previous:
            if i == 0:
                raise _Invalid(f"{tw}.up_to", f"must be positive, got {up_to}")
            raise _Invalid(
                f"{tw}.up_to",
                f"tiers must be strictly increasing ({up_to} after {previous})",
            )
        if i == last:
            raise _Invalid(
                f"{tw}.up_to",
                "the last tier must be open (up_to: null) so every quantity is priced",
            )
        tiers.append(Tier(up_to=up_to, **prices))
        previous = up_to
    return tuple(tiers)


_SPEND = {"max_spend", "min_spend"}


def _price_options(spec: dict, where: str) -> dict[str, Any]:
    """``rounding``, ``free_units`` and ``max_spend``, as MetricPrice keywords (only those
    given: the defaults are the dataclass's)."""
    options: dict[str, Any] = {}
    if "rounding" in spec:
        if spec["rounding"] not in ROUNDINGS:
            raise _Invalid(
                f"{where} rounding",
                f"unknown rounding {spec['rounding']!r} (expected one of: {', '.join(ROUNDINGS)})",
            )
        options["rounding"] = spec["rounding"]
    if "free_units" in spec:
        options["free_units"] = _amount(spec["free_units"], f"{where} free_units")
    if "max_spend" in spec:
        options["max_spend"] = _money(spec["max_spend"], f"{where} max_spend")
    if "min_spend" in spec:
        options["min_spend"] = _money(spec["min_spend"], f"{where} min_spend")
        cap = options.get("max_spend")
        if cap is not None and options["min_spend"] > cap:
            raise _Invalid(
                f"{where} min_spend",
                f"'{spec['min_spend']}' is above the max_spend '{spec['max_spend']}'",
            )
    return options


def _parse_metric_price(plan: str, metric: str, spec: Any) -> MetricPrice:
    where = f"plan {plan!r} metric {metric!r}"
    if not isinstance(spec, dict):
        raise _Invalid(where, f"must be a mapping, got {_describe(spec)}")
    mode = spec.get("mode")
    if mode not in MODES:
        raise _Invalid(
            f"{where} mode",
            f"unknown mode {mode!r} (expected one of: {', '.join(MODES)})",
        )
    if mode == PACKAGE:
        spec = _check_keys(
            spec, where, {"mode", "package_size", "package_price"}, _PACKAGE_OPTIONS | _SPEND
        )
        size = _amount(spec["package_size"], f"{where} package_size")
        if size <= 0:
            raise _Invalid(f"{where} package_size", f"must be positive, got {size}")
        package_price = _money(spec["package_price"], f"{where} package_price")
        return MetricPrice(
            metric=metric,
            mode=mode,
            package_size=size,
            package_price=package_price,
            **_price_options(spec, where),
        )
    package_only = sorted(_PACKAGE_OPTIONS & spec.keys())
    if package_only and mode != TIERED_PACKAGE:
        raise _Invalid(
            f"{where} {package_only[0]}",
            f"only package and tiered_package metrics take it (this one is {mode})",
        )
    optional = _PACKAGE_OPTIONS | _SPEND if mode == TIERED_PACKAGE else _SPEND
    spec = _check_keys(spec, where, {"mode", "tiers"}, optional)
    tiers = _parse_tiers(spec["tiers"], where, blocks=mode == TIERED_PACKAGE)
    return MetricPrice(metric=metric, mode=mode, tiers=tiers, **_price_options(spec, where))


def _check_payable(where: str, amount: Decimal, currency: str) -> None:
    """A fixed amount (a spend bound, a commitment) must be payable in minor units and
    within AMOUNT_MAX_MINOR, like a base fee."""
    exponent = CURRENCIES[currency]
    scaled = amount.scaleb(exponent, _EXACT)
    if scaled != scaled.to_integral_value(context=_EXACT):
        raise _Invalid(
            where, f"'{amount}' has more decimal places than {currency} allows ({exponent})"
        )
    if scaled > AMOUNT_MAX_MINOR:
        raise _Invalid(where, f"'{amount}' is above the limit of {AMOUNT_MAX_MINOR} minor units")


def _check_range(where: str, mp: MetricPrice, currency: str) -> None:
    """Refuse a price that could overflow within the quantity range: the most a month of up
    to MONTHLY_QUANTITY_MAX units can cost must stay within AMOUNT_MAX_MINOR minor units.
    Graduated and package prices grow with the quantity; a volume price peaks at the top of
    some tier, so each tier's top (capped at the range) is priced. Tiered packages grow with
    the quantity too. A max_spend is part of the price (it may bound an otherwise too dear
    one); it must be payable in the currency's minor units, like a base fee."""
    for fld, amount in (("max_spend", mp.max_spend), ("min_spend", mp.min_spend)):
        if amount is not None:
            _check_payable(f"{where} {fld}", amount, currency)
    top = MONTHLY_QUANTITY_MAX
    for i, t in enumerate(mp.tiers):
        if to_minor(t.flat_amount, currency) > AMOUNT_MAX_MINOR:
            raise _Invalid(
                f"{where} tiers[{i}].flat_amount",
                f"{t.flat_amount} is above the limit of {AMOUNT_MAX_MINOR} minor units",
            )
    if mp.mode == PACKAGE:
        candidates = [("package_price", top)]
    elif mp.mode == VOLUME:
        lows = [_ZERO, *(t.up_to for t in mp.tiers[:-1])]
        candidates = [
            (f"tiers[{i}].unit_price", top if t.up_to is None else min(t.up_to, top))
            for i, t in enumerate(mp.tiers)
            if lows[i] < top
        ]
    else:  # graduated: name the tier that adds the most
        lows = [_ZERO, *(t.up_to for t in mp.tiers[:-1])]
        adds = [
            (max(_ZERO, min(top, t.up_to or top) - lows[i]) * t.unit_price, i)
            for i, t in enumerate(mp.tiers)
        ]
        candidates = [(f"tiers[{max(adds)[1]}].unit_price", top)]
    if mp.mode == TIERED_PACKAGE:  # name the tier whose blocks add the most
        lows = [_ZERO, *(t.up_to for t in mp.tiers[:-1])]
        with localcontext(_ROUNDING):  # only picks the name; price() below is exact
            units = [max(_ZERO, min(top, t.up_to or top) - lows[i]) for i, t in enumerate(mp.tiers)]
            adds = [
                (_packages(u, t.block_size, mp.rounding) * t.block_price, i)
                for i, (u, t) in enumerate(zip(units, mp.tiers, strict=True))
            ]
        candidates = [(f"tiers[{max(adds)[1]}].block_price", top)]
    for fld, q in candidates:
        try:
            minor = to_minor(price(mp, q), currency)
        except (Inexact, Overflow, InvalidOperation):
            raise _Invalid(f"{where} {fld}", "cannot be priced exactly within 50 digits") from None
        if minor > AMOUNT_MAX_MINOR:
            raise _Invalid(
                f"{where} {fld}",
                f"{q} units in a month would cost {minor} minor units, above the limit of "
                f"{AMOUNT_MAX_MINOR} (the quantity range is in docs/PRICING.md)",
            )


def _parse_dimension_prices(
    plan: str, metric: Metric, spec: dict, currency: str
) -> tuple[MetricPrice, Mapping[str, MetricPrice]]:
    """``default:`` plus ``values:`` (each ``match:`` + a price) of a dimensioned metric."""
    where = f"plan {plan!r} metric {metric.name!r}"
    if not metric.dimensions:
        raise _Invalid(
            f"{where} values",
            "the metric declares no dimensions (add 'dimensions:' under the top-level metric)",
        )
    _check_keys(spec, where, {"default"}, {"values"})
    default = _parse_metric_price(plan, metric.name, spec["default"])
    raw = spec.get("values") or []
    if not isinstance(raw, list):
        raise _Invalid(f"{where} values", f"must be a list, got {_describe(raw)}")
    listed: dict[str, MetricPrice] = {}
    for i, entry in enumerate(raw):
        vw = f"{where} values[{i}]"
        if not isinstance(entry, dict) or "match" not in entry:
            raise _Invalid(f"{vw}.match", "missing (the dimension values this price is for)")
        match = _check_keys(entry["match"], f"{vw}.match", set(metric.dimensions), set())
        for dim in metric.dimensions:
            if not isinstance(match[dim], str):
                raise _Invalid(
                    f"{vw}.match.{dim}",
                    f"must be a quoted string (values compare as text), got {_describe(match[dim])}",
                )
        key = price_key([match[d] for d in metric.dimensions])
        if key in listed:
            raise _Invalid(f"{vw}.match", f"{key} is priced twice")
        rest = {k: v for k, v in entry.items() if k != "match"}
        try:
            listed[key] = _parse_metric_price(plan, metric.name, rest)
        except _Invalid as exc:  # name the entry: "... metric 'm' values[1] tiers[0]..."
            raise _Invalid(exc.where.replace(where, vw, 1), exc.message) from None
        _check_range(vw, listed[key], currency)
    return default, MappingProxyType(listed)


def _parse_plan(name: str, spec: Any, metrics: Mapping[str, Metric]) -> Plan:
    where = f"plan {name!r}"
    spec = _check_keys(spec, where, {"currency", "base_fee"}, {"metrics", "minimum_commitment"})
    currency_raw = spec["currency"]
    if not isinstance(currency_raw, str) or currency_raw.lower() not in CURRENCIES:
        raise _Invalid(
            f"{where} currency",
            f"unsupported currency {currency_raw!r} (supported: {', '.join(CURRENCIES)})",
        )
    currency = currency_raw.lower()
    base_fee = _money(spec["base_fee"], f"{where} base_fee")
    exponent = CURRENCIES[currency]
    scaled = base_fee.scaleb(exponent, _EXACT)
    if scaled != scaled.to_integral_value(context=_EXACT):
        raise _Invalid(
            f"{where} base_fee",
            f"{spec['base_fee']!r} has more decimal places than {currency} allows ({exponent})",
        )
    priced_raw = spec.get("metrics") or {}
    if not isinstance(priced_raw, dict):
        raise _Invalid(f"{where} metrics", f"must be a mapping, got {_describe(priced_raw)}")
    priced: dict[str, MetricPrice] = {}
    values: dict[str, Mapping[str, MetricPrice]] = {}
    for metric, mp_spec in priced_raw.items():
        _name(metric, f"{where} metric {metric!r}")
        if metric not in metrics:
            raise _Invalid(
                f"{where} metric {metric!r}",
                "not declared under the top-level 'metrics:'",
            )
        mw = f"{where} metric {metric!r}"
        if isinstance(mp_spec, dict) and ("values" in mp_spec or "default" in mp_spec):
            priced[metric], values[metric] = _parse_dimension_prices(
                name, metrics[metric], mp_spec, currency
            )
        else:
            priced[metric] = _parse_metric_price(name, metric, mp_spec)
        _check_range(mw, priced[metric], currency)
        if metrics[metric].dimensions and any(
            mp.min_spend is not None for mp in [priced[metric], *values.get(metric, {}).values()]
        ):
            raise _Invalid(
                f"{mw} min_spend",
                "a dimensioned metric takes no min_spend (use the plan's minimum_commitment)",
            )
    if base_fee.scaleb(exponent, _EXACT) > AMOUNT_MAX_MINOR:
        raise _Invalid(
            f"{where} base_fee",
            f"{spec['base_fee']!r} is above the limit of {AMOUNT_MAX_MINOR} minor units",
        )
    commitment = None
    if "minimum_commitment" in spec:
        commitment = _money(spec["minimum_commitment"], f"{where} minimum_commitment")
        _check_payable(f"{where} minimum_commitment", commitment, currency)
    return Plan(
        name=name,
        currency=currency,
        base_fee=base_fee,
        minimum_commitment=commitment,
        metrics=MappingProxyType(priced),
        values=MappingProxyType(values),
    )


def parse_catalog(data: Any, source: str = "catalog") -> Catalog:
    """Validate a parsed YAML document and build the :class:`Catalog`.

    Any inconsistency raises :class:`ConfigError` ``"<source>: <where>: <problem>"``, e.g.
    ``catalog: plan 'starter' metric 'api_calls' tiers[1].up_to: tiers must be strictly
    increasing (...)``.
    """
    try:
        if not isinstance(data, dict):
            raise _Invalid(
                "top level",
                f"must be a mapping with 'metrics' and 'plans', got {_describe(data)}",
            )
        _check_keys(data, "", {"metrics", "plans"}, {"effective_from"})
        effective_from = _effective_from(data.get("effective_from"))
        metrics_raw = data["metrics"]
        if not isinstance(metrics_raw, dict) or not metrics_raw:
            raise _Invalid("metrics", f"must be a non-empty mapping, got {_describe(metrics_raw)}")
        metrics: dict[str, Metric] = {}
        for name, spec in metrics_raw.items():
            _name(name, f"metric {name!r}")
            if name in RESERVED_LABELS:
                raise _Invalid(
                    f"metric {name!r}",
                    "is reserved: it names a charge of its own on invoices and in Stripe "
                    f"({', '.join(sorted(RESERVED_LABELS))})",
                )
            metrics[name] = _parse_metric(name, spec)
        plans_raw = data["plans"]
        if not isinstance(plans_raw, dict) or not plans_raw:
            raise _Invalid("plans", f"must be a non-empty mapping, got {_describe(plans_raw)}")
        plans: dict[str, Plan] = {}
        for name, spec in plans_raw.items():
            _name(name, f"plan {name!r}")
            plans[name] = _parse_plan(name, spec, metrics)
    except _Invalid as exc:
        raise ConfigError(f"{source}: {exc.where}: {exc.message}") from None
    return Catalog(
        metrics=MappingProxyType(metrics),
        plans=MappingProxyType(plans),
        effective_from=effective_from,
    )


def _effective_from(value: Any) -> dt.date | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime) or not isinstance(value, dt.date | str):
        raise _Invalid("effective_from", f"must be a date YYYY-MM-DD, got {_describe(value)}")
    if isinstance(value, str):
        try:
            value = dt.date.fromisoformat(value)
        except ValueError:
            raise _Invalid("effective_from", f"must be a date YYYY-MM-DD, got {value!r}") from None
    return value


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Load and validate the catalog (default: ``settings.catalog_path()``, i.e.
    ``$BILLING_CATALOG`` or ``include/config/catalog.yaml``)."""
    path = Path(path) if path is not None else settings.catalog_path()
    source = f"catalog {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found (set BILLING_CATALOG to override)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None)
        if mark is not None and problem:
            detail = f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
        else:
            detail = " ".join(str(exc).split())
        raise ConfigError(f"{source}: invalid YAML: {detail}") from None
    return parse_catalog(data, source=source)


# --------------------------------------------------------------------------- export


def catalog_tables(catalog: Catalog) -> dict[str, list[tuple]]:
    """Flat, deterministically ordered rows for the Postgres reference tables."""
    plans: list[tuple] = []
    plan_metrics: list[tuple] = []
    plan_tiers: list[tuple] = []
    for plan_name in sorted(catalog.plans):
        plan = catalog.plans[plan_name]
        plans.append(
            (
                plan.name,
                plan.currency,
                plan.base_fee,
                plan.base_fee_minor,
                minor_exponent(plan.currency),
                None
                if plan.minimum_commitment is None
                else to_minor(plan.minimum_commitment, plan.currency),
            )
        )
        # each metric's default price (key "") and the prices of listed dimension values
        charges = [
            (metric, key, mp)
            for metric in sorted(plan.metrics)
            for key, mp in [
                ("", plan.metrics[metric]),
                *sorted(plan.values.get(metric, {}).items()),
            ]
        ]
        for metric, key, mp in charges:
            plan_metrics.append(
                (plan.name, metric, key, mp.mode, mp.package_size, mp.package_price)
                + (mp.rounding, mp.free_units, mp.max_spend)
                + (None if mp.min_spend is None else to_minor(mp.min_spend, plan.currency),)
            )
            lower = _ZERO
            for index, tier in enumerate(mp.tiers):
                plan_tiers.append(
                    (
                        plan.name,
                        metric,
                        key,
                        index,
                        lower,
                        tier.up_to,
                        tier.unit_price,
                        tier.block_size,
                        tier.block_price,
                        tier.flat_amount,
                    )
                )
                if tier.up_to is not None:
                    lower = tier.up_to
    metrics = [
        (m.name, m.unit, m.description, m.aggregation, m.property, list(m.dimensions))
        for m in (catalog.metrics[k] for k in sorted(catalog.metrics))
    ]
    return {
        "plans": plans,
        "plan_metrics": plan_metrics,
        "plan_tiers": plan_tiers,
        "metrics": metrics,
    }


def _canonical_options(mp: MetricPrice) -> dict[str, Any]:
    """A tiered_package's blocks, and the package options and the cap only when they are
    not the defaults: catalogs without them keep the version they had before them."""
    out: dict[str, Any] = {}
    if mp.mode == TIERED_PACKAGE:
        out["blocks"] = [
            [_canonical_decimal(t.block_size), _canonical_decimal(t.block_price)] for t in mp.tiers
        ]
    if mp.rounding != ROUND_UP:
        out["rounding"] = mp.rounding
    if mp.free_units:
        out["free_units"] = _canonical_decimal(mp.free_units)
    if mp.max_spend is not None:
        out["max_spend"] = _canonical_decimal(mp.max_spend)
    if mp.min_spend is not None:
        out["min_spend"] = _canonical_decimal(mp.min_spend)
    return out


def _canonical_decimal(value: Decimal | None) -> str | None:
    if value is None:
        return None
    text = format(value.normalize(_ROUNDING), "f")
    return "0" if text in ("-0", "0") else text


def _canonical_price(mp: MetricPrice) -> dict[str, Any]:
    return {
        "mode": mp.mode,
        "tiers": [
            # a flat amount only when there is one: catalogs without keep
            # the version they had before tiers could carry one
            [_canonical_decimal(t.up_to), _canonical_decimal(t.unit_price)]
            + ([_canonical_decimal(t.flat_amount)] if t.flat_amount else [])
            for t in mp.tiers
        ],
        "package_size": _canonical_decimal(mp.package_size),
        "package_price": _canonical_decimal(mp.package_price),
    } | _canonical_options(mp)


def _canonical(catalog: Catalog) -> dict[str, Any]:
    return {
        "metrics": {
            # the aggregation only when it is not the default: catalogs of sum metrics keep
            # the version they had before metrics could aggregate otherwise
            m.name: {"unit": m.unit, "description": m.description}
            | (
                {"aggregation": m.aggregation, "property": m.property}
                if m.aggregation != SUM
                else {}
            )
            | ({"dimensions": list(m.dimensions)} if m.dimensions else {})
            for m in catalog.metrics.values()
        },
        "plans": {
            p.name: {
                "currency": p.currency,
                "base_fee": _canonical_decimal(p.base_fee),
                "metrics": {mp.metric: _canonical_price(mp) for mp in p.metrics.values()},
            }
            # priced dimension values only when there are some (the version stays otherwise)
            | (
                {
                    "values": {
                        metric: {key: _canonical_price(mp) for key, mp in listed.items()}
                        for metric, listed in p.values.items()
                    }
                }
                if any(p.values.values())
                else {}
            )
            | (
                {"minimum_commitment": _canonical_decimal(p.minimum_commitment)}
                if p.minimum_commitment is not None
                else {}
            )
            for p in catalog.plans.values()
        },
    } | (
        # only when set: catalogs without a date keep their version
        {"effective_from": catalog.effective_from.isoformat()} if catalog.effective_from else {}
    )


def catalog_version(catalog_or_path: Catalog | str | Path | None) -> str:
    """SHA-256 (hex) of the catalog's canonical content, to stamp snapshots and invoices.

    Canonical: what the catalog *means*, not how the file is written. Comments, key order,
    quoting and trailing zeros ("29" vs "29.00") do not change the version.
    """
    if isinstance(catalog_or_path, Catalog):
        catalog = catalog_or_path
    else:
        catalog = load_catalog(catalog_or_path)
    payload = json.dumps(
        _canonical(catalog), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
