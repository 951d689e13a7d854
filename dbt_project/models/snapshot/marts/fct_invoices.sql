{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key='period_start',
        on_schema_change='fail',
        indexes=[{'columns': ['org_id', 'period_start'], 'unique': true}],
    )
}}
{#- One row per org per period, summed from its lines; snapshot_hash changes whenever
    anything the customer sees changes, so it serves as the ETag. -#}
with periods as (
    select period_start from {{ ref('int_periods_affected') }}
),

lines as (
    select *
    from {{ ref('fct_invoice_lines') }}
    where period_start in (select period_start from periods)
),

invoices as (
    select
        invoice_id,
        org_id,
        period_start,
        min(currency) as currency,
        {#- the plan and catalog version of the period's last segment -#}
        (array_agg(plan order by segment_start desc))[1] as plan,
        (array_agg(catalog_version order by segment_start desc))[1] as catalog_version,
        sum(amount_cents) filter (where line_type = 'base_fee') as base_fee_cents,
        -- usage lines and their true-ups (minimum spend and commitment)
        coalesce(sum(amount_cents) filter (where line_type <> 'base_fee'), 0) as usage_cents,
        sum(amount_cents) as total_cents,
        count(*) as line_count,
        string_agg(
            line_type || ':' || coalesce(metric, '') || dimension_key
                -- a later segment's start, and its plan (invoices of one segment keep their hash)
                || case when segment_start <> period_start
                        then '@' || segment_start::text || ':' || plan else '' end
                || ':' || quantity::text || ':' || amount_cents::text
                -- credits only when there are some: invoices without keep their hash
                || case when credited_days > 0
                        then ':' || credited_cents::text || ':' || credited_days::text else '' end,
            '|' order by line_number
        ) as lines_text
    from lines
    group by invoice_id, org_id, period_start
),

stated as (
    select
        i.*,
        (i.period_start + interval '1 month' - interval '1 day')::date as period_end,
        case
            when {{ run_day() }} > (i.period_start + interval '1 month' - interval '1 day')::date
                                   + {{ var('invoice_grace_days') | int }}
                then 'final'
            else 'draft'
        end as status
    from invoices as i
)

select
    invoice_id::text as invoice_id,
    org_id::text as org_id,
    to_char(period_start, 'YYYY-MM') as period,
    period_start::date as period_start,
    period_end::date as period_end,
    plan::text as plan,
    currency::text as currency,
    base_fee_cents::bigint as base_fee_cents,
    usage_cents::bigint as usage_cents,
    total_cents::bigint as total_cents,
    line_count::integer as line_count,
    status::text as status,
    catalog_version::text as catalog_version,
    md5(concat_ws('#', invoice_id, currency, plan, status, catalog_version, total_cents::text, lines_text))::text
        as snapshot_hash,
    {{ run_day() }} as as_of_day
from stated
