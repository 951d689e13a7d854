{{
    config(
        materialized='incremental',
        incremental_strategy='delete_insert',
        engine='MergeTree()',
        order_by='(period_start, org_id, metric, dimension_key, line_type)',
        partition_by='toYear(period_start)',
        unique_key='period_start',
        on_schema_change='fail',
    )
}}
{#- The published invoice lines of the periods the run touched (all of them on the first
    build or --full-refresh), replacing those periods whole. -#}
select
    org_id,
    metric,
    dimension_key,
    dimensions,
    period_start,
    segment_start,
    line_type,
    quantity,
    amount_cents,
    currency,
    aggregation,
    invoice_id,
    invoice_line_id,
    catalog_version
from {{ ref('stg_pg_billing_snapshot__invoice_lines') }}
