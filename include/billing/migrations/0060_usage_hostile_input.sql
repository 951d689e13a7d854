-- Usage ingest and hostile input (contract: docs/USAGE_EVENTS.md; runbook:
-- docs/runbooks/ingest-rejected-files.md). PostgreSQL 15.
--
-- 1. A quantity outside the documented range (0 .. 10^9, at most 9 decimal places; see
--    billing.pricing.QUANTITY_MAX) is quarantined as quantity_out_of_range instead of being
--    stored and breaking the snapshot's bigint charges for every org.
-- 2. A file that cannot be decoded (a corrupt, truncated or padded .gz, plain text named .gz)
--    is a manifest row with status 'rejected' and a reason, never a failed run: nothing of it
--    is loaded (the counts are 0), the rest of the day loads.
-- 3. Every entry of a day folder that ingest does not read (in-flight dot files, unsupported
--    extensions, directories, symlinks, other non-files) is listed in billing.usage_skipped,
--    as the day's latest listing saw it.

ALTER TABLE billing.usage_quarantine DROP CONSTRAINT usage_quarantine_reason_check;
ALTER TABLE billing.usage_quarantine ADD CONSTRAINT usage_quarantine_reason_check CHECK (reason IN (
    'malformed_json', 'not_utf8', 'line_too_long', 'missing_field', 'bad_type',
    'negative_quantity', 'non_finite_quantity', 'quantity_out_of_range', 'bad_timestamp',
    'future_event', 'too_late', 'unknown_org', 'unknown_metric', 'conflict')) NOT VALID;
ALTER TABLE billing.usage_quarantine VALIDATE CONSTRAINT usage_quarantine_reason_check;

ALTER TABLE billing.usage_files DROP CONSTRAINT usage_files_status_check;
ALTER TABLE billing.usage_files ADD CONSTRAINT usage_files_status_check
    CHECK (status IN ('loaded', 'changed', 'rejected')) NOT VALID;
ALTER TABLE billing.usage_files VALIDATE CONSTRAINT usage_files_status_check;
ALTER TABLE billing.usage_files ADD COLUMN reject_reason text;   -- set when status = 'rejected'
ALTER TABLE billing.usage_files ADD COLUMN reject_detail text;
ALTER TABLE billing.usage_files ADD CONSTRAINT usage_files_rejected_empty CHECK (
    reject_reason IS NULL
    OR (reject_detail IS NOT NULL AND lines = 0 AND accepted = 0 AND non_billable = 0
        AND duplicate = 0 AND quarantined = 0 AND blank = 0));

CREATE TABLE billing.usage_skipped (
    path          text PRIMARY KEY,                -- the entry's URI (under dt=<arrival_day>/)
    arrival_day   date NOT NULL,
    reason        text NOT NULL CHECK (reason IN (
                      'in_flight', 'unsupported_extension', 'directory', 'symlink', 'not_a_file')),
    detail        text NOT NULL,
    run_end       timestamptz NOT NULL,            -- of the run that listed it last
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_skipped_arrival_day ON billing.usage_skipped (arrival_day);
