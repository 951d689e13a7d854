select
    catalog_version,
    plan,
    metric,
    price_key,
    mode as pricing_mode,
    package_size,
    package_price,
    min_spend_cents,
    rounding,
    free_units,
    max_spend
from {{ source('billing', 'catalog_plan_metrics') }}
where {{ catalog_version_filter('catalog_version', source('billing', 'catalog_versions')) }}
