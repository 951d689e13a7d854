{#-
  Exact tier math (docs/PRICING.md, billing.pricing.catalog.price). All arguments are SQL
  expressions of type numeric; numeric arithmetic is exact in Postgres, so the only
  rounding is the one in to_minor_units.

  A metric's price A(q) = sum over its tier rows of tier_amount(...), plus
  package_amount(...) for package mode (which has no tier rows).
-#}

{#- Units of quantity q priced in the tier (lower_bound, up_to]. -#}
{% macro tier_quantity(mode, quantity, lower_bound, up_to) -%}
    case {{ mode }}
        when 'graduated' then
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
    A tier the quantity reaches into (it prices some of it) adds its flat amount once. -#}
{% macro tier_amount(mode, quantity, lower_bound, up_to, unit_price, flat_amount='0') -%}
    ({{ tier_quantity(mode, quantity, lower_bound, up_to) }}) * {{ unit_price }}
    + case when ({{ tier_quantity(mode, quantity, lower_bound, up_to) }}) > 0
           then coalesce({{ flat_amount }}, 0) else 0 end
{%- endmacro %}

{#- ceil(q / size) * price, exactly: div/mod on numeric never round. -#}
{% macro package_count(quantity, package_size) -%}
    (div({{ quantity }}, {{ package_size }})
     + case when mod({{ quantity }}, {{ package_size }}) > 0 then 1 else 0 end)
{%- endmacro %}

{% macro package_amount(quantity, package_size, package_price) -%}
    {{ package_count(quantity, package_size) }} * {{ package_price }}
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
