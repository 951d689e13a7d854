{#-
  ClickHouse reads Postgres through the postgresql() table function with a named collection
  (BILLING_DBT_PG_COLLECTION, default billing_postgres) that holds host, port, database, user
  and password. The compiled SQL, manifest.json and run_results.json therefore name the
  collection and hold no credentials. Embedded chDB: billing.transform creates it for each
  dbt command and drops it after; a ClickHouse server: an admin provisions it
  (docs/ANALYSTS.md). The staging model stays ephemeral, not a view over Postgres.
-#}
{% macro ch_quote(value) -%}
    '{{ value | replace("\\", "\\\\") | replace("'", "\\'") }}'
{%- endmacro %}

{% macro postgres_table(relation) -%}
    postgresql(
        {{ env_var('BILLING_DBT_PG_COLLECTION', 'billing_postgres') }},
        schema = {{ ch_quote(relation.schema) }},
        table = {{ ch_quote(relation.identifier) }}
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
