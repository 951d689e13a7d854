{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key='usage_date',
        on_schema_change='fail',
    )
}}
-- depends_on: {{ ref('stg_billing__usage_events') }}
{#- Incremental: re-aggregate exactly the usage dates touched by the run's arrivals. -#}
{%- set dates = affected_usage_dates(ref('stg_billing__usage_events')) if is_incremental() else none %}

select
    org_id,
    metric,
    usage_date,
    period_start,
    sum(quantity) as quantity,
    count(*) as event_count,
    max(ingested_at) as last_ingested_at
from {{ ref('stg_billing__usage_events') }}
where is_billable
{%- if dates is not none %}
  and {{ on_utc_dates('occurred_at', dates) }}
{%- endif %}
group by org_id, metric, usage_date, period_start
