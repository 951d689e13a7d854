{{ config(materialized='ephemeral') }}
-- depends_on: {{ ref('stg_billing__usage_events') }}
{#-
  Billing periods the run must (re)price: the run day's period (catalog or plan changes
  reprice the open month), periods touched by the run's arrivals, and periods whose
  invoices are still drafts (so they turn final on time). A full build prices them all.
  `billing rerate` adds the periods it re-prices (var rerate_periods: 'YYYY-MM-01' days).
-#}
{%- set invoices = adapter.get_relation(this.database, this.schema, 'fct_invoices') if execute else none %}
{%- set full = flags.FULL_REFRESH or invoices is none %}
{%- set dates = [] if full else affected_usage_dates(ref('stg_billing__usage_events')) %}

select distinct period_start
from (
    select date_trunc('month', {{ run_day() }})::date as period_start
    {%- for p in var('rerate_periods', []) %}
    union all
    select date_trunc('month', '{{ p }}'::date)::date
    {%- endfor %}
    {%- if full %}
    union all
    select distinct period_start from {{ ref('int_usage_days_aggregated') }}
    {%- else %}
    {%- for d in dates %}
    union all
    select date_trunc('month', '{{ d }}'::date)::date
    {%- endfor %}
    union all
    select period_start from {{ invoices }} where status = 'draft'
    {%- endif %}
) as p
