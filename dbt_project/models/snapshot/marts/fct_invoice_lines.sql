{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key='period_start',
        on_schema_change='fail',
        indexes=[{'columns': ['invoice_id']}],
    )
}}
{#-
  Invoices exist for every org subscribed for some day of the period that had billable
  usage in it or existed by its end. Lines, per subscription segment (docs/SUBSCRIPTIONS.md):
  the base fee prorated to the segment's days, then one per metric the segment's plan
  prices or the org used in it (one per combination of dimension values used, for a
  dimensioned metric), with amount_cents = C(last day) from fct_daily_charges, then the
  segment's true-ups. A segment that starts after the period's first day names its start in
  the line id ("@YYYY-MM-DD") and charge label (" from YYYY-MM-DD").
-#}
with periods as (
    select
        period_start,
        (period_start + interval '1 month' - interval '1 day')::date as period_end
    from {{ ref('int_periods_affected') }}
),

segments as (
    select *
    from {{ ref('int_subscription_segments') }}
    where period_start in (select period_start from periods)
),

month_usage as (
    select distinct on (org_id, metric, dimension_key, period_start, segment_start)
        org_id,
        metric,
        dimension_key,
        period_start,
        segment_start,
        cumulative_quantity as quantity,
        cumulative_amount as exact_amount,
        cumulative_charge_cents as amount_cents
    from {{ ref('fct_daily_charges') }}
    where period_start in (select period_start from periods)
    order by org_id, metric, dimension_key, period_start, segment_start, usage_date desc
),

{#- The days whose charge was negative (a cheaper volume tier, a latest value that fell):
    Stripe has them as credit items, and the PDF names their sum. -#}
month_credits as (
    select
        org_id,
        metric,
        dimension_key,
        period_start,
        segment_start,
        sum(daily_charge_cents) as credited_cents,
        count(*) as credited_days
    from {{ ref('fct_daily_charges') }}
    where period_start in (select period_start from periods)
      and daily_charge_cents < 0
    group by org_id, metric, dimension_key, period_start, segment_start
),

invoiced as (
    select distinct s.org_id, s.period_start
    from segments as s
    inner join periods as p on p.period_start = s.period_start
    where (s.created_at at time zone 'UTC')::date <= p.period_end
       or exists (
           select 1 from month_usage as u
           where u.org_id = s.org_id and u.period_start = s.period_start
       )
),

{#- One row per invoice segment: the segment's plan, version and prorated amounts. -#}
invoices as (
    select
        {{ invoice_id('s.org_id', 's.period_start') }} as invoice_id,
        s.org_id,
        s.period_start,
        s.segment_start,
        s.segment_end,
        s.label_suffix,
        case when s.segment_start = s.period_start then ''
             else '@' || to_char(s.segment_start, 'YYYY-MM-DD') end as id_suffix,
        s.segment_days,
        s.period_days,
        s.plan,
        s.currency,
        s.prorated_base_fee_cents as base_fee_cents,
        s.prorated_commitment_cents as minimum_commitment_cents,
        s.catalog_version
    from segments as s
    inner join invoiced as v on v.org_id = s.org_id and v.period_start = s.period_start
),

{#- A line per metric the segment's plan prices (one at 0 when unused), and per metric and
    combination of dimension values the org used in the segment. -#}
invoice_metrics as (
    select i.invoice_id, i.segment_start, pm.metric, '' as dimension_key
    from invoices as i
    inner join {{ ref('stg_billing__catalog_plan_metrics') }} as pm
        on pm.catalog_version = i.catalog_version and pm.plan = i.plan and pm.price_key = ''
    where not exists (
        select 1 from month_usage as u
        where u.org_id = i.org_id and u.period_start = i.period_start
          and u.segment_start = i.segment_start and u.metric = pm.metric
    )
    union
    select i.invoice_id, i.segment_start, u.metric, u.dimension_key
    from invoices as i
    inner join month_usage as u
        on u.org_id = i.org_id and u.period_start = i.period_start
       and u.segment_start = i.segment_start
),

usage_lines as (
    select
        i.invoice_id,
        i.org_id,
        i.period_start,
        i.segment_start,
        i.segment_end,
        i.label_suffix,
        i.id_suffix,
        i.segment_days,
        i.period_days,
        i.plan,
        i.currency,
        i.catalog_version,
        im.metric,
        im.dimension_key,
        case when im.dimension_key = '' then '{}'::jsonb else (
            select jsonb_object_agg(d.dim, im.dimension_key::jsonb -> (d.position - 1)::integer)
            from unnest(m.dimensions) with ordinality as d (dim, position)
        ) end as dimensions,
        pm.price_key,
        pm.pricing_mode,
        coalesce(u.quantity, 0) as quantity,
        coalesce(u.exact_amount, 0) as exact_amount,
        coalesce(u.amount_cents, 0) as amount_cents,
        coalesce(m.aggregation, 'sum') as aggregation,
        coalesce(c.credited_cents, 0) as credited_cents,
        coalesce(c.credited_days, 0) as credited_days,
        pm.package_size,
        pm.package_price,
        pm.rounding,
        pm.free_units,
        pm.max_spend
    from invoice_metrics as im
    inner join invoices as i
        on i.invoice_id = im.invoice_id and i.segment_start = im.segment_start
    left join month_usage as u
        on u.org_id = i.org_id and u.period_start = i.period_start
       and u.segment_start = i.segment_start and u.metric = im.metric
       and u.dimension_key = im.dimension_key
    left join month_credits as c
        on c.org_id = i.org_id and c.period_start = i.period_start
       and c.segment_start = i.segment_start and c.metric = im.metric
       and c.dimension_key = im.dimension_key
    left join {{ ref('stg_billing__catalog_metrics') }} as m
        on m.catalog_version = i.catalog_version and m.metric = im.metric
    {# the listed price of the line's dimension values, else the metric's default #}
    left join {{ ref('stg_billing__catalog_plan_metrics') }} as listed
        on listed.catalog_version = i.catalog_version and listed.plan = i.plan
       and listed.metric = im.metric
       and im.dimension_key <> '' and listed.price_key = im.dimension_key
    left join {{ ref('stg_billing__catalog_plan_metrics') }} as pm
        on pm.catalog_version = i.catalog_version and pm.plan = i.plan and pm.metric = im.metric
       and pm.price_key = coalesce(listed.price_key, '')
),

{#- Per tier: its units and amount. tiered_package (and package, below) price the billable
    quantity (free units off); a tiered_package tier renders as packages of its blocks, with
    its range. amount sums the tiers: A(q) before the maximum spend. -#}
{%- set q = billable_quantity('l.quantity', 'l.free_units') %}
{%- set units = tier_quantity('l.pricing_mode', q, 't.lower_bound', 't.up_to') %}
{%- set amount = tier_amount('l.pricing_mode', q, 't.lower_bound', 't.up_to', 't.unit_price', 't.flat_amount', 't.block_size', 't.block_price', 'l.rounding') %}
{%- set options = "case when l.free_units > 0 then jsonb_build_object('free_units', l.free_units) else '{}'::jsonb end
    || case when l.rounding = 'down' then jsonb_build_object('rounding', 'down') else '{}'::jsonb end" %}
tier_breakdown as (
    select
        l.invoice_id,
        l.segment_start,
        l.metric,
        l.dimension_key,
        jsonb_agg(
            case when l.pricing_mode = 'tiered_package' then jsonb_build_object(
                'tier', t.tier_index + 1,
                'from', t.lower_bound,
                'up_to', t.up_to,
                'quantity', {{ units }},
                'packages', {{ package_count(units, 't.block_size', 'l.rounding') }},
                'package_size', t.block_size,
                'package_price', t.block_price,
                'amount', {{ amount }}
            ) || {{ options }}
            else jsonb_build_object(
                'tier', t.tier_index + 1,
                'from', t.lower_bound,
                'up_to', t.up_to,
                'unit_price', t.unit_price,
                'flat_amount', t.flat_amount,
                'quantity', {{ units }},
                'amount', {{ amount }}
            ) end
            order by t.tier_index
        ) filter (
            where {{ units }} > 0
        ) as tiers,
        sum({{ amount }}) as amount
    from usage_lines as l
    inner join {{ ref('stg_billing__catalog_plan_tiers') }} as t
        on t.catalog_version = l.catalog_version and t.plan = l.plan
       and t.metric = l.metric and t.price_key = l.price_key
    group by l.invoice_id, l.segment_start, l.metric, l.dimension_key
),

{#- Minimum spend and commitment (docs/PRICING.md), per segment and prorated to its days
    like the base fee: true-up lines from the run of the period's last day on (before it
    the usage may still reach the minimum), positive only. A metric's min_spend covers its
    usage line (used or not; dimensioned metrics take none); the plan's minimum_commitment
    covers the segment's usage lines plus those true-ups. #}
{%- set segment_cols = 'invoice_id, org_id, period_start, segment_start, segment_end, label_suffix, id_suffix, plan, currency, catalog_version' %}
min_spend_lines as (
    select
        l.invoice_id,
        l.org_id,
        l.period_start,
        l.segment_start,
        l.segment_end,
        l.label_suffix,
        l.id_suffix,
        l.plan,
        l.currency,
        l.catalog_version,
        l.metric,
        {{ prorate('pm.min_spend_cents', 'l.segment_days', 'l.period_days') }} - l.amount_cents as amount_cents
    from usage_lines as l
    inner join periods as p on p.period_start = l.period_start
    inner join {{ ref('stg_billing__catalog_plan_metrics') }} as pm
        on pm.catalog_version = l.catalog_version and pm.plan = l.plan
       and pm.metric = l.metric and pm.price_key = ''
    where l.dimension_key = ''
      and {{ run_day() }} >= p.period_end
      and {{ prorate('pm.min_spend_cents', 'l.segment_days', 'l.period_days') }} > l.amount_cents
),

commitment_lines as (
    select
        i.invoice_id, i.org_id, i.period_start, i.segment_start, i.segment_end, i.label_suffix,
        i.id_suffix, i.plan, i.currency, i.catalog_version,
        i.minimum_commitment_cents
            - coalesce((select sum(u.amount_cents) from usage_lines as u
                         where u.invoice_id = i.invoice_id
                           and u.segment_start = i.segment_start), 0)
            - coalesce((select sum(m.amount_cents) from min_spend_lines as m
                         where m.invoice_id = i.invoice_id
                           and m.segment_start = i.segment_start), 0) as amount_cents
    from invoices as i
    inner join periods as p on p.period_start = i.period_start
    where i.minimum_commitment_cents is not null
      and {{ run_day() }} >= p.period_end
),

true_ups as (
    select *, 'minimum_spend' as line_type from min_spend_lines
    union all
    select
        {{ segment_cols }},
        cast(null as text) as metric, amount_cents, 'minimum_commitment' as line_type
    from commitment_lines
    where amount_cents > 0
),

lines as (
    select
        {{ segment_cols }},
        'base_fee' as line_type,
        cast(null as text) as metric,
        '' as dimension_key,
        '{}'::jsonb as dimensions,
        cast(null as text) as pricing_mode,
        1::numeric as quantity,
        base_fee_cents as amount_cents,
        '[]'::jsonb as tiers,
        cast(null as text) as aggregation,
        0::bigint as credited_cents,
        0::bigint as credited_days
    from invoices
    union all
    select
        l.invoice_id, l.org_id, l.period_start, l.segment_start, l.segment_end, l.label_suffix,
        l.id_suffix, l.plan, l.currency, l.catalog_version,
        'usage' as line_type,
        l.metric,
        l.dimension_key,
        l.dimensions,
        l.pricing_mode,
        l.quantity,
        l.amount_cents,
        {%- set pq = billable_quantity('l.quantity', 'l.free_units') %}
        {%- set uncapped = "case when l.pricing_mode = 'package' then "
            ~ package_amount(pq, 'l.package_size', 'l.package_price', 'l.rounding')
            ~ " else coalesce(tb.amount, 0) end" %}
        case
            when l.pricing_mode = 'package' then jsonb_build_array(jsonb_build_object(
                'packages', {{ package_count(pq, 'l.package_size', 'l.rounding') }},
                'package_size', l.package_size,
                'package_price', l.package_price,
                'amount', {{ package_amount(pq, 'l.package_size', 'l.package_price', 'l.rounding') }}
            ) || {{ options }})
            else coalesce(tb.tiers, '[]'::jsonb)
        end
        {#- a row for the maximum spend when it caps the line: it takes A(q) down to the cap #}
        || case when l.max_spend < {{ uncapped }}
                then jsonb_build_array(jsonb_build_object(
                    'max_spend', l.max_spend, 'amount', l.max_spend - ({{ uncapped }})
                ))
                else '[]'::jsonb end
            as tiers,
        l.aggregation,
        l.credited_cents,
        l.credited_days
    from usage_lines as l
    left join tier_breakdown as tb
        on tb.invoice_id = l.invoice_id and tb.segment_start = l.segment_start
       and tb.metric = l.metric and tb.dimension_key = l.dimension_key
    union all
    select
        {{ segment_cols }},
        line_type,
        metric,
        '' as dimension_key,
        '{}'::jsonb as dimensions,
        cast(null as text) as pricing_mode,
        1::numeric as quantity,
        amount_cents,
        '[]'::jsonb as tiers,
        cast(null as text) as aggregation,
        0::bigint as credited_cents,
        0::bigint as credited_days
    from true_ups
)

select
    invoice_id || case
        when line_type = 'base_fee' then '.base'
        when line_type = 'minimum_commitment' then '.minimum_commitment'
        when line_type = 'minimum_spend' then '.minimum_spend.' || metric
        when dimension_key = '' then '.usage.' || metric
        else '.usage.' || metric || '.' || dimension_key
    end || id_suffix as invoice_line_id,
    invoice_id,
    (row_number() over (
        partition by invoice_id
        order by
            segment_start,
            case line_type when 'base_fee' then 0 when 'usage' then 1 when 'minimum_spend' then 2 else 3 end,
            metric,
            dimension_key
    ))::integer as line_number,
    org_id,
    period_start,
    segment_start,
    segment_end,
    plan,
    case
        when line_type = 'usage' then {{ charge_label('metric', 'dimension_key', 'label_suffix') }}
        when line_type = 'minimum_spend' then 'minimum_spend.' || metric || label_suffix
        else line_type || label_suffix
    end as charge_label,
    line_type,
    metric,
    dimension_key,
    dimensions,
    pricing_mode,
    quantity,
    amount_cents::bigint as amount_cents,
    currency,
    tiers,
    aggregation,
    credited_cents::bigint as credited_cents,
    credited_days::integer as credited_days,
    catalog_version
from lines
