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

{#- Whether every one of `relations` (sources in Postgres) exists, asked from ClickHouse
    (pg_catalog.pg_tables lists tables whatever the reader's grants): e.g. the published
    snapshot, absent until the postgres target has been built and published once. -#}
{% macro postgres_tables_exist(relations) -%}
    {%- if not execute -%}{{ return(false) }}{%- endif -%}
    {%- set pairs = [] -%}
    {%- for r in relations -%}
        {%- do pairs.append("(schemaname = " ~ ch_quote(r.schema) ~ " and tablename = " ~ ch_quote(r.identifier) ~ ")") -%}
    {%- endfor -%}
    {%- set result = run_query(
        "select count() from " ~ postgres_table({'schema': 'pg_catalog', 'identifier': 'pg_tables'})
        ~ " where " ~ pairs | join(' or ')
    ) -%}
    {{ return(result.columns | length > 0 and result.columns[0].values()[0] | int == relations | length) }}
{%- endmacro %}
