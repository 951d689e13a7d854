select
    catalog_version,
    metric,
    unit,
    description,
    aggregation,
    property,
    dimensions
from {{ source('billing', 'catalog_metrics') }}
where {{ catalog_version_filter('catalog_version', source('billing', 'catalog_versions')) }}
