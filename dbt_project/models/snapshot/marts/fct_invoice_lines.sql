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
  Invoices exist for every org that had billable usage in the period or existed by its
  end. Lines: the base fee, then one per metric the plan prices or the org used, with
  amount_cents = C(last day) from fct_daily_charges.
-#}
with periods as (
    select
        period_start,
        (period_start + interval '1 month' - interval '1 day')::date as period_end
    from {{ ref('int_periods_affected') }}
),

month_usage as (
    select distinct on (org_id, metric, period_start)
        org_id,
        metric,
        period_start,
        cumulative_quantity as quantity,
        cumulative_amount as exact_amount,
        cumulative_charge_cents as amount_cents
    from {{ ref('fct_daily_charges') }}
    where period_start in (select period_start from periods)
    order by org_id, metric, period_start, usage_date desc
),

{#- The days whose charge was negative (a cheaper volume tier, a latest value that fell):
    Stripe has them as credit items, and the PDF names their sum. -#}
month_credits as (
    select
        org_id,
        metric,
        period_start,
        sum(daily_charge_cents) as credited_cents,
        count(*) as credited_days
    from {{ ref('fct_daily_charges') }}
    where period_start in (select period_start from periods)
      and daily_charge_cents < 0
    group by org_id, metric, period_start
),

invoices as (
    select
        {{ invoice_id('o.org_id', 'p.period_start') }} as invoice_id,
        o.org_id,
        p.period_start,
        o.plan,
        o.currency,
        o.base_fee_cents,
        o.catalog_version
    from {{ ref('int_orgs_priced') }} as o
    cross join periods as p
    where (o.created_at at time zone 'UTC')::date <= p.period_end
       or exists (
           select 1 from month_usage as u
           where u.org_id = o.org_id and u.period_start = p.period_start
       )
),

invoice_metrics as (
    select i.invoice_id, pm.metric
    from invoices as i
    inner join {{ ref('stg_billing__catalog_plan_metrics') }} as pm on pm.plan = i.plan
    union
    select i.invoice_id, u.metric
    from invoices as i
    inner join month_usage as u on u.org_id = i.org_id and u.period_start = i.period_start
),

usage_lines as (
    select
        i.invoice_id,
        i.org_id,
        i.period_start,
        i.plan,
        i.currency,
        i.catalog_version,
        im.metric,
        pm.pricing_mode,
        coalesce(u.quantity, 0) as quantity,
        coalesce(u.exact_amount, 0) as exact_amount,
        coalesce(u.amount_cents, 0) as amount_cents,
        coalesce(m.aggregation, 'sum') as aggregation,
        coalesce(c.credited_cents, 0) as credited_cents,
        coalesce(c.credited_days, 0) as credited_days,
        pm.package_size,
        pm.package_price
    from invoice_metrics as im
    inner join invoices as i on i.invoice_id = im.invoice_id
    left join month_usage as u
        on u.org_id = i.org_id and u.period_start = i.period_start and u.metric = im.metric
    left join month_credits as c
        on c.org_id = i.org_id and c.period_start = i.period_start and c.metric = im.metric
    left join {{ ref('stg_billing__catalog_metrics') }} as m on m.metric = im.metric
    left join {{ ref('stg_billing__catalog_plan_metrics') }} as pm
        on pm.plan = i.plan and pm.metric = im.metric
),

tier_breakdown as (
    select
        l.invoice_id,
        l.metric,
        jsonb_agg(
            jsonb_build_object(
                'tier', t.tier_index + 1,
                'from', t.lower_bound,
                'up_to', t.up_to,
                'unit_price', t.unit_price,
                'flat_amount', t.flat_amount,
                'quantity', {{ tier_quantity('l.pricing_mode', 'l.quantity', 't.lower_bound', 't.up_to') }},
                'amount', {{ tier_amount('l.pricing_mode', 'l.quantity', 't.lower_bound', 't.up_to', 't.unit_price', 't.flat_amount') }}
            )
            order by t.tier_index
        ) filter (
            where {{ tier_quantity('l.pricing_mode', 'l.quantity', 't.lower_bound', 't.up_to') }} > 0
        ) as tiers
    from usage_lines as l
    inner join {{ ref('stg_billing__catalog_plan_tiers') }} as t
        on t.plan = l.plan and t.metric = l.metric
    group by l.invoice_id, l.metric
),

lines as (
    select
        invoice_id,
        org_id,
        period_start,
        currency,
        catalog_version,
        'base_fee' as line_type,
        cast(null as text) as metric,
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
        l.invoice_id,
        l.org_id,
        l.period_start,
        l.currency,
        l.catalog_version,
        'usage' as line_type,
        l.metric,
        l.pricing_mode,
        l.quantity,
        l.amount_cents,
        case
            when l.pricing_mode = 'package' then jsonb_build_array(jsonb_build_object(
                'packages', {{ package_count('l.quantity', 'l.package_size') }},
                'package_size', l.package_size,
                'package_price', l.package_price,
                'amount', l.exact_amount
            ))
            else coalesce(tb.tiers, '[]'::jsonb)
        end as tiers,
        l.aggregation,
        l.credited_cents,
        l.credited_days
    from usage_lines as l
    left join tier_breakdown as tb on tb.invoice_id = l.invoice_id and tb.metric = l.metric
)

select
    invoice_id || case when line_type = 'base_fee' then '.base' else '.usage.' || metric end
        as invoice_line_id,
    invoice_id,
    (row_number() over (
        partition by invoice_id order by line_type = 'usage', metric
    ))::integer as line_number,
    org_id,
    period_start,
    line_type,
    metric,
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
