{#-
  Exact tier math (docs/PRICING.md, billing.pricing.catalog.price). All arguments are SQL
  expressions of type numeric; numeric arithmetic is exact in Postgres, so the only
  rounding is the one in to_minor_units.

  A metric's price A(q) = sum over its tier rows of tier_amount(...), plus
  package_amount(...) for package mode (which has no tier rows); package and
  tiered_package price billable_quantity(q, free_units); any mode is capped at max_spend
  (least(A(q), max_spend)). docs/PRICING.md "Package options", "Tiered packages", "Maximum spend".
-#}

{#- The quantity left to package once the free units are taken off: max(0, q - free_units).
    free_units is 0 for graduated and volume (and null in hand-written rows: none). -#}
{% macro billable_quantity(quantity, free_units) -%}
    greatest({{ quantity }} - coalesce({{ free_units }}, 0), 0)
{%- endmacro %}

{#- Units of quantity q priced in the tier (lower_bound, up_to]. tiered_package counts them
    as graduated does (of the billable quantity), then in blocks: tier_amount. -#}
{% macro tier_quantity(mode, quantity, lower_bound, up_to) -%}
    case {{ mode }}
        when 'graduated' then
            greatest(least({{ quantity }}, coalesce({{ up_to }}, {{ quantity }})) - {{ lower_bound }}, 0)
        when 'tiered_package' then
            greatest(least({{ quantity }}, coalesce({{ up_to }}, {{ quantity }})) - {{ lower_bound }}, 0)
        when 'volume' then
            case when {{ quantity }} > {{ lower_bound }}
                  and ({{ up_to }} is null or {{ quantity }} <= {{ up_to }})
                 then {{ quantity }} else 0 end
        else 0
    end
{%- endmacro %}

{#- Exact amount contributed by one tier: graduated prices each unit in its own tier;
    volume prices all units at the tier the total falls in (q = 0 costs 0 in any tier).
    A tier the quantity reaches into (it prices some of it) adds its flat amount once.
    tiered_package: the tier's units in blocks of block_size, each block_price, counted from
    the tier's lower bound (a block never straddles a tier boundary) and rounded as the
    metric says. -#}
{% macro tier_amount(mode, quantity, lower_bound, up_to, unit_price, flat_amount='0', block_size='null', block_price='null', rounding="'up'") -%}
    case when {{ mode }} = 'tiered_package'
        then {{ package_count(tier_quantity(mode, quantity, lower_bound, up_to), block_size, rounding) }} * {{ block_price }}
        else ({{ tier_quantity(mode, quantity, lower_bound, up_to) }}) * {{ unit_price }}
            + case when ({{ tier_quantity(mode, quantity, lower_bound, up_to) }}) > 0
                   then coalesce({{ flat_amount }}, 0) else 0 end
    end
{%- endmacro %}

{#- Packages of size in q, exactly (div/mod on numeric never round): the complete ones,
    plus the started one when rounding up (the default): ceil(q / size), else floor. -#}
{% macro package_count(quantity, package_size, rounding="'up'") -%}
    (div({{ quantity }}, {{ package_size }})
     + case when coalesce({{ rounding }}, 'up') = 'up' and mod({{ quantity }}, {{ package_size }}) > 0
            then 1 else 0 end)
{%- endmacro %}

{% macro package_amount(quantity, package_size, package_price, rounding="'up'") -%}
    {{ package_count(quantity, package_size, rounding) }} * {{ package_price }}
{%- endmacro %}

{#- Exact major-unit amount -> integer minor units, round half up. -#}
{% macro to_minor_units(amount, minor_exponent) -%}
    {{ return(adapter.dispatch('to_minor_units', 'billing')(amount, minor_exponent)) }}
{%- endmacro %}

{% macro postgres__to_minor_units(amount, minor_exponent) -%}
    {#- round(numeric) rounds half away from zero: half up, as amounts are never negative. -#}
    round(({{ amount }}) * power(10::numeric, {{ minor_exponent }}))::bigint
{%- endmacro %}

{% macro clickhouse__to_minor_units(amount, minor_exponent) -%}
    {#- round(Decimal) rounds half away from zero in ClickHouse (banker's only for floats). -#}
    toInt64(round(({{ amount }}) * toDecimal64(intExp10({{ minor_exponent }}), 0), 0))
{%- endmacro %}

{#- A plan amount in minor units for the days of a segment (docs/SUBSCRIPTIONS.md
    "Proration"): round_half_up(amount x days / period_days), exact on numeric; the whole
    amount for a whole period. -#}
{% macro prorate(amount_minor, days, period_days) -%}
    case when {{ days }} = {{ period_days }} then {{ amount_minor }}
         else round(({{ amount_minor }})::numeric * {{ days }} / {{ period_days }})::bigint end
{%- endmacro %}
