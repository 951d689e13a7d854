{{
    config(
        materialized='incremental',
        incremental_strategy='delete_insert',
        engine='MergeTree()',
        order_by='(usage_date, org_id, metric, dimension_key, source, usage_hour)',
        partition_by='toYYYYMM(usage_date)',
        unique_key='usage_date',
        on_schema_change='fail',
    )
}}
{#- unique_key is the replacement unit: each run deletes and re-inserts whole UTC days
    (the days its arrivals touched), so late events re-aggregate exactly their day. -#}
select
    org_id,
    metric,
    dimension_key,
    dimensions,
    source,
    usage_hour,
    usage_date,
    toStartOfMonth(usage_date) as period_start,
    sum(e.quantity) as quantity,
    sumIf(e.quantity, is_billable) as billable_quantity,
    toUInt64(count()) as event_count,
    toUInt64(countIf(e.is_billable)) as billable_event_count,
    max(e.ingested_at) as last_ingested_at
from {{ ref('stg_pg_billing__usage_events') }} as e
group by org_id, metric, dimension_key, dimensions, source, usage_hour, usage_date
