-- Usage ingest performance: the exactly-once registry is keyed on a 16-byte hash of event_id.
-- Contract: docs/USAGE_EVENTS.md; numbers: docs/PERFORMANCE.md ("Ingest"). PostgreSQL 15.
--
-- event_key = md5(event_id)::uuid. A 16-byte fixed-width key makes the primary-key index about
-- half the size of the text key (fewer pages to insert into, cache and WAL-log) and the heap
-- row narrower. payload_hash keeps its meaning (md5 of the canonical jsonb text), so events
-- registered before this migration are still told apart as duplicate or conflict.
-- The table is rebuilt rather than altered in place (no dead tuples from a full UPDATE).

CREATE TABLE billing.usage_event_ids_v2 (
    event_key     uuid PRIMARY KEY,               -- md5(event_id)::uuid
    payload_hash  uuid NOT NULL,
    occurred_at   timestamptz NOT NULL,
    file_id       bigint NOT NULL,
    line_no       bigint NOT NULL
);

INSERT INTO billing.usage_event_ids_v2 (event_key, payload_hash, occurred_at, file_id, line_no)
SELECT md5(event_id)::uuid, payload_hash, occurred_at, file_id, line_no
  FROM billing.usage_event_ids;

DROP TABLE billing.usage_event_ids;
ALTER TABLE billing.usage_event_ids_v2 RENAME TO usage_event_ids;
ALTER INDEX billing.usage_event_ids_v2_pkey RENAME TO usage_event_ids_pkey;
COMMENT ON TABLE billing.usage_event_ids IS
    'Exactly-once registry of usage event_ids, keyed on md5(event_id)::uuid (docs/USAGE_EVENTS.md)';
