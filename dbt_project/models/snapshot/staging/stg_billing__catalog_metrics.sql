select
    catalog_version,
    metric,
    unit,
    description,
    aggregation,
    property,
    dimensions
from {{ source('billing', 'catalog_metrics') }}
where catalog_version in (select catalog_version from {{ ref('stg_billing__catalog_versions_in_force') }})
