{{
    config(
        materialized='incremental',
        incremental_strategy='delete_insert',
        engine='MergeTree()',
        order_by='(period_start, org_id, metric, dimension_key)',
        partition_by='toYear(period_start)',
        unique_key='period_start',
        on_schema_change='fail',
    )
}}
{#- Replaces the months the run touched (all orgs), re-summed from the daily rollup. #}
-- depends_on: {{ ref('stg_pg_billing__usage_events') }}
select
    org_id,
    metric,
    dimension_key,
    dimensions,
    period_start,
    sum(d.quantity) as quantity,
    sum(d.billable_quantity) as billable_quantity,
    sum(d.event_count) as event_count,
    sum(d.billable_event_count) as billable_event_count,
    toUInt32(uniqExact(d.usage_date)) as active_days,
    max(d.last_ingested_at) as last_ingested_at
from {{ ref('fct_usage_daily') }} as d
{%- if is_incremental() %}
where period_start in (
    select distinct toStartOfMonth(usage_date) from {{ ref('stg_pg_billing__usage_events') }}
)
{%- endif %}
group by org_id, metric, dimension_key, dimensions, period_start
