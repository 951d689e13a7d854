-- Retention eligibility, tightened now that billing.billing_audit exists (0030): an org's
-- period counts as reconciled only when its LATEST reconciliation result is a match or
-- within tolerance. A mismatch (even with a resolved incident) keeps the month until a
-- later reconcile run agrees. Runbook: docs/runbooks/retention-purge.md.
CREATE OR REPLACE FUNCTION billing.usage_period_purge_blocker(p_period date) RETURNS text
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
              WHERE NOT EXISTS (
                    SELECT 1 FROM (SELECT a.status FROM billing.billing_audit a
                                    WHERE a.org_id = o.org_id AND a.period = $1
                                    ORDER BY a.checked_at DESC, a.audit_id DESC LIMIT 1) latest
                     WHERE latest.status IN (''match'', ''within_tolerance''))',
            part) INTO missing USING p_period;
        IF missing > 0 THEN
            RETURN format('not reconciled: %s org(s) without a matching reconciliation result', missing);
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
