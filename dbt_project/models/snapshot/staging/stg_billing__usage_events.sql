select
    event_id,
    org_id,
    metric,
    quantity,
    occurred_at,
    (occurred_at at time zone 'UTC')::date as usage_date,
    date_trunc('month', occurred_at at time zone 'UTC')::date as period_start,
    billable as is_billable,
    source,
    properties,
    arrival_day,
    ingested_at
from {{ source('billing', 'usage_events') }}
