select
    catalog_version,
    plan,
    currency,
    base_fee,
    base_fee_cents,
    minor_exponent
from {{ source('billing', 'catalog_plans') }}
where {{ catalog_version_filter('catalog_version', source('billing', 'catalog_versions')) }}
