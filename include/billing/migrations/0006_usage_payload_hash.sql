-- Usage ingest: payload identity by value, computable in Python while streaming.
-- Contract: docs/USAGE_EVENTS.md ("Exactly once"); numbers: docs/PERFORMANCE.md. PostgreSQL 15.
--
-- payload_hash was md5 of the line's canonical jsonb text, which only PostgreSQL can compute
-- (about 3.5 µs a line). It becomes md5 of a canonical text of the *typed* event, which
-- billing/usage_line.py (payload_text) computes for the lines it types while streaming, and
-- this function for the lines SQL judges. Two lines are the same payload when their stored
-- fields are equal: key order, unknown keys, number spelling (1.50 / 1.5) and the offset an
-- instant is written with do not matter; properties compare as jsonb text.
-- Keep the two definitions identical (tests/billing/test_ingest_paths.py compares them).
CREATE FUNCTION billing.usage_payload_hash(
    event_id text, org_id text, metric text, quantity numeric, occurred_at timestamptz,
    billable boolean, source text, properties jsonb
) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN md5(
    length(event_id) || ':' || event_id || '|' || length(org_id) || ':' || org_id
    || '|' || length(metric) || ':' || metric || '|' || trim_scale(quantity)::text
    || '|' || to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')
    || '|' || CASE WHEN billable THEN 't' ELSE 'f' END
    || '|' || coalesce(length(source) || ':' || source, '~')
    || '|' || coalesce(properties::text, '~')
)::uuid;

-- One call of jsonb_populate_record splits a line into its fields, each still JSON, so their
-- types can be checked (a text column would take 5 and "5" alike). Used by ingest's fast SQL.
CREATE TYPE billing.usage_event_json AS (
    event_id jsonb, org_id jsonb, metric jsonb, quantity jsonb, occurred_at jsonb,
    billable jsonb, source jsonb, properties jsonb
);

-- Rehash the registry from the stored events. A registry row whose event is gone (its
-- partition dropped by retention) keeps its old hash, which no line matches any more: a later
-- line with that event_id is quarantined as a conflict, never silently taken as a duplicate.
UPDATE billing.usage_event_ids r
   SET payload_hash = billing.usage_payload_hash(e.event_id, e.org_id, e.metric, e.quantity,
                                                 e.occurred_at, e.billable, e.source, e.properties)
  FROM billing.usage_events e
 WHERE md5(e.event_id)::uuid = r.event_key AND e.occurred_at = r.occurred_at;
