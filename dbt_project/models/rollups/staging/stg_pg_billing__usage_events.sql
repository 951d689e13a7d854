{%- set pg_table = postgres_table(source('pg_billing', 'usage_events')) %}
{#- None means "everything": the first build or --full-refresh. -#}
{%- set hourly = adapter.get_relation(database=none, schema=target.schema, identifier='fct_usage_hourly') if execute else none %}
{%- set dates = none if (flags.FULL_REFRESH or hourly is none) else affected_usage_dates(pg_table, billable_only=false) %}

select
    e.event_id,
    e.org_id,
    e.metric,
    e.quantity,
    e.occurred_at,
    toDate(e.occurred_at, 'UTC') as usage_date,
    toStartOfHour(e.occurred_at, 'UTC') as usage_hour,
    e.billable = 1 as is_billable,
    coalesce(e.source, 'unknown') as source,
    {{ ch_dimension_key('e.dimension_values') }} as dimension_key,
    mapFromArrays(e.dimension_names, e.dimension_values) as dimensions,
    e.arrival_day,
    e.ingested_at
from (
    {#- The metric's dimensions in the current catalog version (or the pinned one), as the
        Postgres snapshot prices them: the key is int_usage_period_to_date's, byte for byte
        (macros/dimensions_in_clickhouse.sql). -#}
    select
        ev.*,
        m.dimensions as dimension_names,
        {{ ch_jsonb_values("coalesce(ev.properties, '{}')", 'm.dimensions') }} as dimension_values
    from (
        select
            event_id, org_id, metric, quantity, occurred_at, billable, source, properties,
            arrival_day, ingested_at
        from {{ pg_table }}
        {%- if dates is not none %}
        where {{ on_utc_dates('occurred_at', dates) }}
        {%- endif %}
    ) as ev
    left join (
        select metric, dimensions
        from {{ postgres_table(source('pg_billing', 'catalog_metrics')) }}
        where {{ catalog_version_filter('catalog_version', postgres_table(source('pg_billing', 'catalog_versions'))) }}
    ) as m on m.metric = ev.metric
) as e
