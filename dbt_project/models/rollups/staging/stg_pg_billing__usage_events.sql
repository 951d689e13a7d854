{%- set pg_table = postgres_table(source('pg_billing', 'usage_events')) %}
{%- set dates = rollup_usage_dates(pg_table) %}

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
where {{ ch_on_utc_dates('occurred_at', dates) }}
{%- endif %}
