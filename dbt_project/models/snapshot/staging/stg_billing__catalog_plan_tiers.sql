select
    catalog_version,
    plan,
    metric,
    tier_index,
    lower_bound,
    up_to,
    unit_price,
    flat_amount
from {{ source('billing', 'catalog_plan_tiers') }}
where {{ catalog_version_filter('catalog_version', source('billing', 'catalog_versions')) }}
