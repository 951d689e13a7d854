{%- set pg_table = postgres_table(source('pg_billing', 'usage_events')) %}
{#- None means "everything": the first build or --full-refresh. -#}
{%- set hourly = adapter.get_relation(database=none, schema=target.schema, identifier='fct_usage_hourly') if execute else none %}
{%- set dates = none if (flags.FULL_REFRESH or hourly is none) else affected_usage_dates(pg_table, billable_only=false) %}

select
    event_id,
    org_id,
    metric,
    quantity,
    occurred_at,
    toDate(occurred_at, 'UTC') as usage_date,
    toStartOfHour(occurred_at, 'UTC') as usage_hour,
    billable = 1 as is_billable,
    coalesce(source, 'unknown') as source,
    arrival_day,
    ingested_at
from {{ pg_table }}
{%- if dates is not none %}
where {{ on_utc_dates('occurred_at', dates) }}
{%- endif %}
