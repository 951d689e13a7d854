-- Each organisation with its plan's terms from the current catalog. has_known_plan and
-- has_matching_currency gate the marts (tests in _intermediate__models.yml).
select
    o.org_id,
    o.plan,
    o.currency,
    p.currency as plan_currency,
    p.base_fee_cents,
    p.minor_exponent,
    p.catalog_version,
    p.minimum_commitment_cents,
    p.plan is not null as has_known_plan,
    p.plan is not null and p.currency = o.currency as has_matching_currency,
    o.created_at
from {{ ref('stg_billing__organizations') }} as o
left join {{ ref('stg_billing__catalog_plans') }} as p
    on p.plan = o.plan
