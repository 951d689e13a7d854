{#-
  ClickHouse reads Postgres through the postgresql() table function. Credentials come
  from the environment (billing.transform fills them from the billing_postgres
  connection), never from the repo; they do end up in target/ (gitignored) and in the
  ClickHouse query log, which is why the staging model is ephemeral, not a view.
-#}
{% macro ch_quote(value) -%}
    '{{ value | replace("\\", "\\\\") | replace("'", "\\'") }}'
{%- endmacro %}

{% macro postgres_table(relation) -%}
    postgresql(
        {{ ch_quote(env_var('BILLING_DBT_PG_FROM_CH_HOST', '127.0.0.1') ~ ':' ~ env_var('BILLING_DBT_PG_PORT', '5432')) }},
        {{ ch_quote(env_var('BILLING_DBT_PG_DBNAME', 'billing')) }},
        {{ ch_quote(relation.identifier) }},
        {{ ch_quote(env_var('BILLING_DBT_PG_USER', 'billing')) }},
        {{ ch_quote(env_var('BILLING_DBT_PG_PASSWORD', '')) }},
        {{ ch_quote(relation.schema) }}
    )
{%- endmacro %}

{#-
  The UTC dates the run must re-aggregate: days having events that arrived in the run's
  window. None means "everything" (first build or --full-refresh). The filters are plain
  column-vs-literal comparisons so ClickHouse pushes them down to Postgres.
-#}
{% macro rollup_usage_dates(pg_table) -%}
    {%- if not execute -%}{{ return(none) }}{%- endif -%}
    {%- set hourly = adapter.get_relation(database=none, schema=target.schema, identifier='fct_usage_hourly') -%}
    {%- if flags.FULL_REFRESH or hourly is none -%}{{ return(none) }}{%- endif -%}
    {%- set since = var('since') or var('day') -%}
    {%- set floor = (modules.datetime.date.fromisoformat(since) - modules.datetime.timedelta(days=var('lateness_days') | int + 1)).isoformat() -%}
    {%- set query -%}
        select distinct toString(toDate(occurred_at, 'UTC')) as usage_date
        from {{ pg_table }}
        where arrival_day >= '{{ since }}' and arrival_day <= '{{ var("day") }}'
          and occurred_at >= '{{ floor }} 00:00:00+00'
        order by usage_date
    {%- endset -%}
    {%- set result = run_query(query) -%}
    {#- An empty result over chDB comes back without columns: no arrivals, no dates. -#}
    {%- if result.columns | length == 0 -%}{{ return([]) }}{%- endif -%}
    {{ return(result.columns[0].values() | list) }}
{%- endmacro %}

{% macro ch_on_utc_dates(column, dates) -%}
    {%- if dates | length == 0 -%} 0 {%- else -%}
    ({% for d in dates %}({{ column }} >= '{{ d }} 00:00:00+00' and {{ column }} < '{{ (modules.datetime.date.fromisoformat(d) + modules.datetime.timedelta(days=1)).isoformat() }} 00:00:00+00'){% if not loop.last %} or {% endif %}{% endfor %})
    {%- endif -%}
{%- endmacro %}
