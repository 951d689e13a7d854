{#-
  Dimension keys computed in ClickHouse, equal byte for byte to the Postgres snapshot's
  (int_usage_period_to_date: `jsonb_agg(properties ->> dim order by position)::text`, ''
  without dimensions; billing.pricing.aggregation.dimension_key is the reference).

  `properties` arrives from postgresql() as the text PostgreSQL prints for jsonb: canonical
  (`{"k": v, "k2": v2}`, ", " and ": " separators, numbers as numeric prints them, never
  an exponent). ClickHouse's JSON functions parse it but print numbers and nested values
  compactly (1.50 -> 1.5, [1, 2] -> [1,2]), so those are cut out of the text itself.
-#}

{#- A String as a JSON string literal, escaped as PostgreSQL's escape_json does: \" \\ \b
    \f \n \r \t, other bytes below 0x20 as \u00xx, everything else (/, non-ASCII) as is.
    NULL stays NULL. The per-byte path only runs for values that need escaping. -#}
{% macro ch_json_quote(expr) -%}
    concat('"', if(
        match({{ expr }}, '[\\x00-\\x1f"\\\\]'),
        arrayStringConcat(arrayMap(c -> multiIf(
            c = '"', '\\"', c = '\\', '\\\\', c = '\x08', '\\b', c = '\x0C', '\\f',
            c = '\n', '\\n', c = '\r', '\\r', c = '\t', '\\t',
            c < ' ', concat('\\u00', lower(hex(c))),
            c
        ), splitByString('', {{ expr }}))),
        {{ expr }}
    ), '"')
{%- endmacro %}

{#- [json ->> name for name in names]: PostgreSQL's `->>` of each name (an Array(String)
    expression) on the canonical jsonb text `json` (a String, '{}' when absent), as an
    Array(Nullable(String)): NULL when the key is absent or JSON null (or json is not an
    object), the unescaped string, true/false, the number or the nested value as jsonb
    prints it. A decimal number, array or object is cut out of the text after `"name": `
    (up to the next key's `, "next": ` or the closing brace), exact when each pattern
    occurs once: a value nested before it may repeat the key name, and then ClickHouse's
    compact rendering is the fallback. Integers print the same either way. A document
    ClickHouse cannot parse (a number beyond Float64, ±1.8e308, anywhere in it) gives
    NULL for every name. -#}
{% macro ch_jsonb_values(json, names) -%}
    {%- set start = 'position(' ~ json ~ ', pat) + length(pat)' %}
    arrayMap(
        (name, pat, next_pat) -> multiIf(
            JSONType({{ json }}, name) = 'Null', NULL,
            JSONType({{ json }}, name) = 'Double' and countSubstrings({{ json }}, pat) = 1,
                extract(substring({{ json }}, {{ start }}), '^-?[0-9.]+'),
            JSONType({{ json }}, name) in ('Array', 'Object') and countSubstrings({{ json }}, pat) = 1
                and indexOf(JSONExtractKeys({{ json }}), name) = length(JSONExtractKeys({{ json }})),
                substring({{ json }}, {{ start }}, length({{ json }}) - ({{ start }})),
            JSONType({{ json }}, name) in ('Array', 'Object') and countSubstrings({{ json }}, pat) = 1
                and countSubstrings({{ json }}, next_pat) = 1,
                substring({{ json }}, {{ start }}, position({{ json }}, next_pat) - ({{ start }})),
            JSONExtractString({{ json }}, name)
        ),
        {{ names }},
        arrayMap(name -> concat({{ ch_json_quote('name') }}, ': '), {{ names }}),
        arrayMap(name -> concat(', ', {{ ch_json_quote('JSONExtractKeys(' ~ json ~ ')[indexOf(JSONExtractKeys(' ~ json ~ '), name) + 1]') }}, ': '), {{ names }})
    )
{%- endmacro %}

{#- The dimension key of an event from its dimension values (ch_jsonb_values of the
    metric's dimensions, in order): '' without dimensions, else the JSON array text of the
    values, `null` for a missing one, e.g. ["large", null]. -#}
{% macro ch_dimension_key(values) -%}
    if(
        empty({{ values }}),
        '',
        concat('[', arrayStringConcat(
            arrayMap(value -> ifNull({{ ch_json_quote('value') }}, 'null'), {{ values }}),
            ', '
        ), ']')
    )
{%- endmacro %}
