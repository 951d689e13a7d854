{#- The run's data interval: arrivals from `since` through `day` (inclusive, UTC dates). -#}
{% macro run_day() -%}
    '{{ var("day") }}'::date
{%- endmacro %}

{% macro window_since() -%}
    '{{ var("since") or var("day") }}'::date
{%- endmacro %}

{#- The catalog version to price with: the pinned var, else the current one. -#}
{% macro catalog_version_filter(version_column, versions_relation) -%}
    {%- if var("catalog_version") -%}
        {{ version_column }} = '{{ var("catalog_version") }}'
    {%- else -%}
        {{ version_column }} = (select catalog_version from {{ versions_relation }} where is_current)
    {%- endif -%}
{%- endmacro %}

{#- Usage dates touched by the run: days having billable events that arrived in the window
    (non-billable ones change no charge). Bounded
    by the lateness limit so Postgres prunes month partitions instead of scanning history. -#}
{% macro affected_usage_dates_sql(events_relation) -%}
    select distinct (occurred_at at time zone 'UTC')::date as usage_date
    from {{ events_relation }}
    where arrival_day between {{ window_since() }} and {{ run_day() }}
      and is_billable
      and occurred_at >= ({{ window_since() }} - {{ var("lateness_days") | int }} - 1)::timestamp at time zone 'UTC'
{%- endmacro %}

{% macro affected_usage_dates(events_relation) -%}
    {%- if not execute -%}{{ return([]) }}{%- endif -%}
    {%- set rows = run_query(affected_usage_dates_sql(events_relation) ~ " order by 1") -%}
    {{ return(rows.columns[0].values() | map('string') | list) }}
{%- endmacro %}

{#- SQL predicate: `column` (timestamptz) falls on one of `dates` (UTC). -#}
{% macro on_utc_dates(column, dates) -%}
    {%- if dates | length == 0 -%} false {%- else -%}
    ({% for d in dates %}({{ column }} >= '{{ d }} 00:00:00+00'::timestamptz and {{ column }} < '{{ d }} 00:00:00+00'::timestamptz + interval '1 day'){% if not loop.last %} or {% endif %}{% endfor %})
    {%- endif -%}
{%- endmacro %}

{#- Stable, URL-safe invoice id: org ids are [A-Za-z0-9_.-] and the period is a fixed 6
    digits at the end, so `inv_<org>_<yyyymm>` is unique and readable. -#}
{% macro invoice_id(org_id, period_start) -%}
    'inv_' || {{ org_id }} || '_' || to_char({{ period_start }}, 'YYYYMM')
{%- endmacro %}
