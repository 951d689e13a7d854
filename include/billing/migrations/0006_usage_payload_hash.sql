-- Usage ingest: payload identity by value, and a one-pass JSON parse for ingest's fast SQL.
-- Contract: docs/USAGE_EVENTS.md ("Exactly once"); numbers: docs/PERFORMANCE.md. PostgreSQL 15.
--
-- payload_hash was md5 of the line's canonical jsonb text (about 3.5 µs a line: a jsonb tree,
-- its serialisation and md5), so only a line parsed by PostgreSQL could be registered. It
-- becomes a 64-bit hash of the *typed* event, computed when the event is registered, whoever
-- typed the line (Python while streaming, or SQL). Two lines are the same payload when their
-- stored fields are equal as values: key order, unknown keys, number spelling (1.50 / 1.5,
-- also inside properties) and the offset an instant is written with do not matter.
-- The hash is only ever compared between two lines carrying the same event_id, so 64 bits
-- leave a 2^-64 chance per such pair of taking a conflict for a duplicate. Should a major
-- PostgreSQL upgrade ever change its hash functions, identical payloads would show up as
-- `conflict` (quarantined, visible), never the other way round; the UPDATE below refreshes.

-- The payload identity, in one place.
CREATE FUNCTION billing.usage_payload_hash(
    event_id text, org_id text, metric text, quantity numeric, occurred_at timestamptz,
    billable boolean, source text, properties jsonb
) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN hash_record_extended(
    ROW(event_id, org_id, metric, quantity, occurred_at, billable, source, properties), 7202612);

-- One call of jsonb_populate_record splits a line into its fields, each still JSON, so their
-- types can be checked (a text column would take 5 and "5" alike). Used by ingest's fast SQL.
CREATE TYPE billing.usage_event_json AS (
    event_id jsonb, org_id jsonb, metric jsonb, quantity jsonb, occurred_at jsonb,
    billable jsonb, source jsonb, properties jsonb
);

-- Rehash the registry from the stored events. A registry row whose event is gone (its
-- partition dropped by retention) keeps NULL: a later line with that event_id is a conflict.
ALTER TABLE billing.usage_event_ids ALTER COLUMN payload_hash DROP NOT NULL;
ALTER TABLE billing.usage_event_ids ALTER COLUMN payload_hash TYPE bigint USING NULL;
UPDATE billing.usage_event_ids r
   SET payload_hash = billing.usage_payload_hash(e.event_id, e.org_id, e.metric, e.quantity,
                                                 e.occurred_at, e.billable, e.source, e.properties)
  FROM billing.usage_events e
 WHERE md5(e.event_id)::uuid = r.event_key AND e.occurred_at = r.occurred_at;
ALTER TABLE billing.usage_event_ids
    ADD CONSTRAINT usage_event_ids_payload_hash_set CHECK (payload_hash IS NOT NULL) NOT VALID;
