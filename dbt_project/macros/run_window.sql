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

{#- Usage dates touched by the run, as 'YYYY-MM-DD' strings: UTC days of the events in
    `events_relation` that arrived in the run's window (billable ones only unless told
    otherwise: non-billable events change no charge). Bounded by the lateness limit so
    Postgres prunes month partitions instead of scanning history. -#}
{% macro affected_usage_dates(events_relation, billable_only=true) -%}
    {%- if not execute -%}{{ return([]) }}{%- endif -%}
    {%- set result = run_query(affected_usage_dates_sql(events_relation, billable_only) ~ " order by 1") -%}
    {#- An empty result over chDB comes back without columns: no arrivals, no dates. -#}
    {%- if result.columns | length == 0 -%}{{ return([]) }}{%- endif -%}
    {{ return(result.columns[0].values() | map('string') | list) }}
{%- endmacro %}

{#- The earliest usage date an arrival in the window can carry (ingest refuses older). -#}
{% macro usage_dates_floor() -%}
    {{ return((modules.datetime.date.fromisoformat(var("since") or var("day")) - modules.datetime.timedelta(days=var("lateness_days") | int + 1)).isoformat()) }}
{%- endmacro %}

{% macro affected_usage_dates_sql(events_relation, billable_only) -%}
    {{ return(adapter.dispatch('affected_usage_dates_sql', 'billing')(events_relation, billable_only)) }}
{%- endmacro %}

{% macro postgres__affected_usage_dates_sql(events_relation, billable_only) -%}
    select distinct (occurred_at at time zone 'UTC')::date as usage_date
    from {{ events_relation }}
    where arrival_day between {{ window_since() }} and {{ run_day() }}
      {%- if billable_only %}
      and is_billable
      {%- endif %}
      and occurred_at >= '{{ usage_dates_floor() }} 00:00:00+00'::timestamptz
{%- endmacro %}

{#- ClickHouse reads the raw Postgres rows (postgres_table()): plain column-vs-literal
    comparisons, so it pushes the filters down to Postgres. -#}
{% macro clickhouse__affected_usage_dates_sql(events_relation, billable_only) -%}
    select distinct toString(toDate(occurred_at, 'UTC')) as usage_date
    from {{ events_relation }}
    where arrival_day >= '{{ var("since") or var("day") }}' and arrival_day <= '{{ var("day") }}'
      {%- if billable_only %}
      and billable
      {%- endif %}
      and occurred_at >= '{{ usage_dates_floor() }} 00:00:00+00'
{%- endmacro %}

{#- SQL predicate: `column` (a UTC timestamp) falls on one of `dates`. -#}
{% macro on_utc_dates(column, dates) -%}
    {{ return(adapter.dispatch('on_utc_dates', 'billing')(column, dates)) }}
{%- endmacro %}

{% macro postgres__on_utc_dates(column, dates) -%}
    {%- if dates | length == 0 -%} false {%- else -%}
    ({% for d in dates %}({{ column }} >= '{{ d }} 00:00:00+00'::timestamptz and {{ column }} < '{{ d }} 00:00:00+00'::timestamptz + interval '1 day'){% if not loop.last %} or {% endif %}{% endfor %})
    {%- endif -%}
{%- endmacro %}

{% macro clickhouse__on_utc_dates(column, dates) -%}
    {%- if dates | length == 0 -%} 0 {%- else -%}
    ({% for d in dates %}({{ column }} >= '{{ d }} 00:00:00+00' and {{ column }} < '{{ (modules.datetime.date.fromisoformat(d) + modules.datetime.timedelta(days=1)).isoformat() }} 00:00:00+00'){% if not loop.last %} or {% endif %}{% endfor %})
    {%- endif -%}
{%- endmacro %}

{#- Stable, URL-safe invoice id: org ids are [A-Za-z0-9_.-] and the period is a fixed 6
    digits at the end, so `inv_<org>_<yyyymm>` is unique and readable. -#}
{% macro invoice_id(org_id, period_start) -%}
    'inv_' || {{ org_id }} || '_' || to_char({{ period_start }}, 'YYYYMM')
{%- endmacro %}

{#- The end of UTC day `day_expr` (a date): the next day's midnight as a timestamptz. -#}
{% macro day_end(day_expr) -%}
    (({{ day_expr }}) + 1)::timestamp at time zone 'UTC'
{%- endmacro %}

{#- The first instant of a UTC day, as timestamptz. -#}
{% macro day_start(day_expr) -%}
    ({{ day_expr }})::timestamp at time zone 'UTC'
{%- endmacro %}

{#- A charge's label (billing.pricing.charge_label): the metric, its dimension key when it
    has one, and the segment's " from YYYY-MM-DD" when the segment starts after the period;
    it names the Stripe items (metadata.metric) and the reconciliation's lines. -#}
{% macro charge_label(metric, dimension_key, label_suffix) -%}
    {{ metric }} || case when {{ dimension_key }} <> '' then ' ' || {{ dimension_key }} else '' end
        || {{ label_suffix }}
{%- endmacro %}
