select
    catalog_version,
    plan,
    metric,
    mode as pricing_mode,
    package_size,
    package_price
from {{ source('billing', 'catalog_plan_metrics') }}
where {{ catalog_version_filter('catalog_version', source('billing', 'catalog_versions')) }}
