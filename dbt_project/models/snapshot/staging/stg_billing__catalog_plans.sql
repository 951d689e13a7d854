select
    catalog_version,
    plan,
    currency,
    base_fee,
    base_fee_cents,
    minor_exponent,
    minimum_commitment_cents
from {{ source('billing', 'catalog_plans') }}
where {{ catalog_version_filter('catalog_version', source('billing', 'catalog_versions')) }}
