{#- Every invoice's total equals the sum of its lines (jaffle-shop style arithmetic rule). -#}
{% test invoice_lines_sum_to_total(model) %}
select i.invoice_id, i.total_cents, coalesce(sum(l.amount_cents), 0) as lines_cents
from {{ model }} as i
left join {{ ref('fct_invoice_lines') }} as l on l.invoice_id = i.invoice_id
group by i.invoice_id, i.total_cents
having i.total_cents <> coalesce(sum(l.amount_cents), 0)
{% endtest %}
