{{
    config(
        materialized='incremental',
        incremental_strategy='delete_insert',
        engine='MergeTree()',
        order_by='(usage_date, org_id, metric, dimension_key, source)',
        partition_by='toYYYYMM(usage_date)',
        unique_key='usage_date',
        on_schema_change='fail',
    )
}}
-- depends_on: {{ ref('stg_pg_billing__usage_events') }}
select
    org_id,
    metric,
    dimension_key,
    dimensions,
    source,
    usage_date,
    period_start,
    sum(h.quantity) as quantity,
    sum(h.billable_quantity) as billable_quantity,
    sum(h.event_count) as event_count,
    sum(h.billable_event_count) as billable_event_count,
    max(h.last_ingested_at) as last_ingested_at
from {{ ref('fct_usage_hourly') }} as h
{%- if is_incremental() %}
where usage_date in (select distinct usage_date from {{ ref('stg_pg_billing__usage_events') }})
{%- endif %}
group by org_id, metric, dimension_key, dimensions, source, usage_date, period_start
