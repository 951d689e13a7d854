{%- set lines = source('pg_billing_snapshot', 'fct_invoice_lines') %}
{%- set invoices = source('pg_billing_snapshot', 'fct_invoices') %}
{%- set events = postgres_table(source('pg_billing', 'usage_events')) %}
{%- set published = postgres_tables_exist([lines, invoices]) %}
{%- set charges = adapter.get_relation(database=none, schema=target.schema, identifier='fct_charges_monthly') if execute else none %}
{#- The periods the run re-copies, as the Postgres snapshot re-prices them
    (int_periods_affected): the run day's period, the periods of the events that arrived
    in the run's window, and the periods whose invoices are still drafts. None means
    "every period": the first build or --full-refresh. -#}
{%- set periods = none %}
{%- if execute and published and not (flags.FULL_REFRESH or charges is none) %}
    {%- set periods = [modules.datetime.date.fromisoformat(var('day')).replace(day=1).isoformat()] %}
    {%- for d in affected_usage_dates(events, billable_only=false) %}
        {%- do periods.append(modules.datetime.date.fromisoformat(d).replace(day=1).isoformat()) %}
    {%- endfor %}
    {%- set drafts = run_query("select distinct toString(period_start) from " ~ postgres_table(invoices) ~ " where status = 'draft'") %}
    {%- if drafts.columns | length > 0 %}
        {%- do periods.extend(drafts.columns[0].values() | map('string')) %}
    {%- endif %}
    {%- set periods = periods | unique | sort %}
{%- endif %}
{%- if execute and not published %}
    {%- do log("fct_charges_monthly: no published invoice snapshot in Postgres schema " ~ lines.schema ~ " yet (build the postgres target first): no charges copied", info=true) %}
{%- endif %}

{%- if published %}
select
    invoice_line_id,
    invoice_id,
    org_id,
    toDate(period_start) as period_start,
    toDate(segment_start) as segment_start,
    line_type,
    coalesce(metric, '') as metric,
    dimension_key,
    JSONExtract(coalesce(dimensions, '{}'), 'Map(String, Nullable(String))') as dimensions,
    aggregation,
    toDecimal128(quantity, 19) as quantity,
    toInt64(amount_cents) as amount_cents,
    currency,
    catalog_version
from (
    {#- a plain column-vs-literal filter: ClickHouse pushes it down to Postgres #}
    select
        invoice_line_id, invoice_id, org_id, period_start, segment_start, line_type, metric,
        dimension_key, dimensions, aggregation, quantity, amount_cents, currency, catalog_version
    from {{ postgres_table(lines) }}
    {%- if periods is not none %}
    where period_start in ('{{ periods | join("', '") }}')
    {%- endif %}
) as l
{%- else %}
{#- Same columns, no rows. -#}
select
    '' as invoice_line_id,
    '' as invoice_id,
    '' as org_id,
    toDate('1970-01-01') as period_start,
    toDate('1970-01-01') as segment_start,
    '' as line_type,
    '' as metric,
    '' as dimension_key,
    map()::Map(String, Nullable(String)) as dimensions,
    cast(null as Nullable(String)) as aggregation,
    toDecimal128(0, 19) as quantity,
    toInt64(0) as amount_cents,
    '' as currency,
    '' as catalog_version
where 0
{%- endif %}
