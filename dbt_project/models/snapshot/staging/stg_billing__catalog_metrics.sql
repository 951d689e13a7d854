select
    catalog_version,
    metric,
    unit,
    description
from {{ source('billing', 'catalog_metrics') }}
where {{ catalog_version_filter('catalog_version', source('billing', 'catalog_versions')) }}
