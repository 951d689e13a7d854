-- Reconciliation: internal invoice snapshot vs Stripe, per org and period (billing.reconcile).
-- A run is claimed by its idempotency key in billing.reconcile_runs in the same transaction
-- as its audit rows and incident, so one key never yields two results. Money is bigint
-- cents; relative differences are exact numeric ratios. See docs/RECONCILIATION.md.

-- One row per reconcile run (idempotency key): its parameters and the payload it returned.
CREATE TABLE billing.reconcile_runs (
    idempotency_key     text PRIMARY KEY CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    run_id              text NOT NULL,
    period              date NOT NULL CHECK (extract(day FROM period) = 1),
    org_filter          text[],                  -- sorted org ids, NULL = every org
    tolerance           numeric NOT NULL CHECK (tolerance >= 0),
    status              text NOT NULL CHECK (status IN ('passed', 'failed')),
    orgs_checked        integer NOT NULL,
    discrepancies       integer NOT NULL,        -- any difference, within tolerance or not
    above_tolerance     integer NOT NULL,        -- the ones that fail the run
    max_rel_diff        numeric NOT NULL,
    payload             jsonb NOT NULL,          -- returned verbatim on a re-run with the key
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reconcile_runs_period_idx ON billing.reconcile_runs (period, created_at);

-- One row per org compared in a run. rel_diff = |stripe - internal| / |internal|, and 1
-- when the amounts cannot be compared (one side missing, internal 0, currencies differ).
CREATE TABLE billing.billing_audit (
    audit_id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    idempotency_key     text NOT NULL REFERENCES billing.reconcile_runs (idempotency_key),
    run_id              text NOT NULL,
    period              date NOT NULL CHECK (extract(day FROM period) = 1),
    org_id              text NOT NULL,
    status              text NOT NULL CHECK (status IN (
                            'match', 'within_tolerance', 'mismatch',
                            'missing_in_stripe', 'missing_internal', 'currency_mismatch')),
    is_above_tolerance  boolean NOT NULL,
    internal_cents      bigint,                  -- NULL: no snapshot invoice for the org
    stripe_cents        bigint,                  -- NULL: nothing in Stripe for the org/period
    internal_currency   char(3),
    stripe_currency     text,                    -- comma-joined when Stripe has several
    abs_diff_cents      bigint NOT NULL,
    rel_diff            numeric NOT NULL CHECK (rel_diff >= 0),
    stripe_source       text NOT NULL CHECK (stripe_source IN ('invoice', 'items', 'none')),
    stripe_invoice_id   text,
    lines               jsonb NOT NULL DEFAULT '[]'::jsonb,   -- per line (base fee, metric)
    expectations        jsonb NOT NULL DEFAULT '{}'::jsonb,   -- GX expectation -> passed for this org
    checked_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (idempotency_key, org_id)
);
CREATE INDEX billing_audit_org_period_idx ON billing.billing_audit (org_id, period, checked_at DESC);
CREATE INDEX billing_audit_period_idx ON billing.billing_audit (period);

-- One incident per failed run (key). Assigned to Engineering + Finance per the playbook.
-- message_id is fixed when the row is written; the alert email is claimed (email_claimed_at)
-- before it is sent and stamped (email_sent_at) after, so it goes out once.
CREATE TABLE billing.billing_incidents (
    incident_id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    idempotency_key     text NOT NULL UNIQUE REFERENCES billing.reconcile_runs (idempotency_key),
    period              date NOT NULL CHECK (extract(day FROM period) = 1),
    org_ids             text[] NOT NULL,
    assignees           text[] NOT NULL DEFAULT ARRAY['Engineering', 'Finance'],
    status              text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
    summary             text NOT NULL,
    max_rel_diff        numeric NOT NULL,
    message_id          text NOT NULL UNIQUE,
    email_to            text[] NOT NULL,
    email_claimed_at    timestamptz,
    email_sent_at       timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    resolved_at         timestamptz,
    resolution          text,
    CHECK ((status = 'resolved') = (resolved_at IS NOT NULL))
);
CREATE INDEX billing_incidents_open_idx ON billing.billing_incidents (period) WHERE status = 'open';
