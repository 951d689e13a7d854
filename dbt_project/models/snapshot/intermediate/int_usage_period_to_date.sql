{{ config(materialized='ephemeral') }}
{#-
  Q(d) per org, metric, dimension key, subscription segment and day of each affected
  period: the metric's aggregation over the segment's billable events through the end of
  day d (docs/PRICING.md "Aggregations" and "Dimensions", docs/SUBSCRIPTIONS.md "Segments";
  billing.pricing.aggregation is the reference). Each segment starts from zero (tiers
  restart); a time-weighted value held when a segment starts carries into it.
  dimension_key is '' for a metric without dimensions, else the JSON array text of the
  event's values of the metric's dimensions (null for a missing one), so each combination
  is aggregated and priced on its own. Undimensioned sum and count come from the daily
  aggregates; everything else reads the period's events.
  Rows: days with events, and for time_weighted every day from the period's first event
  through the period's end, or through the later of the run day and the last event day
  while the period is open (its Q grows every day), cut to the segment's days.
-#}
with periods as (
    select period_start from {{ ref('int_periods_affected') }}
),

segments as (
    select org_id, period_start, segment_start, segment_end, catalog_version
    from {{ ref('int_subscription_segments') }}
),

metrics as (
    select catalog_version, metric, aggregation, property, dimensions
    from {{ ref('stg_billing__catalog_metrics') }}
),

additive as (
    select
        u.org_id,
        u.metric,
        '' as dimension_key,
        u.period_start,
        s.segment_start,
        u.usage_date,
        coalesce(m.aggregation, 'sum') as aggregation,
        sum(case when m.aggregation = 'count' then u.event_count else u.quantity end) over (
            partition by u.org_id, u.metric, u.period_start, s.segment_start
            order by u.usage_date
            rows between unbounded preceding and current row
        ) as cumulative_quantity
    from {{ ref('int_usage_days_aggregated') }} as u
    inner join segments as s
        on s.org_id = u.org_id and s.period_start = u.period_start
       and u.usage_date >= s.segment_start and u.usage_date < s.segment_end
    left join metrics as m on m.catalog_version = s.catalog_version and m.metric = u.metric
    where u.period_start in (select period_start from periods)
      and coalesce(m.aggregation, 'sum') in ('sum', 'count')
      and coalesce(cardinality(m.dimensions), 0) = 0
),

events as (
    select
        e.org_id,
        e.metric,
        {#- jsonb_build_array per dimension count (the catalog allows at most 5): no
            subquery per event #}
        case cardinality(m.dimensions)
            when 0 then ''
            {%- for n in range(1, 6) %}
            when {{ n }} then jsonb_build_array(
                {%- for i in range(1, n + 1) %}e.properties ->> m.dimensions[{{ i }}]{{ ", " if not loop.last }}{% endfor -%}
            )::text
            {%- endfor %}
        end as dimension_key,
        e.period_start,
        s.segment_start,
        e.usage_date,
        e.occurred_at,
        e.event_id,
        e.quantity,
        m.aggregation,
        case when m.aggregation = 'unique_count' then e.properties ->> m.property end as value
    from {{ ref('stg_billing__usage_events') }} as e
    inner join segments as s
        on s.org_id = e.org_id and s.period_start = e.period_start
       and e.usage_date >= s.segment_start and e.usage_date < s.segment_end
    inner join metrics as m
        on m.catalog_version = s.catalog_version and m.metric = e.metric
       and (m.aggregation not in ('sum', 'count') or cardinality(m.dimensions) > 0)
    where e.is_billable
      and e.period_start in (select period_start from periods)
      {# a range on occurred_at lets Postgres prune the month partitions at run time #}
      and e.occurred_at >= (select min(period_start) from periods)::timestamp at time zone 'UTC'
),

event_days as (
    select
        org_id,
        metric,
        dimension_key,
        period_start,
        segment_start,
        usage_date,
        aggregation,
        sum(quantity) as day_sum,
        count(*) as day_count,
        max(quantity) as day_max,
        (array_agg(quantity order by occurred_at desc, event_id collate "C" desc))[1] as day_latest
    from events
    where aggregation <> 'time_weighted'
    group by org_id, metric, dimension_key, period_start, segment_start, usage_date, aggregation
),

{#- The latest value through d is the latest of the last day with events: rows exist only
    for days with events. -#}
per_day as (
    select
        org_id,
        metric,
        dimension_key,
        period_start,
        segment_start,
        usage_date,
        aggregation,
        case aggregation
            when 'max' then max(day_max) over w
            when 'sum' then sum(day_sum) over w
            when 'count' then sum(day_count) over w
            else day_latest
        end as cumulative_quantity
    from event_days
    where aggregation in ('sum', 'count', 'max', 'latest')
    window w as (
        partition by org_id, metric, dimension_key, period_start, segment_start
        order by usage_date
        rows between unbounded preceding and current row
    )
),

first_seen as (
    select org_id, metric, dimension_key, period_start, segment_start, min(usage_date) as usage_date
    from events
    where aggregation = 'unique_count' and value is not null
    group by org_id, metric, dimension_key, period_start, segment_start, value
),

new_values as (
    select org_id, metric, dimension_key, period_start, segment_start, usage_date, count(*) as new_values
    from first_seen
    group by org_id, metric, dimension_key, period_start, segment_start, usage_date
),

unique_counts as (
    select
        d.org_id,
        d.metric,
        d.dimension_key,
        d.period_start,
        d.segment_start,
        d.usage_date,
        d.aggregation,
        sum(coalesce(n.new_values, 0)) over (
            partition by d.org_id, d.metric, d.dimension_key, d.period_start, d.segment_start
            order by d.usage_date
            rows between unbounded preceding and current row
        )::numeric as cumulative_quantity
    from event_days as d
    left join new_values as n
        on n.org_id = d.org_id and n.metric = d.metric and n.dimension_key = d.dimension_key
       and n.period_start = d.period_start and n.segment_start = d.segment_start
       and n.usage_date = d.usage_date
    where d.aggregation = 'unique_count'
),

held as (
    select
        org_id,
        metric,
        dimension_key,
        period_start,
        occurred_at,
        quantity,
        lead(occurred_at) over (
            partition by org_id, metric, dimension_key, period_start
            order by occurred_at, event_id collate "C"
        ) as next_at
    from events
    where aggregation = 'time_weighted'
),

{#- Every day of the time-weighted span, cut to each segment: a value held when a
    segment starts carries into it (measured from the segment's first instant). -#}
spine as (
    select
        f.org_id,
        f.metric,
        f.dimension_key,
        f.period_start,
        g.segment_start,
        {{ day_start('g.segment_start') }} as segment_from,
        s.day::date as usage_date
    from (
        select
            org_id,
            metric,
            dimension_key,
            period_start,
            min(usage_date) as first_day,
            least(
                greatest({{ run_day() }}, max(usage_date)),
                (period_start + interval '1 month' - interval '1 day')::date
            ) as last_day
        from events
        where aggregation = 'time_weighted'
        group by org_id, metric, dimension_key, period_start
    ) as f
    inner join segments as g
        on g.org_id = f.org_id and g.period_start = f.period_start
       and g.segment_start <= f.last_day and g.segment_end > f.first_day
    cross join lateral generate_series(
        greatest(f.first_day, g.segment_start),
        least(f.last_day, g.segment_end - 1),
        interval '1 day'
    ) as s (day)
),

{#- Σ v × µs held before the end of day d, scaled by 10^9 to an exact integer, then
    rounded half up to 10^-9 quantity-hours: div() on numeric is exact. -#}
time_weighted as (
    select
        s.org_id,
        s.metric,
        s.dimension_key,
        s.period_start,
        s.segment_start,
        s.usage_date,
        'time_weighted' as aggregation,
        div(
            2 * sum(
                h.quantity * 1000000000
                * extract(epoch from (
                    least(coalesce(h.next_at, {{ day_end('s.usage_date') }}), {{ day_end('s.usage_date') }})
                    - greatest(h.occurred_at, s.segment_from)
                )) * 1000000
            ) + 3600000000,
            7200000000
        ) * 0.000000001 as cumulative_quantity
    from spine as s
    inner join held as h
        on h.org_id = s.org_id and h.metric = s.metric and h.dimension_key = s.dimension_key
       and h.period_start = s.period_start
       and h.occurred_at < {{ day_end('s.usage_date') }}
       and (h.next_at is null or h.next_at > s.segment_from)
    group by s.org_id, s.metric, s.dimension_key, s.period_start, s.segment_start, s.usage_date
)

{%- set columns = 'org_id, metric, dimension_key, period_start, segment_start, usage_date, aggregation, cumulative_quantity' %}
select {{ columns }} from additive
union all
select {{ columns }} from per_day
union all
select {{ columns }} from unique_counts
union all
select {{ columns }} from time_weighted
