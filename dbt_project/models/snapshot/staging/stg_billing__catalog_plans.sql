select
    catalog_version,
    plan,
    currency,
    base_fee,
    base_fee_cents,
    minor_exponent,
    minimum_commitment_cents
from {{ source('billing', 'catalog_plans') }}
where catalog_version in (select catalog_version from {{ ref('stg_billing__catalog_versions_in_force') }})
