-- Retention purge: the audit trail and the rule that decides which months may go.
-- See docs/runbooks/retention-purge.md.

-- One row per object a purge run looked at (dry runs too), so Finance can see what went.
CREATE TABLE billing.retention_purge_audit (
    audit_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id          text NOT NULL,
    as_of           date NOT NULL,
    retention_days  integer NOT NULL CHECK (retention_days > 0),
    cutoff          date NOT NULL,
    dry_run         boolean NOT NULL,
    actor           text NOT NULL,
    target          text NOT NULL
                    CHECK (target IN ('postgres_partition', 'quarantine', 'clickhouse')),
    object          text NOT NULL,
    period          date NOT NULL CHECK (extract(day FROM period) = 1),
    action          text NOT NULL CHECK (action IN ('would_drop', 'dropped', 'kept')),
    reason          text NOT NULL,
    rows            bigint,
    bytes           bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_id, dry_run, target, object)
);

-- Why a billing period (first day of a month) must NOT be purged, or NULL when it may.
-- A period may go only when every org with usage in it has a finalized Stripe invoice, a
-- reconciliation result for that invoice, and no open reconciliation incident. While the
-- invoice or reconciliation tables don't exist yet, nothing is eligible.
CREATE FUNCTION billing.usage_period_purge_blocker(p_period date) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    part    regclass := to_regclass(format('billing.usage_events_p%s', to_char(p_period, 'YYYYMM')));
    missing bigint;
BEGIN
    IF extract(day FROM p_period) <> 1 THEN
        RAISE EXCEPTION 'period % is not the first day of a month', p_period;
    END IF;
    IF to_regclass('billing.stripe_invoices') IS NULL THEN
        RETURN 'no invoice table (billing.stripe_invoices) yet';
    END IF;
    IF to_regclass('billing.billing_audit') IS NULL THEN
        RETURN 'no reconciliation table (billing.billing_audit) yet';
    END IF;
    IF part IS NOT NULL THEN
        EXECUTE format(
            'SELECT count(*) FROM (SELECT DISTINCT org_id FROM %s) o
              WHERE NOT EXISTS (SELECT 1 FROM billing.stripe_invoices i
                                 WHERE i.org_id = o.org_id AND i.period = $1
                                   AND i.finalized_at IS NOT NULL AND i.status <> ''draft'')',
            part) INTO missing USING p_period;
        IF missing > 0 THEN
            RETURN format('not invoiced: %s org(s) without a finalized invoice', missing);
        END IF;
        EXECUTE format(
            'SELECT count(*) FROM (SELECT DISTINCT org_id FROM %s) o
              WHERE NOT EXISTS (SELECT 1 FROM billing.billing_audit a
                                 WHERE a.org_id = o.org_id AND a.period = $1)',
            part) INTO missing USING p_period;
        IF missing > 0 THEN
            RETURN format('not reconciled: %s org(s) without a reconciliation result', missing);
        END IF;
    END IF;
    IF to_regclass('billing.billing_incidents') IS NOT NULL THEN
        EXECUTE 'SELECT count(*) FROM billing.billing_incidents
                  WHERE period = $1 AND status = ''open''' INTO missing USING p_period;
        IF missing > 0 THEN
            RETURN format('%s open reconciliation incident(s)', missing);
        END IF;
    END IF;
    RETURN NULL;
END $$;
