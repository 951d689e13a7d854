{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key='period_start',
        on_schema_change='fail',
        indexes=[{'columns': ['org_id', 'period_start', 'metric', 'dimension_key', 'segment_start', 'usage_date'], 'unique': true}],
    )
}}
{#-
  C(d) = round_half_up(A(Q(d))) in minor units, Q(d) the month-to-date quantity of the
  metric's aggregation (int_usage_period_to_date); the day's charge is C(d) - C(d-1).
  Rows exist for days with billable usage (every day for a time-weighted metric): between
  them C is flat, so the daily charges still telescope to C(last day). Each subscription
  segment (int_subscription_segments) is priced on its own plan and catalog version from
  zero: its own charge, labelled charge_label (the Stripe items' metadata.metric).
-#}
with usage_days as (
    select
        u.org_id,
        u.metric,
        u.dimension_key,
        u.segment_start,
        {# the price of a listed combination of dimension values, else the default ('') #}
        coalesce(listed.price_key, '') as price_key,
        u.usage_date,
        u.period_start,
        u.aggregation,
        u.cumulative_quantity - coalesce(
            lag(u.cumulative_quantity) over (
                partition by u.org_id, u.metric, u.dimension_key, u.period_start, u.segment_start
                order by u.usage_date
            ),
            0
        ) as quantity,
        u.cumulative_quantity
    from {{ ref('int_usage_period_to_date') }} as u
    inner join {{ ref('int_subscription_segments') }} as o
        on o.org_id = u.org_id and o.period_start = u.period_start
       and o.segment_start = u.segment_start
    left join {{ ref('stg_billing__catalog_plan_metrics') }} as listed
        on listed.catalog_version = o.catalog_version and listed.plan = o.plan
       and listed.metric = u.metric
       and u.dimension_key <> '' and listed.price_key = u.dimension_key
),

{#- materialized: its row estimate is ~1, and inlined into `priced` Postgres re-ran its
    aggregate for every usage row (35 s of 39 at 60 days of history, docs/PERFORMANCE.md) -#}
priced_tiers as materialized (
    select
        d.org_id,
        d.metric,
        d.dimension_key,
        d.segment_start,
        d.usage_date,
        sum({{ tier_amount('pm.pricing_mode', billable_quantity('d.cumulative_quantity', 'pm.free_units'), 't.lower_bound', 't.up_to', 't.unit_price', 't.flat_amount', 't.block_size', 't.block_price', 'pm.rounding') }}) as tiered_amount
    from usage_days as d
    inner join {{ ref('int_subscription_segments') }} as o
        on o.org_id = d.org_id and o.period_start = d.period_start
       and o.segment_start = d.segment_start
    inner join {{ ref('stg_billing__catalog_plan_metrics') }} as pm
        on pm.catalog_version = o.catalog_version and pm.plan = o.plan
       and pm.metric = d.metric and pm.price_key = d.price_key
    inner join {{ ref('stg_billing__catalog_plan_tiers') }} as t
        on t.catalog_version = pm.catalog_version and t.plan = pm.plan
       and t.metric = pm.metric and t.price_key = pm.price_key
    group by d.org_id, d.metric, d.dimension_key, d.segment_start, d.usage_date
),

priced as (
    select
        d.org_id,
        d.metric,
        d.dimension_key,
        d.segment_start,
        o.label_suffix,
        d.usage_date,
        d.period_start,
        o.plan,
        o.currency,
        o.catalog_version,
        pm.pricing_mode,
        d.aggregation,
        d.quantity,
        d.cumulative_quantity,
        least(
            case
                when pm.pricing_mode is null then 0
                when pm.pricing_mode = 'package'
                    then {{ package_amount(billable_quantity('d.cumulative_quantity', 'pm.free_units'), 'pm.package_size', 'pm.package_price', 'pm.rounding') }}
                else coalesce(pt.tiered_amount, 0)
            end,
            pm.max_spend  -- the maximum spend caps A(q); least() ignores a null: no cap
        ) as cumulative_amount,
        o.minor_exponent
    from usage_days as d
    inner join {{ ref('int_subscription_segments') }} as o
        on o.org_id = d.org_id and o.period_start = d.period_start
       and o.segment_start = d.segment_start
    left join {{ ref('stg_billing__catalog_plan_metrics') }} as pm
        on pm.catalog_version = o.catalog_version and pm.plan = o.plan
       and pm.metric = d.metric and pm.price_key = d.price_key
    left join priced_tiers as pt
        on pt.org_id = d.org_id and pt.metric = d.metric and pt.dimension_key = d.dimension_key
       and pt.segment_start = d.segment_start and pt.usage_date = d.usage_date
),

charged as (
    select
        *,
        {{ to_minor_units('cumulative_amount', 'minor_exponent') }} as cumulative_charge_cents
    from priced
)

select
    org_id,
    metric,
    dimension_key,
    segment_start,
    {{ charge_label('metric', 'dimension_key', 'label_suffix') }} as charge_label,
    usage_date,
    period_start,
    plan,
    currency,
    pricing_mode,
    aggregation,
    quantity,
    cumulative_quantity,
    cumulative_amount,
    cumulative_charge_cents,
    cumulative_charge_cents - coalesce(
        lag(cumulative_charge_cents) over (
            partition by org_id, metric, dimension_key, period_start, segment_start
            order by usage_date
        ),
        0
    ) as daily_charge_cents,
    catalog_version
from charged
