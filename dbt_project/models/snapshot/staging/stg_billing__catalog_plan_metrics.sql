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
where catalog_version in (select catalog_version from {{ ref('stg_billing__catalog_versions_in_force') }})
