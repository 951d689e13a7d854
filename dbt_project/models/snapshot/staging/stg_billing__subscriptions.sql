-- An org's plan over time: [starts_on, ends_on) in UTC days; '-infinity' / 'infinity' for
-- since always / open (docs/SUBSCRIPTIONS.md).
select
    subscription_id,
    org_id,
    plan,
    case when starts_at = '-infinity' then '-infinity'::date
         else (starts_at at time zone 'UTC')::date end as starts_on,
    case when ends_at is null then 'infinity'::date
         else (ends_at at time zone 'UTC')::date end as ends_on
from {{ source('billing', 'subscriptions') }}
