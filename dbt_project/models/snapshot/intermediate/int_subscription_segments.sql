{#- A table, not a view: the marts join it per usage row, and a view of window functions is
    planned as a subquery re-run per row (60 days of history: fct_daily_charges 129 s instead
    of 7 s; docs/PERFORMANCE.md). It holds a row per org per affected period per segment. -#}
{{ config(materialized='table') }}
{#-
  The pieces each affected billing period is priced in, per org: the period cut by the
  org's subscriptions and by the catalog versions in force (docs/SUBSCRIPTIONS.md). A
  segment [segment_start, segment_end) has one plan and one catalog version; usage in it is
  priced on them alone (tiers restart per segment), and the plan's base fee and minimum
  commitment are prorated by its days: round_half_up(amount x segment_days / period_days),
  once per segment. Days no subscription covers have no segment and are not billed.
  The error-severity tests here gate every mart (_intermediate__models.yml).
-#}
with subscription_rows as (
    select
        org_id,
        plan,
        starts_on,
        ends_on,
        {#- back to back on the same plan (e.g. two imported terms): one interval, so tiers
            do not restart -#}
        case when lag(ends_on) over w = starts_on and lag(plan) over w = plan then 0 else 1 end
            as starts_island
    from {{ ref('stg_billing__subscriptions') }}
    window w as (partition by org_id order by starts_on)
),

subscriptions as (
    select org_id, plan, min(starts_on) as starts_on, max(ends_on) as ends_on
    from (
        select *, sum(starts_island) over (partition by org_id order by starts_on) as island
        from subscription_rows
    ) as r
    group by org_id, island, plan
),

periods as (
    select
        period_start,
        (period_start + interval '1 month')::date as period_next
    from {{ ref('int_periods_affected') }}
),

pieces as (
    select
        s.org_id,
        p.period_start,
        p.period_next,
        s.plan,
        v.catalog_version,
        greatest(p.period_start, s.starts_on, v.effective_from) as segment_start,
        least(p.period_next, s.ends_on, v.effective_until) as segment_end
    from subscriptions as s
    inner join periods as p
        on s.starts_on < p.period_next and s.ends_on > p.period_start
    inner join {{ ref('stg_billing__catalog_versions_in_force') }} as v
        on v.effective_from < least(p.period_next, s.ends_on)
       and v.effective_until > greatest(p.period_start, s.starts_on)
),

segments as (
    select
        x.*,
        (x.segment_end - x.segment_start) as segment_days,
        (x.period_next - x.period_start) as period_days
    from pieces as x
    where x.segment_start < x.segment_end
)

select
    s.org_id,
    s.period_start,
    (s.period_next - 1) as period_end,
    s.segment_start,
    s.segment_end,
    s.segment_days,
    s.period_days,
    {#- later segments name their start in line ids and Stripe charge labels -#}
    case when s.segment_start = s.period_start then ''
         else ' from ' || to_char(s.segment_start, 'YYYY-MM-DD') end as label_suffix,
    s.plan,
    s.catalog_version,
    o.currency,
    p.currency as plan_currency,
    p.minor_exponent,
    p.base_fee_cents,
    {{ prorate('p.base_fee_cents', 's.segment_days', 's.period_days') }} as prorated_base_fee_cents,
    p.minimum_commitment_cents,
    {{ prorate('p.minimum_commitment_cents', 's.segment_days', 's.period_days') }} as prorated_commitment_cents,
    p.plan is not null as has_known_plan,
    p.plan is not null and p.currency = o.currency as has_matching_currency,
    o.created_at
from segments as s
inner join {{ ref('stg_billing__organizations') }} as o on o.org_id = s.org_id
left join {{ ref('stg_billing__catalog_plans') }} as p
    on p.catalog_version = s.catalog_version and p.plan = s.plan
