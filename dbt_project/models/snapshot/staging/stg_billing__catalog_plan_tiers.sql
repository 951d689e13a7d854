select
    catalog_version,
    plan,
    metric,
    price_key,
    tier_index,
    lower_bound,
    up_to,
    unit_price,
    block_size,
    block_price,
    flat_amount
from {{ source('billing', 'catalog_plan_tiers') }}
where catalog_version in (select catalog_version from {{ ref('stg_billing__catalog_versions_in_force') }})
