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
