{#- A table of a few rows: every catalog staging view filters by it, and as a view its
    correlated subquery would run for every catalog row looked up. -#}
{{ config(materialized='table') }}
{#-
  Which catalog version prices which days: each activation makes its version the catalog
  from its effective_from on, replacing every older activation from that day (so an
  activation's days end where the first newer one's begin). A version pinned by
  var('catalog_version') prices every day. Without any activation (a catalog synced before
  migration 0150), the current version since always.
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

windows as (
    select
        a.catalog_version,
        a.effective_from,
        coalesce(
            (select min(b.effective_from) from activations as b where b.activation_id > a.activation_id),
            'infinity'::date
        ) as effective_until
    from activations as a
)

select catalog_version, effective_from, effective_until
from windows
where effective_from < effective_until
{%- endif %}
