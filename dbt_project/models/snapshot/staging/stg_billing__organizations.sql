select
    org_id,
    name as org_name,
    email,
    plan,
    lower(currency) as currency,
    created_at,
    updated_at
from {{ source('billing', 'organizations') }}
