{#-
  Which catalog version prices which days: each activation is in force from its
  effective_from until the next later-dated one (of two from one date, the later activation
  wins). A version pinned by var('catalog_version') prices every day. Without any
  activation (a catalog synced before migration 0150), the current version since always.
-#}
{%- if var("catalog_version") %}
select
    '{{ var("catalog_version") }}'::text as catalog_version,
    '-infinity'::date as effective_from,
    'infinity'::date as effective_until
{%- else %}
with activations as (
    select catalog_version, effective_from, activation_id
    from {{ source('billing', 'catalog_activations') }}
    union all
    select catalog_version, '-infinity'::date, 0
    from {{ source('billing', 'catalog_versions') }}
    where is_current
      and not exists (select 1 from {{ source('billing', 'catalog_activations') }})
),

winners as (
    select distinct on (effective_from) catalog_version, effective_from
    from activations
    order by effective_from, activation_id desc
)

select
    catalog_version,
    effective_from,
    coalesce(lead(effective_from) over (order by effective_from), 'infinity'::date) as effective_until
from winners
{%- endif %}
