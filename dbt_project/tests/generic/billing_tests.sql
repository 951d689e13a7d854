{#- Rows where `expression` is false fail the test; `message` is returned with them so
    `--store-failures` and the logs say what is wrong, not only that something is. -#}
{% test expression_is_true(model, expression, column_name=none, message=none) %}
select *{% if message %}, {{ "'" ~ (message | replace("'", "''")) ~ "'" }} as failure_reason{% endif %}
from {{ model }}
where not coalesce(({{ expression }}), false)
{% endtest %}

{% test has_rows(model, message=none) %}
select {{ "'" ~ ((message or 'no rows') | replace("'", "''")) ~ "'" }} as failure_reason
where not exists (select 1 from {{ model }})
{% endtest %}

{% test unique_combination(model, columns) %}
select {{ columns | join(', ') }}, count(*) as n
from {{ model }}
group by {{ columns | join(', ') }}
having count(*) > 1
{% endtest %}

{#- Sorted by `order_by` within each `partition_by`, `column` never decreases. -#}
{% test non_decreasing(model, column_name, partition_by, order_by) %}
select *
from (
    select
        *,
        lag({{ column_name }}) over (partition by {{ partition_by | join(', ') }} order by {{ order_by }}) as previous_value
    from {{ model }}
) as ordered
where {{ column_name }} < previous_value
{% endtest %}
