-- Retention for the exactly-once registry (billing.usage_event_ids). Until now the registry kept
-- a row for every event ever stored, so it grew with history: its random-keyed primary key is
-- the most expensive write of ingest and it gets slower as it grows (docs/PERFORMANCE.md).
--
-- Now a real retention purge deletes the registry rows of each month whose usage partition it
-- drops, in the same transaction, and records it (target 'registry' in the audit). From then on
-- ingest accepts no event in or before a purged month: `billing.usage_registry_horizon()` raises
-- the start of every run's acceptance window to the first day after the latest such month, so
-- an event whose registry row is gone is quarantined as too_late, never counted twice (a
-- backfill of an old arrival day would otherwise reach back into purged months).
--
-- Ingest's file transactions (shared) and a real purge (exclusive) take the same advisory
-- lock, so a file never loads against a horizon that a purge moves underneath it.
-- Runbook: docs/runbooks/retention-purge.md.

ALTER TABLE billing.retention_purge_audit DROP CONSTRAINT retention_purge_audit_target_check;
ALTER TABLE billing.retention_purge_audit ADD CONSTRAINT retention_purge_audit_target_check
    CHECK (target IN ('postgres_partition', 'quarantine', 'clickhouse', 'registry'));

-- The purge's side: held until its transaction ends; waits for the files loading now.
CREATE FUNCTION billing.lock_usage_registry() RETURNS void
LANGUAGE sql VOLATILE AS $$ SELECT pg_advisory_xact_lock(7203004) $$;

-- Ingest's side, once per file transaction: the first instant ingest may still accept (the
-- first day after the latest month whose registry rows a purge deleted), or NULL if none was.
CREATE FUNCTION billing.usage_registry_horizon() RETURNS timestamptz
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7203004);
    RETURN (SELECT (max(period) + interval '1 month')::timestamp AT TIME ZONE 'UTC'
              FROM billing.retention_purge_audit
             WHERE target = 'registry' AND action = 'dropped');
END $$;

-- Delete the registry rows of one month (by occurred_at, UTC); how many. A sequential scan of
-- the registry, once per purged month: weekly at most, and the registry stays bounded by it.
CREATE FUNCTION billing.prune_usage_registry(p_period date) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n bigint;
BEGIN
    IF extract(day FROM p_period) <> 1 THEN
        RAISE EXCEPTION 'period % is not the first day of a month', p_period;
    END IF;
    PERFORM billing.lock_usage_registry();
    DELETE FROM billing.usage_event_ids
     WHERE occurred_at >= p_period::timestamp AT TIME ZONE 'UTC'
       AND occurred_at < (p_period + interval '1 month')::timestamp AT TIME ZONE 'UTC';
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;
